"""Which A8W4 levers survive held-out tokens: per real layer, the mean per-token squared relative output error on
calibration windows the quantizer did *not* see (fit on the first ``--fit-windows``, score on the next
``--test-windows``), with int8 per-token activations as dgq executes them (``a8w4``) and without (``w4``).

Variants, all on the same layers and tokens:

- ``a8``: float weights, int8 activations (what the activations alone cost);
- ``dgq`` (the two-phase search), ``dgq-gptq`` (its default recipe) at each GPTQ ``--damps`` value, and the W4A16
  peer ``gptq-ao`` (act-order, published Hessian) at the same values;
- ``dgq-gptq-fit``: dgq-gptq's error on its own fitting tokens (the gap to ``dgq-gptq`` is overfitting);
- ``ls``: the weights fitted by least squares to the int8 inputs (``A = W + W·C·(Ĥ + λI)⁻¹``, ``C = Σ (x − x̂)ᵀx̂``,
  ``Ĥ = Σ x̂ᵀx̂``, token-normalised; GPTAQ-style asymmetric calibration), then dgq-gptq on ``A`` under ``Ĥ``;
- ``sq0.3`` / ``sq0.5`` (down_proj only): SmoothQuant's α-smoothing of its input (``f = max|x|^α / max|W|^(1−α)``
  from the fitting tokens), folded into up_proj's rows (exact; up_proj's per-row grid is unaffected by it), then
  dgq-gptq on the scaled weights;
- ``rot`` (v_proj and o_proj only): a Hadamard rotation of each attention head folded into v_proj's rows and
  o_proj's columns (exact in float), then dgq-gptq on the rotated weights.

Blocks before the chosen ones run in float (no error carried), as in ``layer_errors.py``.

    python benchmarks/heldout_errors.py --model qwen2.5-coder-0.5b --blocks 1,21 --group-size 128 \
        --out benchmarks/results/heldout_errors_qwen.json
"""

import argparse
import json
import math
import os
import sys
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import add_layer_args, float_blocks, machine_info  # noqa: E402
from dgq import DGQConfig  # noqa: E402
from dgq.calib import run_block, token_relative_error, watch_inputs  # noqa: E402
from dgq.formats.act import quantize_per_token  # noqa: E402
from dgq.methods import resolve  # noqa: E402
from dgq.methods.dgq import dgq_weight  # noqa: E402
from dgq.methods.dgq_gptq import dgq_gptq_weight  # noqa: E402
from dgq.methods.gptq import gptq_w4_weight  # noqa: E402
from dgq.models import load_model  # noqa: E402
from dgq.quant.rotate import hadamard, rotate_columns, rotate_rows  # noqa: E402
from dgq.quant.smooth import smoothquant_factors  # noqa: E402


def int8_tokens(x):
    x8, s = quantize_per_token(x)
    return x8.float() * s[:, None]


def token_error(x, w, xq, w_hat):
    """Mean over tokens of ‖x·wᵀ − x̂·ŵᵀ‖² / ‖x·wᵀ‖² (calibration's own block criterion)."""
    return token_relative_error(xq @ w_hat.T, x @ w.T)


def hessians(x, xq=None):
    """Plain ``XᵀX/T`` and token-normalised ``X̂ₙᵀX̂ₙ/T`` (of ``xq`` when given, normalised by ``x``'s norms), in
    float64 for the sums."""
    xd = x.double()
    nrm = xd.norm(dim=1, keepdim=True).clamp_min(1e-12)
    t = x.shape[0]
    src = xd if xq is None else xq.double()
    return (src.T @ src / t).float(), ((src / nrm).T @ (src / nrm) / t).float()


def dgq_gptq(w, h, h_tok, g, cfg, qw=None):
    return dgq_gptq_weight(w, h, g, cfg, h_tok, qw)[0].dequantize()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_layer_args(ap)
    ap.add_argument("--fit-windows", type=int, default=32)
    ap.add_argument("--test-windows", type=int, default=8)
    ap.add_argument("--damps", default="0.01,0.03,0.1")
    ap.add_argument("--ls-damp", type=float, default=0.01)
    a = ap.parse_args()
    blocks = [int(b) for b in a.blocks.split(",")]
    damps = [float(d) for d in a.damps.split(",")]
    g = a.group_size
    model, tok = load_model(a.model)
    mc = model.config
    head = getattr(mc, "head_dim", None) or mc.hidden_size // mc.num_attention_heads
    rot = hadamard(head)  # plain Sylvester (no random signs), as in the committed results
    cfg = resolve(DGQConfig(method="dgq-gptq", group_size=g))
    gcfg = resolve(DGQConfig(method="gptq", group_size=g, act_order=True))
    n_fit = a.fit_windows * a.seqlen
    rows = []
    t_start = time.perf_counter()
    for i, block, hidden, kwargs in float_blocks(model, tok, blocks, a.calib, a.fit_windows + a.test_windows,
                                                 a.seqlen):
        names = [n for n, m in block.named_modules() if isinstance(m, torch.nn.Linear)]
        xs: dict = {}
        with watch_inputs(block, names, lambda n, x, xs=xs: xs.setdefault(n, []).append(
                x.detach().reshape(-1, x.shape[-1]).float().clone())):
            run_block(block, hidden, kwargs, "cpu")
        for n in names:
            x_all = torch.cat(xs.pop(n))
            x, xt = x_all[:n_fit], x_all[n_fit:]
            del x_all
            xtq = int8_tokens(xt)
            w = block.get_submodule(n).weight.detach().float()
            h, h_tok = hessians(x)
            row = {"block": i, "layer": n, "a8": token_error(xt, w, xtq, w)}

            def score(key, w_ref, w_hat, x_test=xt, x_test_q=xtq, row=row):
                row[key] = {"w4": token_error(x_test, w_ref, x_test, w_hat),
                            "a8w4": token_error(x_test, w_ref, x_test_q, w_hat)}

            qw = dgq_weight(w, h, g, cfg)
            score("dgq", w, qw.dequantize())
            for d in damps:
                w_hat = dgq_gptq(w, h, h_tok, g, replace(cfg, damp=d), qw)
                score(f"dgq-gptq damp={d}", w, w_hat)
                if d == cfg.damp:
                    row["dgq-gptq-fit"] = {"w4": token_error(x, w, x, w_hat)}
                score(f"gptq-ao damp={d}", w, gptq_w4_weight(w, h, g, replace(gcfg, damp=d)).dequantize())
            # least squares against the int8 inputs (asymmetric calibration)
            xq = int8_tokens(x)
            hq, hq_tok = hessians(x, xq)
            nrm = x.double().norm(dim=1, keepdim=True).clamp_min(1e-12)
            c = ((x.double() - xq.double()) / nrm).T @ (xq.double() / nrm) / x.shape[0]
            m = hq_tok.double() + a.ls_damp * hq_tok.double().diagonal().mean() * torch.eye(w.shape[1],
                                                                                             dtype=torch.float64)
            w_ls = (w.double() + w.double() @ c @ torch.linalg.inv(m)).float()
            row["ls"] = {"a8": token_error(xt, w, xtq, w_ls), "a8_fit": token_error(x, w, xq, w_ls),
                         "a8_fit_plain_w": token_error(x, w, xq, w),
                         "a8w4": token_error(xt, w, xtq, dgq_gptq(w_ls, hq, hq_tok, g, cfg))}
            del xq, hq, hq_tok, c, m, w_ls
            if n.endswith("down_proj"):
                for alpha in (0.3, 0.5):
                    f = smoothquant_factors(x.abs().amax(0), [w], alpha)
                    f = f / f.mean()  # the fold is scale-free; keeps the numbers readable
                    w_s, x_s, xt_s = w * f[None, :], x / f, xt / f
                    h_s, h_s_tok = hessians(x_s)
                    xt_sq = int8_tokens(xt_s)
                    score(f"sq{alpha}", w_s, dgq_gptq(w_s, h_s, h_s_tok, g, cfg), xt_s, xt_sq)
                    row[f"sq{alpha}"]["a8"] = token_error(xt_s, w_s, xt_sq, w_s)
                    del w_s, x_s, xt_s, h_s, h_s_tok, xt_sq
            if n.endswith("v_proj") or n.endswith("o_proj"):
                if n.endswith("o_proj"):  # columns of each head rotated; its input rotated the same way
                    w_r, x_r, xt_r = rotate_columns(w, rot), rotate_columns(x, rot), rotate_columns(xt, rot)
                else:  # rows of each head rotated (outputs compared in the rotated basis: same norms)
                    w_r = rotate_rows(w, rot)
                    x_r, xt_r = x, xt
                h_r, h_r_tok = hessians(x_r)
                xt_rq = int8_tokens(xt_r)
                score("rot", w_r, dgq_gptq(w_r, h_r, h_r_tok, g, cfg), xt_r, xt_rq)
                row["rot"]["a8"] = token_error(xt_r, w_r, xt_rq, w_r)
            rows.append(row)
            print(json.dumps(row), flush=True)
            del x, xt, xtq
    keys = sorted({(k, m) for r in rows for k, v in r.items() if isinstance(v, dict) for m in v})
    geo = {}
    for k, m in keys:
        vals = [r[k][m] for r in rows if k in r]
        geo.setdefault(k, {})[m] = round(math.exp(sum(math.log(v) for v in vals) / len(vals)), 6)
    geo["a8"] = round(math.exp(sum(math.log(r["a8"]) for r in rows) / len(rows)), 6)
    out = {"model": a.model, "group_size": g, "blocks": blocks,
           "calibration": {"text": a.calib, "fit_windows": a.fit_windows, "test_windows": a.test_windows,
                           "seqlen": a.seqlen},
           "metric": "mean over held-out tokens of ||x W^T - x_hat W_hat^T||^2 / ||x W^T||^2 (x_hat: int8 per "
                     "token for a8/a8w4, float for w4); float inputs (earlier blocks not quantized)",
           "machine": machine_info(), "seconds": round(time.perf_counter() - t_start, 1),
           "geomean": geo, "rows": rows}
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(geo))


if __name__ == "__main__":
    main()
