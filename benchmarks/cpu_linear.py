"""DGQLinear on the CPU (torch._int_mm path, dynamic per-token activation quantization included) vs fp32
nn.Linear, median of torch.utils.benchmark timings over rotated random inputs.

    python benchmarks/cpu_linear.py [--out benchmarks/results/cpu_linear.json]
"""

import argparse
import json
import os
import sys
from pathlib import Path

import torch
from torch.utils.benchmark import Timer

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine_info  # noqa: E402
from dgq import DGQLinear  # noqa: E402
from dgq.quant.rtn import rtn_quantize  # noqa: E402

SHAPES = {  # name: (N out, K in)
    "4096x4096": (4096, 4096),
    "smollm2.q_proj/o_proj": (576, 576),
    "smollm2.k_proj/v_proj": (192, 576),
    "smollm2.gate/up_proj": (1536, 576),
    "smollm2.down_proj": (576, 1536),
}
MS = (1, 16, 64, 256, 1024)


def bench(fn, xs, min_run_time):
    i = [0]

    def step():
        fn(xs[i[0] % len(xs)])
        i[0] += 1

    return Timer("step()", globals={"step": step}).blocked_autorange(min_run_time=min_run_time).median


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/cpu_linear.json")
    ap.add_argument("--min-run-time", type=float, default=0.5)
    a = ap.parse_args()
    torch.manual_seed(0)
    rows = []
    with torch.no_grad():
        for name, (n, k) in SHAPES.items():
            lin = torch.nn.Linear(k, n, bias=False)
            g = 128 if k % 128 == 0 else 64
            qw = rtn_quantize(lin.weight, g)
            q = DGQLinear.from_weight(qw)
            for m in MS:
                xs = [torch.randn(m, k) for _ in range(4)]
                q(xs[0])  # expands and caches the int8 weight once
                t_fp = bench(lin, xs, a.min_run_time)
                t_q = bench(q, xs, a.min_run_time)
                row = {"shape": name, "N": n, "K": k, "M": m, "group_size": g, "fp32_ms": round(t_fp * 1e3, 4),
                       "dgq_ms": round(t_q * 1e3, 4), "speedup": round(t_fp / t_q, 3)}
                rows.append(row)
                print(f"{name:24s} M={m:5d}  fp32 {row['fp32_ms']:9.3f} ms  dgq {row['dgq_ms']:9.3f} ms  "
                      f"x{row['speedup']:.2f}", flush=True)
    out = {"machine": machine_info(), "kernel": "cpu-int-mm (torch._int_mm, cached int8 weight)",
           "activation": "dynamic per-token", "results": rows}
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
