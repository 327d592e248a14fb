"""``dgq compare``: FP and every method in one harness — same model, calibration windows, evaluation windows and
seed — written as ``results.json``, ``results.md`` and ``ppl_vs_bits.png``.

Each method quantizes a fresh copy of the FP model (loaded once), saves a checkpoint, and is evaluated **after
reloading it with** :func:`dgq.load`, so every number belongs to a checkpoint that loads. Method specs are
``name[:field=value...]`` with ``DGQConfig`` fields (e.g. ``smoothquant:alpha=0.8``, ``gptq:act_order=true``);
``rtn`` expands to its three variants (W4A16, W4A8 in the DGQ format, W8A8).
"""

from __future__ import annotations

import copy
import dataclasses
import gc
import json
import os
import resource
import shutil
import threading
import time
from pathlib import Path

from .api import DGQConfig
from .errors import DGQError

DEFAULT_METHODS = "rtn,smoothquant,gptq,awq,dgq,dgq-gptq"
ALIASES = {
    "rtn": ["rtn-w4a16", "rtn-w4a8", "rtn-w8a8"],
}
PRESETS = {  # row name -> DGQConfig fields beyond method
    "rtn-w4a16": {"method": "rtn", "weights_only": True},
    "rtn-w4a8": {"method": "rtn"},
    "rtn-w8a8": {"method": "rtn", "w_bits": 8},
    "smoothquant": {"method": "smoothquant", "w_bits": 8},
    "gptq": {"method": "gptq"},
    "awq": {"method": "awq"},
    "dgq": {"method": "dgq"},
    "dgq-gptq": {"method": "dgq-gptq"},
}
_FIELDS = {f.name: f for f in dataclasses.fields(DGQConfig)}


def _cast(name: str, value: str):
    f = _FIELDS.get(name)
    if f is None or name == "method":
        raise DGQError(f"unknown option {name!r} in a method spec; options are DGQConfig fields: "
                       f"{', '.join(n for n in _FIELDS if n != 'method')}")
    t = str(f.type)
    low = value.lower()
    if low in ("true", "false", "yes", "no") and "bool" in t:
        return low in ("true", "yes")
    for conv in ((int,) if t.startswith("int") else ()) + ((float,) if "float" in t else ()):
        try:
            return conv(value)
        except ValueError:
            pass
    if t.startswith(("int", "float")):
        raise DGQError(f"option {name} needs a number, got {value!r}")
    return value


def parse_methods(spec: str, base: dict) -> list[tuple[str, DGQConfig]]:
    """``"rtn,gptq:act_order=true"`` -> [(row name, config)], each validated (errors name the spec)."""
    rows = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        name, *opts = item.split(":")
        names = ALIASES.get(name, [name])
        for n in names:
            if n not in PRESETS:
                raise DGQError(f"unknown method {n!r}; choose from: {', '.join(list(ALIASES) + list(PRESETS))}")
            kw = {**base, **PRESETS[n]}
            for o in opts:
                if "=" not in o:
                    raise DGQError(f"method option {o!r} in {item!r} is not field=value")
                k, v = o.split("=", 1)
                kw[k] = _cast(k, v)
            cfg = DGQConfig(**kw)
            cfg.validate()
            rows.append((n if not opts else item if len(names) == 1 else f"{n}:{':'.join(opts)}", cfg))
    if not rows:
        raise DGQError("no methods given")
    return rows


class PeakRSS:
    """Peak resident memory of this process while the block runs (polls /proc; falls back to ru_maxrss)."""

    def __enter__(self):
        self.peak = self._now()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._poll, daemon=True)
        self._t.start()
        return self

    @staticmethod
    def _now() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except (OSError, ValueError):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def _poll(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self._now())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._now())
        return False


def quantized_bits_per_weight(model) -> float | None:
    """Storage bits per weight of the quantized linears (codes, scales, zeros; bias excluded)."""
    from .nn import QuantLinear

    nbytes = nweights = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            nweights += m.in_features * m.out_features
            for name, b in m.named_buffers(recurse=False):
                if name not in ("bias", "act_scale"):
                    nbytes += b.numel() * b.element_size()
    return round(8 * nbytes / nweights, 3) if nweights else None


def compare(model_ref: str, methods: str = DEFAULT_METHODS, calib: str = "squad-wiki", text: str = "lambada",
            out: str | os.PathLike = "compare-out", group_size: int = 128, act: str = "dynamic", nsamples: int = 32,
            calib_seqlen: int = 512, seqlen: int = 1024, max_tokens: int | None = 32768, seed: int = 0,
            keep_checkpoints: bool = False, progress: bool = True, log=print) -> list[dict]:
    from . import checkpoint
    from .api import quantize
    from .data import adds_bos, calibration_windows, read_text, tokenize
    from .eval.perplexity import perplexity_of_ids
    from .models import load_model
    from .provenance import machine_info

    rows = parse_methods(methods, {"group_size": group_size, "act": act, "seed": seed})
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    base, tok = load_model(model_ref)
    ids = tokenize(read_text(text), tok)
    if max_tokens:
        ids = ids[:max_tokens]
    bos = tok.bos_token_id if adds_bos(tok) else None
    windows = calibration_windows(calib, tok, nsamples, calib_seqlen, seed)
    t0 = time.perf_counter()
    fp = perplexity_of_ids(base, ids, seqlen, bos, progress)
    results = [{"method": "fp", "w_bits": 16, "a_bits": 16, "group_size": None, "ppl": round(fp["ppl"], 4),
                "delta_ppl_pct": 0.0, "quant_seconds": 0.0, "peak_rss_mb": None, "checkpoint_bytes": None,
                "bits_per_weight": 16.0, "eval_seconds": round(time.perf_counter() - t0, 1), "config": None}]
    meta = {"model": model_ref, "calib": {"text": calib, "windows": nsamples, "seqlen": calib_seqlen, "seed": seed},
            "eval": {"text": text, "tokens": int(ids.numel()), "seqlen": seqlen, "windows": fp["windows"]},
            "machine": machine_info()}
    log(f"{'fp':24s} ppl {fp['ppl']:8.4f}")
    _write(out, meta, results)
    for name, cfg in rows:
        model = copy.deepcopy(base)
        gc.collect()
        with PeakRSS() as rss:
            tq = time.perf_counter()
            quantize(model, cfg, calib=windows, progress=progress)
            qs = time.perf_counter() - tq
            path = out / "checkpoints" / name.replace(":", "_").replace("=", "-")
            checkpoint.save(model, path, tokenizer=tok, overwrite=True)
        del model
        gc.collect()
        size = (path / checkpoint.WEIGHTS).stat().st_size
        back = checkpoint.load(path)
        te = time.perf_counter()
        r = perplexity_of_ids(back, ids, seqlen, bos, progress)
        w_bits, a_bits = cfg.resolved().bits
        row = {"method": name, "w_bits": w_bits, "a_bits": a_bits,
               "group_size": None if cfg.storage_format == "w8a8" else group_size, "ppl": round(r["ppl"], 4),
               "delta_ppl_pct": round(100 * (r["ppl"] / fp["ppl"] - 1), 2), "quant_seconds": round(qs, 1),
               "peak_rss_mb": round(rss.peak / 2**20), "checkpoint_bytes": size,
               "bits_per_weight": quantized_bits_per_weight(back), "eval_seconds": round(time.perf_counter() - te, 1),
               "format": cfg.storage_format, "config": dataclasses.asdict(cfg.resolved())}
        results.append(row)
        del back
        if not keep_checkpoints:
            shutil.rmtree(path, ignore_errors=True)
        log(f"{name:24s} ppl {row['ppl']:8.4f}  ({row['delta_ppl_pct']:+.2f}%)  W{w_bits}A{a_bits}  "
            f"quantize {qs:6.1f} s  peak RSS {row['peak_rss_mb']} MB")
        _write(out, meta, results)
    if not keep_checkpoints:
        shutil.rmtree(out / "checkpoints", ignore_errors=True)
    _plot(out, meta, results)
    return results


def _write(out: Path, meta: dict, results: list[dict]) -> None:
    tmp = out / ".results.json.tmp"
    tmp.write_text(json.dumps({**meta, "results": results}, indent=2) + "\n")
    os.replace(tmp, out / "results.json")
    (out / "results.md").write_text(markdown_table(meta, results))


def markdown_table(meta: dict, results: list[dict]) -> str:
    e, c = meta["eval"], meta["calib"]
    lines = [f"Model `{meta['model']}`; perplexity on {e['tokens']} tokens of `{e['text']}` (windows of "
             f"{e['seqlen']}); calibration {c['windows']} × {c['seqlen']} tokens of `{c['text']}`, seed {c['seed']}; "
             f"{meta['machine'].get('cpu', '')}, {meta['machine'].get('date', '')}.", "",
             "| method | W/A bits | group | ppl | Δppl | bits/weight | quantize s | peak RSS MB | checkpoint MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        ck = "–" if r["checkpoint_bytes"] is None else f"{r['checkpoint_bytes'] / 1e6:.1f}"
        rss = "–" if r["peak_rss_mb"] is None else str(r["peak_rss_mb"])
        grp = "–" if r["group_size"] is None else str(r["group_size"])
        lines.append(f"| {r['method']} | W{r['w_bits']}A{r['a_bits']} | {grp} | {r['ppl']:.3f} | "
                     f"{r['delta_ppl_pct']:+.2f}% | {r['bits_per_weight']} | {r['quant_seconds']} | {rss} | {ck} |")
    return "\n".join(lines) + "\n"


def _plot(out: Path, meta: dict, results: list[dict]) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("dgq compare: matplotlib is not installed; skipped ppl_vs_bits.png (pip install matplotlib)")
        return
    fig, ax = plt.subplots(figsize=(9, 5))
    fp = results[0]["ppl"]
    ax.axhline(fp, color="gray", ls="--", lw=1, label=f"fp: {fp:.2f}")
    top = fp * 1.5  # rows above this are listed in the legend and drawn at the top edge
    for i, r in enumerate(results[1:]):
        y = min(r["ppl"], top)
        ax.scatter(r["bits_per_weight"], y, s=55, color=plt.cm.tab20(i % 20), zorder=3,
                   marker=("o" if r["a_bits"] == 8 else "s") if r["ppl"] <= top else "^",
                   edgecolors="black" if r["method"].startswith("dgq") else "none",
                   label=f"{r['method']} (W{r['w_bits']}A{r['a_bits']}): {r['ppl']:.2f}"
                         + (" (off scale)" if r["ppl"] > top else ""))
    ax.set_ylim(fp * 0.97, top * 1.02)
    ax.set_xlabel("stored bits per weight of the quantized linears (codes + scales + zeros)")
    ax.set_ylabel(f"perplexity on {Path(meta['eval']['text']).name} (lower is better)")
    ax.set_title(f"{meta['model']}: perplexity vs weight storage (o: int8 activations, s: float; ^: off scale)",
                 fontsize=9)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out / "ppl_vs_bits.png", dpi=120)
    plt.close(fig)
