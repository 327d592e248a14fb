"""Perplexity of SmolLM2-135M: FP vs DGQ A8W4 (rtn and calibrated dgq with its ablations), group 64.

    python benchmarks/quality.py [--rows fp,rtn,dgq-dyn,...] [--out benchmarks/results/quality.json]

Harness (the project's issues): calibrate on WikiText-2 valid.txt (random windows, seed 0), evaluate on test.txt,
first 32,768 tokens, non-overlapping windows of 1,024 (SmolLM2 adds no BOS). Rows are written to the JSON as they
finish, so a long run keeps what it measured; existing rows of the same name are replaced.
"""

import argparse
import dataclasses
import json
import os
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
import dgq  # noqa: E402
from _common import machine_info  # noqa: E402
from dgq import DGQConfig  # noqa: E402
from dgq.data import calibration_windows  # noqa: E402

WIKI = Path(__file__).resolve().parents[2] / "shared" / "data" / "wikitext-2"
G = 64


def dgq_cfg(act="dynamic", **kw):
    return DGQConfig(method="dgq", group_size=G, act=act, **kw)


ROWS = {
    "fp": None,
    "rtn": DGQConfig(method="rtn", group_size=G),
    "rtn-ceil": DGQConfig(method="rtn", group_size=G, s_int_rounding="ceil"),
    # DGQ-format (integer group scales) weight-only rows; the standard float-scale RTN W4A16 is in `dgq compare`
    "rtn-w4a16": DGQConfig(method="rtn", group_size=G, weights_only=True, format="dgq"),
    "rtn-ceil-w4a16": DGQConfig(method="rtn", group_size=G, weights_only=True, s_int_rounding="ceil",
                                format="dgq"),
    # the ablation matrix: smoothing on/off x static/dynamic x phase 1 only / both phases
    "dgq-dyn": dgq_cfg("dynamic", smooth=True),
    "dgq-dyn-nosmooth": dgq_cfg("dynamic", smooth=False),
    "dgq-dyn-phase1": dgq_cfg("dynamic", smooth=True, phase2=False),
    "dgq-dyn-nosmooth-phase1": dgq_cfg("dynamic", smooth=False, phase2=False),
    "dgq-static": dgq_cfg("static", smooth=True),
    "dgq-static-nosmooth": dgq_cfg("static", smooth=False),
    "dgq-static-phase1": dgq_cfg("static", smooth=True, phase2=False),
    "dgq-static-nosmooth-phase1": dgq_cfg("static", smooth=False, phase2=False),
    "dgq-dyn-selective": dgq_cfg("dynamic", smooth="selective"),
    "dgq-static-selective": dgq_cfg("static", smooth="selective"),
    # measured smoothing: a fold kept only where the consumers quantized by the search itself do better (#17)
    "dgq-dyn-measured": dgq_cfg("dynamic", smooth="measured"),
    "dgq-static-measured": dgq_cfg("static", smooth="measured"),
    "dgq-gptq-measured": DGQConfig(method="dgq-gptq", group_size=G, smooth="measured"),
    "dgq-dyn-nosearch": dgq_cfg("dynamic", smooth=True, search=False),
    "dgq-static-nosearch": dgq_cfg("static", smooth=True, search=False),
    "dgq-w4a16": DGQConfig(method="dgq", group_size=G, weights_only=True, smooth=False),
    "dgq-gptq": DGQConfig(method="dgq-gptq", group_size=G, act_order=False),  # as committed before act-order
    # became dgq-gptq's default; "dgq-gptq-act-order" is the default now
    "dgq-gptq-w4a16": DGQConfig(method="dgq-gptq", group_size=G, weights_only=True),
    "dgq-gptq-act-order": DGQConfig(method="dgq-gptq", group_size=G, act_order=True),
}


def error_sources(log: dict) -> dict:
    """Mean relative output error per layer type: weight-only (W4), activations-only (A8), both (A8W4)."""
    acc: dict = {}
    for b in log["blocks"]:
        for name, e in b["linears"].items():
            d = acc.setdefault(name, {k: [] for k in e})
            for k, v in e.items():
                d[k].append(v)
    out = {n: {k: round(sum(v) / len(v), 4) for k, v in d.items()} for n, d in acc.items()}
    blocks = [b["block_output_rel_error"] for b in log["blocks"]]
    worst = sorted(range(len(blocks)), key=lambda i: -blocks[i])[:5]
    return {"per_layer_type": out, "block_output_rel_error": blocks, "worst_blocks": worst}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rows", default="fp,rtn,dgq-dyn,dgq-static")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--wiki", default=str(WIKI))
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--calib-seqlen", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--out", default="benchmarks/results/quality.json")
    ap.add_argument("--group-size", type=int, default=G, help=f"every row's group size (default {G}: SmolLM2's "
                    "weights sit on a group-32 grid; 128 for Qwen2.5-Coder)")
    a = ap.parse_args()
    out_path = Path(a.out)
    prev = json.loads(out_path.read_text()) if out_path.exists() else {}
    results = {r["row"]: r for r in prev.get("results", [])}
    test, valid = str(Path(a.wiki) / "test.txt"), str(Path(a.wiki) / "valid.txt")
    for row in a.rows.split(","):
        cfg = ROWS[row] if ROWS[row] is None else dataclasses.replace(ROWS[row], group_size=a.group_size)
        model, tok = dgq.load_model(a.model)
        t0 = time.perf_counter()
        calib = None
        if cfg is not None:
            if cfg.method != "rtn" or cfg.act == "static" and not cfg.weights_only:
                calib = calibration_windows(valid, tok, a.nsamples, a.calib_seqlen, cfg.seed)
            dgq.quantize(model, cfg, calib=calib)
        qs = time.perf_counter() - t0
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        r = dgq.perplexity(model, tok, test, seqlen=a.seqlen, max_tokens=a.max_tokens, progress=False)
        rec = {"row": row, "ppl": round(r["ppl"], 4), "quant_seconds": round(qs, 1), "peak_rss_mb": round(rss),
               "eval_seconds": r["elapsed_s"], "tokens": r["tokens"], "seqlen": a.seqlen,
               "config": None if cfg is None else dgq.methods.resolve(cfg).__dict__,
               "calibration": None if calib is None else {"windows": a.nsamples, "seqlen": a.calib_seqlen,
                                                          "text": "wikitext-2 valid.txt"}}
        log = (getattr(model, "dgq_config", None) or {}).get("calibration")
        if log:
            rec["error_sources"] = error_sources(log)
        results[row] = rec
        fp = results.get("fp", {}).get("ppl")
        for x in results.values():
            x["delta_ppl_pct"] = None if fp is None else round(100 * (x["ppl"] / fp - 1), 2)
        doc = {"model": a.model, "group_size": a.group_size,
               "eval": {"text": "wikitext-2 test.txt", "max_tokens": a.max_tokens, "seqlen": a.seqlen},
               "machine": machine_info(), "results": list(results.values())}
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(doc, indent=2) + "\n")
        print(f"{row:28s} ppl {rec['ppl']:.4f}  quantize {qs:6.1f} s  rss {rss:5.0f} MB  eval {r['elapsed_s']} s",
              flush=True)
        del model


if __name__ == "__main__":
    main()
