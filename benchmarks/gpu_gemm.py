"""GEMM benchmark for one GPU run: correctness on the GPU, then TOP/s of each kernel vs M.

Kernels (all on the same problem ``[M, K] x [K, N]``):
  bf16      torch.matmul, bf16 weights (cuBLAS)
  int8      torch._int_mm on the expanded int8 weight (cuBLASLt), M > 16 only
  tinygemm  torch.ops.aten._weight_int4pack_mm, A16W4 group 128
  unfused   DGQ in torch: expand to int8 with torch ops, then _int_mm, then the float epilogue
  tri-int8  a plain Triton int8 GEMM on the already-expanded int8 weight, same epilogue (the ceiling)
  dgq       ours, tuned as the dispatch tunes (tensor-core ``_mma_kernel`` and, at M <= 16, ``_dp4a_gemv_kernel``
            configs): a8w4_gemm on permuted int8 activations (epilogue included, bf16 out)
  dgq+q     ours including the per-token activation quantization of bf16 x

Correctness at every point: the int32 accumulators of the tuned config and of the fastest config of each kernel
kind (``best_by_kind`` in the JSON), and the bf16 output, bitwise against torch; the quantization kernel bitwise
against torch on the CPU (M <= 1024). The v1/v2 kernels of the earlier runs are gone (benchmarks/results/NOTES.md).

Timing: every kernel call sequence is captured in a CUDA graph (R calls rotating over S input sets whose weights
together exceed the L2), replayed under triton.testing.do_bench (median), time / R. Inputs are random, never zeros.
Writes JSON + PNG (``--out``), prints a short table last. ``--smoke``: tiny shapes (CPU interpreter works too).
"""

# ruff: noqa: B023  (the timed lambdas run inside the iteration that defines them)
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "src"))

import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from dgq.formats.act import epilogue, quantize_per_token  # noqa: E402
from dgq.formats.dgq import expand_int8, safe_code_bounds  # noqa: E402
from dgq.formats.packing import pack_uint4, unpack_uint4  # noqa: E402
from dgq.kernels import triton_gemm as G  # noqa: E402
from dgq.kernels import triton_quant as Q  # noqa: E402
from dgq.kernels.triton_tuner import Tuner  # noqa: E402

SHAPES = [(4096, 4096), (11008, 4096), (4096, 11008), (8192, 8192)]  # (N, K)
MS = [1, 4, 16, 64, 256, 1024, 2048, 4096, 8192]
NAMES = ["bf16", "int8", "tinygemm", "unfused", "tri-int8", "dgq", "dgq+q"]


@triton.jit
def _int8_gemm(a_ptr, b_ptr, sx_ptr, sch_ptr, c_ptr, M, N, K, BM: tl.constexpr, BN: tl.constexpr,
               BK: tl.constexpr, GROUP_M: tl.constexpr):
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    num_pid_n = tl.cdiv(N, BN)
    num_pid_in_group = GROUP_M * num_pid_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(num_pid_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    rm = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    rn = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    rk = tl.arange(0, BK)
    a_ptrs = a_ptr + rm[:, None] * K + rk[None, :]
    b_ptrs = b_ptr + rn[None, :] * K + rk[:, None]
    acc = tl.zeros([BM, BN], dtype=tl.int32)
    for k in range(0, K // BK):
        a = tl.load(a_ptrs + k * BK)
        b = tl.load(b_ptrs + k * BK)
        acc = tl.dot(a, b, acc, out_dtype=tl.int32)
    sx = tl.load(sx_ptr + offs_m, mask=offs_m < M, other=0.0)
    sch = tl.load(sch_ptr + offs_n, mask=offs_n < N, other=0.0)
    y = acc.to(tl.float32) * sx[:, None]
    y = y * sch[None, :]
    mask = (offs_m < M)[:, None] & (offs_n < N)[None, :]
    tl.store(c_ptr + offs_m[:, None].to(tl.int64) * N + offs_n[None, :], y.to(c_ptr.dtype.element_ty), mask=mask)


def triton_int8_gemm(x8, w8, sx, sch, out):
    m, k = x8.shape
    n = w8.shape[0]
    bm, bn, bk = (128, 256, 128) if m > 16 else (16, 64, 128)
    grid = (triton.cdiv(m, bm) * triton.cdiv(n, bn),)
    _int8_gemm[grid](x8, w8, sx, sch, out, m, n, k, BM=bm, BN=bn, BK=bk, GROUP_M=8,
                     num_warps=8 if m > 16 else 4, num_stages=3 if m > 16 else 4)
    return out


def random_weights(n, k, g, dev, gen):
    groups = k // g
    z = torch.randint(0, 16, (n, groups), device=dev, dtype=torch.int8, generator=gen)
    s = torch.randint(1, 16, (n, groups), device=dev, dtype=torch.int8, generator=gen)
    lo, hi = safe_code_bounds(z, s)
    c = torch.randint(0, 16, (n, k), device=dev, dtype=torch.int32, generator=gen).view(n, groups, g)
    c = torch.maximum(torch.minimum(c, hi[..., None]), lo[..., None]).view(n, k)
    ch = torch.rand(n, device=dev, generator=gen) * 1e-3 + 1e-4
    return pack_uint4(c), z, s, ch


def bench(fns, on_cuda, reps):
    """Median seconds per call of a rotation of callables (CUDA graph of `reps` calls on the GPU)."""
    for f in fns:
        f()
    if not on_cuda:
        t = time.perf_counter()
        for f in fns:
            f()
        return (time.perf_counter() - t) / len(fns)
    torch.cuda.synchronize()
    g = torch.cuda.CUDAGraph()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for f in fns:  # warm on the side stream too
            f()
    torch.cuda.current_stream().wait_stream(s)
    torch.cuda.synchronize()
    with torch.cuda.graph(g):
        for i in range(reps):
            fns[i % len(fns)]()
    torch.cuda.synchronize()
    ms = triton.testing.do_bench(g.replay, warmup=10, rep=40, return_mode="median")
    del g
    return ms * 1e-3 / reps


def tinygemm_pack(q, n, k, g, dev, gen):
    codes = unpack_uint4(q).to(torch.int32)
    try:
        packed_in = (codes[:, ::2] << 4 | codes[:, 1::2]).to(torch.uint8)
        wp = torch.ops.aten._convert_weight_to_int4pack(packed_in.contiguous(), 8)
    except Exception:  # older signature: int32 codes [N, K]
        wp = torch.ops.aten._convert_weight_to_int4pack(codes.contiguous(), 8)
    sz = (torch.rand(k // g, n, 2, device=dev, generator=gen) * 0.01 + 0.001).to(torch.bfloat16)
    return wp, sz


def best_by_kind(tuner, key):
    """{kind: [config, ms]} of the fastest working config of each kernel kind in the tuning of ``key``."""
    out = {}
    for c, ms in tuner.times.get(key, []):
        if ms < float("inf") and (c.kind not in out or ms < out[c.kind][1]):
            out[c.kind] = [c, ms]
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--smoke", action="store_true", help="tiny shapes, few points (CPU/interpreter ok)")
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    ap.add_argument("--group", type=int, default=128)
    ap.add_argument("--budget", type=float, default=175, help="seconds; later points are skipped past it")
    ap.add_argument("--tuned", default=os.environ.get("DGQ_TRITON_TUNED", "/tmp/dgq_tuned.json"),
                    help="write the tuned configs here (gpu_e2e.py reads them through DGQ_TRITON_TUNED)")
    args = ap.parse_args()
    on_cuda = torch.cuda.is_available()
    dev = "cuda" if on_cuda else "cpu"
    shapes = [(256, 256), (128, 384)] if args.smoke else SHAPES
    ms_list = [1, 16, 67] if args.smoke else MS
    g = args.group
    gen = torch.Generator(device=dev).manual_seed(int.from_bytes(os.urandom(4), "little"))
    rows, checks = [], []
    t_start = time.time()
    card = torch.cuda.get_device_name() if on_cuda else "cpu (interpreter)"
    tuner = Tuner()  # the dispatch's tuning, owned here; saved to --tuned for gpu_e2e.py
    for n, k in shapes:
        wbytes = n * k // 2
        nsets = 2 if args.smoke else int(min(12, max(2, math.ceil(160e6 / wbytes))))
        W = [random_weights(n, k, g, dev, gen) for _ in range(nsets)]
        W8 = [expand_int8(q, z, s, g) for q, z, s, _ in W]
        SC = [G.pack_sc(z, s) for _, z, s, _ in W]
        WBF = ([(w8.float() * ch[:, None]).to(torch.bfloat16) for w8, (_, _, _, ch) in zip(W8, W, strict=True)]
               if on_cuda else [])
        TG = []
        if on_cuda:
            try:
                TG = [tinygemm_pack(q, n, k, 128, dev, gen) for q, *_ in W]
            except Exception as e:  # noqa: BLE001
                print(f"tinygemm unavailable: {type(e).__name__}: {e}")
        for m in ms_list:
            if time.time() - t_start > args.budget:
                print(f"time budget spent: skipping N={n} K={k} M={m}")
                continue
            X = [torch.randn(m, k, device=dev, generator=gen).to(torch.bfloat16) for _ in range(nsets)]
            XQ = [Q.quantize_per_token_triton(x, permute=False) for x in X]
            XP = [G.permute_activations(x8) for x8, _ in XQ]
            OUT = [torch.empty(m, n, device=dev, dtype=torch.bfloat16) for _ in range(nsets)]
            try:
                # correctness on this device: exact int32 reference, same float epilogue
                x8, sx = XQ[0]
                if m > 16 and on_cuda:
                    acc = torch._int_mm(x8, W8[0].t())
                else:
                    acc = (x8.double() @ W8[0].double().t()).to(torch.int32)
                ref = epilogue(acc, sx, W[0][3], None, torch.bfloat16)
                OUT[0].fill_(float("nan"))
                got = G.a8w4_gemm(XP[0], sx, W[0][0], W[0][1], W[0][2], W[0][3], None, g, torch.bfloat16,
                                  permuted=True, out=OUT[0], sc=SC[0], tuner=tuner)
                key = tuner.key(got.device, m, n, k, g)
                acc32 = G.a8w4_gemm_int32(XP[0], W[0][0], W[0][1], W[0][2], g, permuted=True, sc=SC[0],
                                          tuner=tuner)
                ok_acc = torch.equal(acc32, acc)
                kinds = best_by_kind(tuner, key)
                for c, _ in kinds.values():  # the fastest config of each kernel kind bitwise too (the tuning compared
                    # every candidate, inline-PTX ones included, with the first one that ran: see tune_log)
                    ok_acc = ok_acc and torch.equal(G.a8w4_gemm_int32(XP[0], W[0][0], W[0][1], W[0][2], g,
                                                                      permuted=True, sc=SC[0], config=c,
                                                                      tuner=tuner), acc)
                ok_out = torch.equal(got, ref)
                qx8, qsx = Q.quantize_per_token_triton(X[0], permute=True)
                if m <= 1024:  # the kernel follows torch's CPU (exact-division) semantics; see docs/gpu-kernel.md
                    rx8, rsx = quantize_per_token(X[0].cpu())
                    ok_q = torch.equal(qx8.cpu(), G.permute_activations(rx8)) and torch.equal(qsx.cpu(), rsx)
                else:  # the permuted and the natural-order outputs of the kernel agree
                    ok_q = torch.equal(qx8, G.permute_activations(x8)) and torch.equal(qsx, sx)
                checks.append(dict(n=n, k=k, m=m, int32_exact=ok_acc, out_exact=ok_out, quant_exact=ok_q,
                                   config=str(tuner.tuned.get(key)),
                                   best_by_kind={kd: str(c) for kd, (c, _) in kinds.items()}))
                if not (ok_acc and ok_out and ok_q):
                    print(f"CORRECTNESS FAIL n={n} k={k} m={m}: int32 {ok_acc} out {ok_out} quant {ok_q}")
            except Exception as e:  # noqa: BLE001 - keep timing the other kernels
                print(f"correctness check failed to run n={n} k={k} m={m}: {type(e).__name__}: {str(e)[:300]}")
                checks.append(dict(n=n, k=k, m=m, error=f"{type(e).__name__}: {str(e)[:300]}"))
            reps = 20 if m <= 256 else 4
            fns = {}
            if on_cuda:
                fns["bf16"] = [lambda i=i: torch.matmul(X[i], WBF[i].t()) for i in range(nsets)]
                if m > 16:
                    fns["int8"] = [lambda i=i: torch._int_mm(XQ[i][0], W8[i].t()) for i in range(nsets)]
                if TG:
                    fns["tinygemm"] = [lambda i=i: torch.ops.aten._weight_int4pack_mm(X[i], TG[i][0], 128, TG[i][1])
                                       for i in range(nsets)]

                def unfused(i):
                    w8 = expand_int8(W[i][0], W[i][1], W[i][2], g)
                    a = torch._int_mm(XQ[i][0], w8.t()) if m > 16 else (XQ[i][0].float() @ w8.float().t()).int()
                    return epilogue(a, XQ[i][1], W[i][3], None, torch.bfloat16)

                fns["unfused"] = [lambda i=i: unfused(i) for i in range(nsets)]
            fns["tri-int8"] = [lambda i=i: triton_int8_gemm(XQ[i][0], W8[i], XQ[i][1], W[i][3], OUT[i])
                               for i in range(nsets)]
            fns["dgq"] = [lambda i=i: G.a8w4_gemm(XP[i], XQ[i][1], W[i][0], W[i][1], W[i][2], W[i][3], None, g,
                                                  torch.bfloat16, permuted=True, out=OUT[i], sc=SC[i], tuner=tuner)
                          for i in range(nsets)]

            def with_quant(i):
                x8p, s = Q.quantize_per_token_triton(X[i], permute=True)
                return G.a8w4_gemm(x8p, s, W[i][0], W[i][1], W[i][2], W[i][3], None, g, torch.bfloat16,
                                   permuted=True, out=OUT[i], sc=SC[i], tuner=tuner)

            fns["dgq+q"] = [lambda i=i: with_quant(i) for i in range(nsets)]
            for name, fl in fns.items():
                try:
                    sec = bench(fl, on_cuda, reps)
                except Exception as e:  # noqa: BLE001
                    print(f"{name} n={n} k={k} m={m} failed: {type(e).__name__}: {str(e)[:200]}")
                    continue
                tops = 2 * m * n * k / sec / 1e12
                rows.append(dict(kernel=name, n=n, k=k, m=m, us=sec * 1e6, tops=tops))
            print(f"[{time.time() - t_start:6.1f}s] N={n} K={k} M={m}: " +
                  " ".join(f"{r['kernel']}={r['tops']:.1f}" for r in rows if r["n"] == n and r["k"] == k
                           and r["m"] == m), flush=True)
            X = XQ = XP = OUT = None
        W = W8 = SC = WBF = TG = None
        if on_cuda:
            torch.cuda.empty_cache()

    res = dict(card=card, date=datetime.datetime.now(datetime.UTC).isoformat(),
               torch=torch.__version__, triton=triton.__version__, group_size=g, smoke=args.smoke,
               units="TOP/s = 2*M*N*K / time (dense ops, int or float); us = microseconds per call",
               timing="CUDA graph of R calls rotating over S input sets (weights > L2), do_bench median / R",
               rows=rows, checks=checks, tune_log=[[str(kk), v] for kk, v in tuner.log],
               best_by_kind={str(kk): {kd: [str(c), ms] for kd, (c, ms) in best_by_kind(tuner, kk).items()}
                             for kk in tuner.times},
               tuned={str(kk): str(c) for kk, c in tuner.tuned.items()},
               seconds=time.time() - t_start)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "gpu_gemm.json"), "w") as f:
        json.dump(res, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, axes = plt.subplots(1, len(shapes), figsize=(5 * len(shapes), 4), squeeze=False)
        for ax, (n, k) in zip(axes[0], shapes, strict=True):
            for name in NAMES:
                pts = [(r["m"], r["tops"]) for r in rows if r["kernel"] == name and r["n"] == n and r["k"] == k]
                if pts:
                    ax.plot(*zip(*pts, strict=True), marker="o", label=name)
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_title(f"N={n} K={k}")
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel("TOP/s")
            ax.grid(True, which="both", alpha=0.3)
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"DGQ A8W4 GEMM on {card}")
        fig.tight_layout()
        fig.savefig(os.path.join(args.out, "gpu_gemm.png"), dpi=90)
    except Exception as e:  # noqa: BLE001
        print(f"plot skipped: {e}")

    # short table last
    try:
        tuner.save(args.tuned)
    except OSError as e:
        print(f"could not save tuned configs: {e}")
    names = NAMES
    bad = [c for c in checks if not (c.get("int32_exact") and c.get("out_exact") and c.get("quant_exact"))]
    print(f"\ncorrectness: {len(checks) - len(bad)}/{len(checks)} points exact" + (f"; FAIL {bad}" if bad else ""))
    if not on_cuda and bad:
        print("(the Triton interpreter converts fp32 -> bf16 by truncation, so out_exact is false off the GPU)")
    print(f"TOP/s on {card} (group {g}); columns: " + " ".join(names))
    for n, k in shapes:
        for m in ms_list:
            d = {r["kernel"]: r["tops"] for r in rows if r["n"] == n and r["k"] == k and r["m"] == m}
            print(f"{n:>5}x{k:<5} M={m:<5} " + " ".join(f"{d.get(x, float('nan')):8.1f}" for x in names))

    # floors (dgq = the GEMM alone; ratios < 1 are shortfalls)
    print("floors: dgq/int8 >= 1.0, dgq/bf16 >= 1.2, dgq/tri-int8 >= 0.9 (M >= 2048); dgq/bf16 >= 2, "
          "dgq/tinygemm >= 1.2 (M <= 16); dgq/tinygemm >= 3.24 (M >= 128)")
    for n, k in shapes:
        for m in ms_list:
            d = {r["kernel"]: r["tops"] for r in rows if r["n"] == n and r["k"] == k and r["m"] == m}
            if "dgq" not in d:
                continue
            rat = {x: d["dgq"] / d[x] for x in ("int8", "bf16", "tri-int8", "tinygemm") if d.get(x)}
            print(f"{n:>5}x{k:<5} M={m:<5} " + " ".join(f"/{x}={v:.2f}" for x, v in rat.items()))


if __name__ == "__main__":
    main()
