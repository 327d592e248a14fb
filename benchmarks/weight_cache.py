"""What the CPU kernel's weight cache buys and costs: one DGQ A8W4 linear of Llama-2-7B's shapes with the expanded
weight kept between calls (``cache_weights=True``, the default) against expanded per call (``dgq.load(...,
cache_weights=False)``, ``--no-weight-cache``), median of torch.utils.benchmark timings over rotated random inputs,
and the bytes the cache holds per layer and for a whole 7B model (32 blocks of q/k/v/o 4096², gate/up 11008×4096,
down 4096×11008).

    python benchmarks/weight_cache.py [--out benchmarks/results/weight_cache.json]
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine_info  # noqa: E402
from cpu_linear import bench  # noqa: E402  (median over rotated inputs)
from dgq import DGQLinear  # noqa: E402
from dgq.kernels import KERNELS  # noqa: E402
from dgq.quant.rtn import rtn_quantize  # noqa: E402

SHAPES = {"q/k/v/o_proj 4096x4096": (4096, 4096), "gate/up_proj 11008x4096": (11008, 4096),
          "down_proj 4096x11008": (4096, 11008)}
PER_BLOCK = {"q/k/v/o_proj 4096x4096": 4, "gate/up_proj 11008x4096": 2, "down_proj 4096x11008": 1}
MS = (1, 16, 256)
KERNEL = next(k for k in KERNELS if k.name == "cpu-int-mm")


def cache_bytes(layer) -> int:
    return sum(t.numel() * t.element_size() for t in layer.kernel_cache.values() if isinstance(t, torch.Tensor))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/weight_cache.json")
    ap.add_argument("--min-run-time", type=float, default=1.0)
    a = ap.parse_args()
    torch.manual_seed(0)
    strategy = KERNEL.strategy
    rows, cached, packed = [], 0, 0
    with torch.no_grad():
        for name, (n, k) in SHAPES.items():
            qw = rtn_quantize(torch.randn(n, k) * 0.02, 128)
            for cache in (True, False):
                q = DGQLinear.from_weight(qw)
                q.cache_weights = cache
                for m in MS:
                    xs = [torch.randn(m, k) for _ in range(4)]
                    q(xs[0])  # with the cache on: expands once
                    t = bench(q, xs, a.min_run_time)
                    row = {"shape": name, "N": n, "K": k, "M": m, "cache_weights": cache, "ms": round(t * 1e3, 3),
                           "cache_bytes": cache_bytes(q)}
                    rows.append(row)
                    print(f"{name:26s} cache={cache!s:5s} M={m:4d} {row['ms']:9.3f} ms", flush=True)
            on = next(r for r in rows if r["shape"] == name and r["cache_weights"])
            cached += PER_BLOCK[name] * 32 * on["cache_bytes"]
            packed += PER_BLOCK[name] * 32 * sum(t.numel() * t.element_size() for t in q.state_dict().values())
    for r in rows:
        if not r["cache_weights"]:
            on = next(x for x in rows if x["shape"] == r["shape"] and x["M"] == r["M"] and x["cache_weights"])
            r["slowdown_vs_cached"] = round(r["ms"] / on["ms"], 2)
    out = {"machine": machine_info(), "cpu_strategy": strategy, "group_size": 128,
           "cache_gb_7b_linears": round(cached / 1e9, 2), "stored_gb_7b_linears": round(packed / 1e9, 2),
           "results": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(json.dumps({k: v for k, v in out.items() if k != "results"}, indent=1))


if __name__ == "__main__":
    main()
