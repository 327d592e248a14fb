"""End-to-end CPU speed of the real SmolLM2-135M: fp32 vs DGQ A8W4 (CPU ``torch._int_mm`` kernel), each linear
alone vs with sibling fusion (``dgq.fuse_siblings``: q/k/v and gate/up as one GEMM, input quantized once; the
default of ``dgq.load``). Speed does not depend on the quantization method, so the weights are rtn (data free).

Prefill: one forward over B x T random tokens (no cache, logits of the last position).
Decode: a P-token prompt, then S greedy single-token steps with the transformers DynamicCache, eager, batch B;
tokens/s = B*S / time of the steps. Fresh random tokens for every run; the fused and unfused DGQ runs alternate
(fusion switched on and off between runs of the same model), median of the repeats.

    python benchmarks/cpu_e2e.py [--out benchmarks/results/cpu_e2e.json]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
import dgq  # noqa: E402
from _common import machine_info  # noqa: E402


@torch.no_grad()
def prefill_once(model, batch, seq, vocab) -> float:
    ids = torch.randint(0, vocab, (batch, seq))
    t = time.perf_counter()
    model(input_ids=ids, use_cache=False, logits_to_keep=1)
    return batch * seq / (time.perf_counter() - t)


@torch.no_grad()
def decode_once(model, batch, prompt, steps, vocab) -> float:
    from transformers import DynamicCache

    cache = DynamicCache()
    out = model(input_ids=torch.randint(0, vocab, (batch, prompt)), past_key_values=cache, use_cache=True)
    tok = out.logits[:, -1:].argmax(-1)
    t = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=tok, past_key_values=cache, use_cache=True)
        tok = out.logits[:, -1:].argmax(-1)
    return batch * steps / (time.perf_counter() - t)


def workloads(a):
    w = {f"prefill_{b}x{s}": (lambda m, v, b=b, s=s: prefill_once(m, b, s, v)) for b, s in ((1, 512), (4, 256))}
    w.update({f"decode_b{b}": (lambda m, v, b=b: decode_once(m, b, a.prompt, a.steps, v)) for b in (1, 8)})
    return w


def measure(model, vocab, a, variants: dict) -> dict:
    """tokens/s per variant and workload: the variants (name -> setup function) alternate run by run, so slow
    phases of a shared machine hit all of them alike; one warm-up run each, then the median of ``a.repeats``."""
    res = {name: {} for name in variants}
    for wname, fn in workloads(a).items():
        rates = {name: [] for name in variants}
        for r in range(a.repeats + 1):
            for name, setup in variants.items():
                setup()
                rate = fn(model, vocab)
                if r:
                    rates[name].append(rate)
        for name in variants:
            res[name][wname] = {"tokens_per_s": round(statistics.median(rates[name]), 1),
                                "runs": [round(x, 1) for x in rates[name]]}
            print(f"{name:16s} {wname:14s} {res[name][wname]['tokens_per_s']:9.1f} tok/s", flush=True)
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--group-size", type=int, default=64)
    ap.add_argument("--prompt", type=int, default=64)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--out", default="benchmarks/results/cpu_e2e.json")
    a = ap.parse_args()
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers renames past_key_values in 5.40
    torch.manual_seed(0)
    t0 = time.time()
    model, _ = dgq.load_model(a.model)
    vocab = model.config.vocab_size
    rows = measure(model, vocab, a, {"fp32": lambda: None})
    dgq.quantize(model, dgq.DGQConfig(method="rtn", group_size=a.group_size), progress=False)
    groups = sum(why is None for _, why in dgq.fuse_siblings(model))
    rows.update(measure(model, vocab, a, {"dgq_a8w4": lambda: dgq.unfuse(model),
                                          "dgq_a8w4_fused": lambda: dgq.fuse_siblings(model)}))
    speed = {v: {k: round(rows[v][k]["tokens_per_s"] / rows["fp32"][k]["tokens_per_s"], 3) for k in rows["fp32"]}
             for v in ("dgq_a8w4", "dgq_a8w4_fused")}
    out = {"machine": machine_info(), "model": a.model, "kernel": "cpu-int-mm (torch._int_mm, cached int8 weight)",
           "dgq": f"rtn A8W4, group {a.group_size}, dynamic per-token activations, every decoder linear",
           "fused_groups": groups, "results": rows, "speedup_vs_fp32": speed, "seconds": round(time.time() - t0, 1)}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{'':16}{'fp32':>10}{'dgq':>10}{'x':>7}{'fused':>10}{'x':>7}   (tokens/s, {machine_info()['cpu']})")
    for k in rows["fp32"]:
        f, d, u = (rows[v][k]["tokens_per_s"] for v in ("fp32", "dgq_a8w4", "dgq_a8w4_fused"))
        print(f"{k:16}{f:10.1f}{d:10.1f}{d / f:7.2f}{u:10.1f}{u / f:7.2f}")


if __name__ == "__main__":
    main()
