"""``dgq compare``: FP and every method in one harness — same model, calibration windows, evaluation windows and
seed — written as ``results.json``, ``results.md`` and ``ppl_vs_bits.png``.

Each method quantizes a fresh copy of the FP model (loaded once), saves a checkpoint, and is evaluated **after
reloading it with** :func:`dgq.load`, so every number belongs to a checkpoint that loads. Method specs are
``name[:field=value...]`` with ``DGQConfig`` fields (e.g. ``smoothquant:alpha=0.8``, ``gptq:act_order=true``,
``rtn:ignore=model.layers.0.mlp.down_proj+model.layers.1.mlp.down_proj``); a method's rows come from the registry
(``rtn`` expands to its three variants: W4A16, W4A8 in the DGQ format, W8A8).
"""

from __future__ import annotations

import copy
import gc
import json
import os
import re
import resource
import shutil
import threading
import time
import types
import typing
from pathlib import Path

from . import checkpoint
from . import methods as registry
from .api import quantize
from .config import DGQConfig
from .data import calibration_windows, eval_ids
from .errors import DGQError
from .eval.perplexity import perplexity_of_ids
from .formats import QuantLinear
from .fsutil import check_writable_dir, is_dgq_checkpoint
from .models import load_model
from .provenance import machine_info

_TYPES = typing.get_type_hints(DGQConfig)  # field -> its declared type (the annotations are strings)


def _rows_by_name() -> dict[str, tuple[str, dict]]:
    """Every row name any method offers -> (method, config fields), and each method's name -> its rows."""
    rows = {}
    for m in registry.names():
        for row, fields in registry.get(m).compare_rows().items():
            rows[row] = (m, fields)
    return rows


def _cast(name: str, value: str):
    """A method-spec option's string value as its ``DGQConfig`` field's type (lists separated by ``+``)."""
    t = _TYPES.get(name)
    if t is None or name == "method":
        raise DGQError(f"unknown option {name!r} in a method spec; options are DGQConfig fields: "
                       f"{', '.join(n for n in _TYPES if n != 'method')}")
    args = set(typing.get_args(t)) if isinstance(t, types.UnionType) else {t}
    low = value.lower()
    if bool in args and low in ("true", "false", "yes", "no"):
        return low in ("true", "yes")
    if type(None) in args and low in ("none", "default"):
        return None
    for conv in (int, float):
        if conv in args:
            try:
                return conv(value)
            except ValueError:
                pass
    if any(typing.get_origin(a) is tuple for a in args):
        return tuple(v for v in value.split("+") if v)
    if str in args:
        return value
    raise DGQError(f"option {name} needs a {' or '.join(sorted(getattr(a, '__name__', str(a)) for a in args))}, "
                   f"got {value!r}")


def parse_methods(spec: str, base: dict) -> list[tuple[str, DGQConfig]]:
    """``"rtn,gptq:act_order=true"`` -> [(row name, config)], each checked (errors name the spec)."""
    by_row = _rows_by_name()
    out = []
    for item in [s.strip() for s in spec.split(",") if s.strip()]:
        name, *opts = item.split(":")
        if name in registry.REGISTRY:
            rows = list(registry.get(name).compare_rows())
        elif name in by_row:
            rows = [name]
        else:
            known = registry.names() + [r for r in by_row if r not in registry.REGISTRY]
            raise DGQError(f"unknown method {name!r}; choose from: {', '.join(known)}")
        for r in rows:
            method, fields = by_row[r]
            kw = {**base, **fields, "method": method}
            for o in opts:
                if "=" not in o:
                    raise DGQError(f"method option {o!r} in {item!r} is not field=value")
                k, v = o.split("=", 1)
                kw[k] = _cast(k, v)
            cfg = registry.resolve(DGQConfig(**kw))
            out.append((r if not opts else item if len(rows) == 1 else f"{r}:{':'.join(opts)}", cfg))
    if not out:
        raise DGQError("no methods given")
    return out


REPORT_FILES = ("results.json", "results.md", "ppl_vs_bits.png", ".results.json.tmp")


def check_out(out, force: bool, resume: bool = False) -> Path:
    """``out`` is new or empty, or (with ``force`` or ``resume``) an earlier dgq compare output holding nothing
    else: compare writes only its report files and ``checkpoints/``, and removes only the checkpoints it wrote."""
    if out is None or not str(out).strip():
        raise DGQError("the output folder name is empty")
    out = Path(out).expanduser()
    if out.exists() and not out.is_dir():
        raise DGQError(f"output {out} exists and is not a folder; choose another name")
    if out.is_dir() and any(out.iterdir()):
        others = sorted(p.name for p in out.iterdir() if p.name not in (*REPORT_FILES, "checkpoints"))
        if others or not (out / "results.json").is_file():
            raise DGQError(f"output {out} exists and is not a dgq compare report (it holds "
                           f"{', '.join(others[:3]) or 'no results.json'}); choose another folder")
        if not (force or resume):
            raise DGQError(f"output {out} holds an earlier dgq compare report; pass --force to replace it or "
                           f"--resume to add the rows it lacks")
        ck = out / "checkpoints"
        if ck.exists() and (not ck.is_dir() or any(not is_dgq_checkpoint(p) for p in ck.iterdir())):
            raise DGQError(f"{ck} holds something other than dgq checkpoints; move it away first")
    check_writable_dir(out, "output")
    return out


def checkpoint_dir(out: Path, index: int, row: str) -> Path:
    """Where row ``index`` is saved: a name made of the row's safe characters only (a method spec is data, never a
    path), checked to stay inside ``out/checkpoints``."""
    slug = re.sub(r"[^A-Za-z0-9_.=-]+", "_", row).strip("._")[:80] or "row"
    base = (out / "checkpoints").resolve()
    path = base / f"{index:02d}-{slug}"
    if path.resolve().parent != base:
        raise DGQError(f"method spec {row!r} would write outside {base}")
    return path


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
    nbytes = nweights = 0
    for m in model.modules():
        if isinstance(m, QuantLinear):
            nweights += m.in_features * m.out_features
            for name, b in m.named_buffers(recurse=False):
                if name not in ("bias", "act_scale"):
                    nbytes += b.numel() * b.element_size()
    return round(8 * nbytes / nweights, 3) if nweights else None


def compare(model_ref: str, methods: str | None = None, calib: str = "squad-wiki", text: str = "lambada",
            out: str | os.PathLike = "compare-out", group_size: int = 128, act: str = "dynamic", nsamples: int = 32,
            calib_seqlen: int = 512, seqlen: int = 1024, max_tokens: int | None = 32768, seed: int = 0,
            keep_checkpoints: bool = False, progress: bool = True, log=print, force: bool = False,
            dtype="float32", device="cpu", resume: bool = False) -> list[dict]:
    """FP and each method spec of ``methods`` (default: every registered method) on the same windows; see the
    module docstring. Returns the result rows (also written to ``out``).

    ``resume``: ``out`` holds an earlier report of the same model, calibration and evaluation settings (checked);
    its rows are kept (FP too, not evaluated again) and only the methods it lacks are run and appended — a long
    comparison can be done over several runs. Each row records the date it was measured."""
    if force and resume:
        raise DGQError("--force (replace the earlier report) and --resume (add to it) contradict each other")
    rows = parse_methods(methods or ",".join(registry.names()), {"group_size": group_size, "act": act, "seed": seed})
    out = check_out(out, force, resume)  # before loading anything
    previous = _previous(out) if resume else None
    out.mkdir(parents=True, exist_ok=True)
    base, tok = load_model(model_ref, dtype=dtype, device=device)
    ids, bos = eval_ids(text, tok, max_tokens)
    windows = calibration_windows(calib, tok, nsamples, calib_seqlen, seed)
    setting = {"model": model_ref, "calib": {"text": calib, "windows": nsamples, "seqlen": calib_seqlen, "seed": seed},
               "eval": {"text": text, "tokens": int(ids.numel()), "seqlen": seqlen}}
    defaults = {"group_size": group_size, "act": act}
    if previous is not None:
        meta, results = previous
        was = {"model": meta.get("model"), "calib": meta.get("calib"),
               "eval": {k: meta.get("eval", {}).get(k) for k in ("text", "tokens", "seqlen")}}
        if meta.get("defaults", defaults) != defaults:  # reports written before rows recorded them lack it
            raise DGQError(f"--resume: {out} was measured with --group-size/--act {meta['defaults']}, not "
                           f"{defaults}; use another folder")
        if was != setting:
            raise DGQError(f"--resume: {out} was measured with other settings ({json.dumps(was, sort_keys=True)}), "
                           f"not {json.dumps(setting, sort_keys=True)}; use another folder")
        done = {r["method"] for r in results}
        rows = [(name, cfg) for name, cfg in rows if name not in done]
        log(f"resuming {out}: {len(results)} row(s) kept, {len(rows)} to run")
        fp = {"ppl": results[0]["ppl"]}
    else:
        t0 = time.perf_counter()
        fp = perplexity_of_ids(base, ids, seqlen, bos, progress)
        results = [{"method": "fp", "w_bits": 16, "a_bits": 16, "group_size": None, "ppl": round(fp["ppl"], 4),
                    "delta_ppl_pct": 0.0, "quant_seconds": 0.0, "peak_rss_mb": None, "checkpoint_bytes": None,
                    "bits_per_weight": 16.0, "eval_seconds": round(time.perf_counter() - t0, 1), "config": None,
                    "date": machine_info().get("date")}]
        meta = {**setting, "eval": {**setting["eval"], "windows": fp["windows"]}, "defaults": defaults,
                "machine": machine_info()}
        log(f"{'fp':24s} ppl {fp['ppl']:8.4f}")
        _write(out, meta, results)
    for index, (name, cfg) in enumerate(rows, len(results)):
        model = copy.deepcopy(base)
        gc.collect()
        with PeakRSS() as rss:
            tq = time.perf_counter()
            quantize(model, cfg, calib=windows, progress=progress)
            qs = time.perf_counter() - tq
            path = checkpoint_dir(out, index, name)
            checkpoint.save(model, path, tokenizer=tok, overwrite=True)
        del model
        gc.collect()
        size = sum(f.stat().st_size for f in path.glob("*.safetensors"))
        back = checkpoint.load(path, device=str(next(base.parameters()).device))  # evaluated where FP was
        te = time.perf_counter()
        r = perplexity_of_ids(back, ids, seqlen, bos, progress)
        w_bits, a_bits = cfg.bits
        row = {"method": name, "w_bits": w_bits, "a_bits": a_bits,
               "group_size": None if cfg.format == "w8a8" else back.dgq_config["group_size"],
               "ppl": round(r["ppl"], 4),
               "delta_ppl_pct": round(100 * (r["ppl"] / fp["ppl"] - 1), 2), "quant_seconds": round(qs, 1),
               "peak_rss_mb": round(rss.peak / 2**20), "checkpoint_bytes": size,
               "bits_per_weight": quantized_bits_per_weight(back), "eval_seconds": round(time.perf_counter() - te, 1),
               "format": cfg.format, "config": back.dgq_config["recipe"], "date": machine_info().get("date")}
        results.append(row)
        del back
        if not keep_checkpoints:
            shutil.rmtree(path, ignore_errors=True)
        log(f"{name:24s} ppl {row['ppl']:8.4f}  ({row['delta_ppl_pct']:+.2f}%)  W{w_bits}A{a_bits}  "
            f"quantize {qs:6.1f} s  peak RSS {row['peak_rss_mb']} MB")
        _write(out, meta, results)
    if not keep_checkpoints and (out / "checkpoints").is_dir() and not any((out / "checkpoints").iterdir()):
        (out / "checkpoints").rmdir()
    _plot(out, meta, results)
    return results


def _previous(out: Path) -> tuple[dict, list[dict]] | None:
    """The earlier report in ``out`` (meta, rows), or None where there is none yet."""
    path = out / "results.json"
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
        meta = {k: v for k, v in doc.items() if k != "results"}
        results = list(doc["results"])
        if not results or results[0].get("method") != "fp" or not all("method" in r for r in results):
            raise ValueError("no fp row")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DGQError(f"--resume: {path} is not a dgq compare report ({type(e).__name__}: {e})") from None
    return meta, results


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
    try:  # the optional "plot" extra; the Figure API needs no backend and leaves pyplot's global state alone
        from matplotlib import colormaps
        from matplotlib.figure import Figure
    except ImportError:
        print("dgq compare: matplotlib is not installed; skipped ppl_vs_bits.png (pip install matplotlib)")
        return
    fig = Figure(figsize=(9, 5))
    ax = fig.subplots()
    fp = results[0]["ppl"]
    ax.axhline(fp, color="gray", ls="--", lw=1, label=f"fp: {fp:.2f}")
    top = fp * 1.5  # rows above this are listed in the legend and drawn at the top edge
    for i, r in enumerate(results[1:]):
        y = min(r["ppl"], top)
        ax.scatter(r["bits_per_weight"], y, s=55, color=colormaps["tab20"](i % 20), zorder=3,
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
