"""Where a DGQ checkpoint's int8 activations cost perplexity: the same quantized weights evaluated with every
layer's activations in int8 (as executed), with all of them in float (the weights' share), and with one layer type's
activations in float at a time (that type's int8 share).

    python benchmarks/act_ablation.py CKPT --out benchmarks/results/act_ablation_MODEL.json [--no-per-type]

``--no-per-type`` scores only the int8 and all-float rows (the weights' share), in a third of the time.

The text and windows are ``dgq compare``'s (WikiText-2 test, 32 × 1024 tokens), so the "int8" row reproduces the
checkpoint's compare row.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(__file__))
import dgq  # noqa: E402
from _common import machine_info  # noqa: E402
from dgq.formats import DGQLinear  # noqa: E402

GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",), "gate_up": ("gate_proj", "up_proj"),
          "down": ("down_proj",)}


def set_float(model, kinds: tuple[str, ...]) -> int:
    """Activations of the DGQ layers whose name ends with one of ``kinds`` in float, the others in int8."""
    n = 0
    for name, m in model.named_modules():
        if isinstance(m, DGQLinear):
            fl = name.rsplit(".", 1)[-1] in kinds
            m.act_mode = "none" if fl else m.dgq_act_mode
            n += fl
    return n


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("checkpoint")
    ap.add_argument("--text", default="../shared/data/wikitext-2/test.txt")
    ap.add_argument("--max-tokens", type=int, default=32768)
    ap.add_argument("--seqlen", type=int, default=1024)
    ap.add_argument("--out", required=True)
    ap.add_argument("--no-per-type", action="store_true", help="only the int8 and all-float rows")
    a = ap.parse_args()
    model = dgq.load(a.checkpoint, fuse=False)
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(a.checkpoint)
    for m in model.modules():
        if isinstance(m, DGQLinear):
            m.dgq_act_mode = m.act_mode
    variants = {"int8 (as executed)": (), "float (all)": tuple(k for g in GROUPS.values() for k in g)}
    if not a.no_per_type:
        variants.update({f"float {g} only": kinds for g, kinds in GROUPS.items()})
    rows = []
    for label, kinds in variants.items():
        n = set_float(model, kinds)
        t0 = time.perf_counter()
        r = dgq.perplexity(model, tok, a.text, seqlen=a.seqlen, max_tokens=a.max_tokens, progress=False)
        rows.append({"activations": label, "float_layers": n, "ppl": round(r["ppl"], 4),
                     "seconds": round(time.perf_counter() - t0, 1)})
        print(json.dumps(rows[-1]), flush=True)
    base, flt = rows[0]["ppl"], rows[1]["ppl"]
    for r in rows[2:]:
        r["share_of_int8_cost"] = round((base - r["ppl"]) / (base - flt), 3) if base != flt else None
    out = {"checkpoint": os.path.basename(os.path.normpath(a.checkpoint)),
           "recipe": json.load(open(os.path.join(a.checkpoint, "config.json")))["quantization_config"]["recipe"],
           "text": a.text, "max_tokens": a.max_tokens, "seqlen": a.seqlen, "machine": machine_info(), "rows": rows}
    with open(a.out, "w") as f:
        f.write(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
