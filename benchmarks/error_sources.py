"""Where a quantized model's error comes from, read from its checkpoints' calibration logs (no model is loaded):
per layer type, the mean relative output error on sampled calibration tokens of the weights alone (``w4``), of the
int8 activations alone (``a8``) and of both as executed (``a8w4``), and the per-block output error.

    python benchmarks/error_sources.py CKPT [CKPT ...] --out benchmarks/results/error_sources_MODEL.json

The layers' errors are those of :func:`dgq.calib.relative_errors` (the method's own layers on the inputs of the
already-quantized blocks); the same fields as ``error_sources`` in ``quality.json``.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine_info  # noqa: E402
from quality import error_sources  # noqa: E402


def summarize(ckpt: Path) -> dict:
    q = json.loads((ckpt / "config.json").read_text())["quantization_config"]
    log = q.get("calibration")
    if not log:
        raise SystemExit(f"{ckpt}: no calibration log (a data-free method?)")
    out = {"checkpoint": ckpt.name, "method": q["recipe"]["method"], "recipe": q["recipe"], **error_sources(log)}
    kept = [d["kept"] for b in log["blocks"] for d in b.get("selective", {}).values()]
    if kept:
        out["folds_kept"] = f"{sum(kept)}/{len(kept)}"
    out["smoothed_blocks"] = sum(1 for b in log["blocks"] if b.get("smoothed"))
    return out


def markdown(rows: list[dict]) -> str:
    kinds = sorted({k for r in rows for k in r["per_layer_type"]})
    lines = ["| checkpoint | " + " | ".join(k.split(".")[-1] for k in kinds) + " | mean block error | worst blocks |",
             "|---|" + "---|" * (len(kinds) + 2)]
    for r in rows:
        cells = []
        for k in kinds:
            e = r["per_layer_type"].get(k, {})
            cells.append(" / ".join(f"{e[x]:.3f}" for x in ("w4", "a8", "a8w4") if x in e))
        blocks = r["block_output_rel_error"]
        lines.append(f"| {r['checkpoint']} | " + " | ".join(cells) + f" | {sum(blocks) / len(blocks):.4f} | "
                     f"{r['worst_blocks']} |")
    return "\n".join(lines) + "\n\ncells: w4 / a8 / a8w4 relative output errors (mean over blocks)\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoints", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, required=True)
    a = ap.parse_args()
    rows = [summarize(c) for c in a.checkpoints]
    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(json.dumps({"machine": machine_info(), "rows": rows}, indent=2) + "\n")
    print(markdown(rows))


if __name__ == "__main__":
    main()
