"""Weight-side error of each quantizer on real layers, without running a whole model: for chosen blocks, every
linear's input Hessian over all calibration tokens (float inputs: blocks before are *not* quantized), then each
quantizer's relative output error ``Σ dᵀHd / Σ wᵀHw`` (``d = w − ŵ``) on the same ``H``.

A quick proxy for perplexity runs that take an hour on a 2-core CPU; it isolates the weight side (no int8
activations, no error carried between blocks). Variants: ``rtn`` (DGQ format, data-free), ``dgq`` (the two-phase
search), ``w4-search`` (the search's phase 1 with free float group scales: what the integer ``s_int`` costs),
``gptq`` / ``gptq-ao`` (W4A16, published; with act-order), ``dgq-gptq`` (its default recipe) and
``dgq-gptq-rtn-grid`` (with ``rtn_grid=True``).

    python benchmarks/layer_errors.py --model qwen2.5-coder-0.5b --blocks 1,21 --group-size 128 \
        --out benchmarks/results/layer_errors_qwen.json
"""

import argparse
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import add_layer_args, float_blocks, machine_info  # noqa: E402
from dgq import DGQConfig  # noqa: E402
from dgq.calib import collect_stats  # noqa: E402
from dgq.methods import resolve  # noqa: E402
from dgq.methods.dgq import dgq_weight  # noqa: E402
from dgq.methods.dgq_gptq import dgq_gptq_weight  # noqa: E402
from dgq.methods.gptq import gptq_w4_weight  # noqa: E402
from dgq.models import load_model  # noqa: E402
from dgq.quant.rtn import rtn_quantize  # noqa: E402
from dgq.quant.search import output_error, phase1  # noqa: E402

VARIANTS = ("rtn", "dgq", "w4-search", "gptq", "gptq-ao", "dgq-gptq", "dgq-gptq-rtn-grid")


def w4_search(w, h, g):
    s, z = phase1(w, h, g)
    n, k = w.shape
    q = torch.clamp(torch.round(w.view(n, k // g, g) / s[..., None]) + z[..., None], 0, 15)
    return (s[..., None] * (q - z[..., None])).view(n, k)


def quantize(variant, w, h, h_tok, g):
    cfg = lambda method, **kw: resolve(DGQConfig(method=method, group_size=g, **kw))  # noqa: E731
    if variant == "rtn":
        return rtn_quantize(w, g).dequantize()
    if variant == "dgq":
        return dgq_weight(w, h, g, cfg("dgq")).dequantize()
    if variant == "w4-search":
        return w4_search(w, h, g)
    if variant in ("gptq", "gptq-ao"):
        return gptq_w4_weight(w, h, g, cfg("gptq", act_order=variant == "gptq-ao")).dequantize()
    c = cfg("dgq-gptq", rtn_grid=variant == "dgq-gptq-rtn-grid")
    return dgq_gptq_weight(w, h, g, c, h_tok)[0].dequantize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_layer_args(ap)
    ap.add_argument("--nsamples", type=int, default=16)
    ap.add_argument("--variants", default=",".join(VARIANTS))
    a = ap.parse_args()
    blocks = [int(b) for b in a.blocks.split(",")]
    variants = a.variants.split(",")
    model, tok = load_model(a.model)
    rows, seconds = [], {v: 0.0 for v in variants}
    for i, block, hidden, kwargs in float_blocks(model, tok, blocks, a.calib, a.nsamples, a.seqlen):
        names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
        stats, _ = collect_stats(block, names, hidden, kwargs, 64, 0, i, "cpu", full_hessian=True, token_hessian=True)
        for n in names:
            w = block.get_submodule(n).weight.detach().float()
            h, h_tok = stats[n].hessian(), stats[n].token_hessian()
            ref = output_error(w, torch.zeros_like(w), h).sum()
            row = {"block": i, "layer": n}
            for v in variants:
                t = time.perf_counter()
                w_hat = quantize(v, w, h, h_tok, a.group_size)
                seconds[v] += time.perf_counter() - t
                row[v] = round(float(output_error(w, w_hat, h).sum() / ref), 6)
            rows.append(row)
            print(row, flush=True)
    geo = {v: round(math.exp(sum(math.log(r[v]) for r in rows) / len(rows)), 6) for v in variants}
    out = {"model": a.model, "group_size": a.group_size, "blocks": blocks, "calibration": {
        "text": a.calib, "nsamples": a.nsamples, "seqlen": a.seqlen}, "machine": machine_info(),
        "metric": "relative output error sum(d^T H d) / sum(w^T H w), H over every calibration token, float inputs",
        "geomean": geo, "seconds": {v: round(s, 1) for v, s in seconds.items()}, "rows": rows}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(geo))


if __name__ == "__main__":
    main()
