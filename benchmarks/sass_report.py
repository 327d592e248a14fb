"""Compile the dgq Triton kernels for sm_90 (H100) on a machine without a GPU and report, per kernel config:
registers, stack (spills), shared memory, an instruction histogram and a hash of the SASS instruction stream.

Used for the offline claims in docs/gpu-kernel.md (a refactor leaves the SASS byte-identical; the pipelined GEMV
candidates compile to LDGSTS prefetch at 32-48 registers). Needs the triton version of the GPU image (3.6.0), which
ships ptxas/cuobjdump; it does not need a GPU:

    pip download --no-deps triton==3.6.0 -d /tmp/whl && pip install --no-deps --target /tmp/tri36 /tmp/whl/triton-*.whl
    git archive acf5a92 src | tar -x -C /tmp/old     # the tree of the fifth H100 run
    PYTHONPATH=/tmp/tri36 python benchmarks/sass_report.py --src /tmp/old/src --label acf5a92 --out /tmp/old.json
    PYTHONPATH=/tmp/tri36 python benchmarks/sass_report.py --src src --label HEAD --out \
        benchmarks/results/sass_sm90_triton36.json --compare /tmp/old.json

Launch-time specialisations are reproduced: pointers and the N/K/stride arguments are marked divisible by 16 (as
Triton's JIT does for the aligned tensors the dispatch passes).
"""

from __future__ import annotations

import argparse
import collections
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

PTRS = {"x_ptr": "*i8", "q_ptr": "*u8", "qw_ptr": "*i32", "meta_ptr": "*i16", "sc_ptr": "*i32", "rs_ptr": "*i32",
        "sx_ptr": "*fp32", "sch_ptr": "*fp32", "b_ptr": "*fp32", "y_ptr": "*bf16", "ws_ptr": "*i32", "cnt_ptr": "*i32"}
DIV16 = ("N", "K", "stride_xm", "stride_qw", "stride_ym", "stride_xw", "stride_rm", "stride_qn")


def configs(T):
    """(kernel, constexprs, num_warps, num_stages, extra pointer types) to compile: the tuned winners of the fifth
    H100 run and the candidates added since."""
    g = 128
    out = []
    for bm, bn, bk, sk, st in [(1, 64, 256, 16, 1), (1, 128, 128, 32, 1), (4, 64, 128, 16, 1), (1, 8, 512, 1, 3),
                               (1, 16, 256, 1, 3), (1, 8, 256, 1, 3), (4, 8, 256, 1, 3), (16, 8, 128, 1, 3)]:
        out.append((T._gemv_kernel, dict(GROUP=g, BM=bm, BN=bn, BK=bk, SPLIT_K=sk, ASM=True, HAS_BIAS=False,
                                         OUT_INT32=False, STAGES=st), 4, st, {"x_ptr": "*i32"}))
    for bm, bn, sw, w in [(128, 128, False, 8), (256, 128, True, 8), (256, 128, False, 8), (16, 64, True, 4)]:
        out.append((T._v3_kernel, dict(GROUP=g, BM=bm, BN=bn, BK=128, SPLIT_K=1 if bm > 16 else 4, GROUP_M=8,
                                       SWAP=sw, HAS_BIAS=False, OUT_INT32=False), w, 3 if bm > 16 else 4, {}))
    for bm, bn, bk, sk, sw, w, st in [(256, 128, 128, 1, False, 8, 3), (16, 64, 256, 8, True, 4, 4)]:
        common = dict(GROUP=g, BM=bm, BN=bn, SPLIT_K=sk, GROUP_M=8, SWAP=sw, HAS_BIAS=True, OUT_INT32=False)
        out.append((T._a8w4_kernel, dict(common, BK=bk), w, st, {}))
        out.append((T._dgq_kernel, dict(common, UNROLL=bk // 128), w, st, {}))
    return out


def compile_one(triton, fn, consts, num_warps, num_stages, ptrs, tmp):
    from triton.backends.compiler import GPUTarget

    names = list(fn.arg_names)
    consts = {k: v for k, v in consts.items() if k in names}  # an older tree may lack a newer constexpr
    sig, attrs = {}, {}
    for i, a in enumerate(names):
        if a in consts:
            sig[a] = "constexpr"
            continue
        sig[a] = {**PTRS, **ptrs}.get(a, "i32")
        if a.endswith("_ptr") or a in DIV16:
            attrs[(i,)] = [["tt.divisibility", 16]]
    src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    k = triton.compile(src, target=GPUTarget("cuda", 90, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    cubin = os.path.join(tmp, "k.cubin")
    with open(cubin, "wb") as f:
        f.write(k.asm["cubin"])
    sass = subprocess.run([f"{bindir}/cuobjdump", "-sass", cubin], capture_output=True, text=True, check=True).stdout
    res = subprocess.run([f"{bindir}/cuobjdump", "-res-usage", cubin], capture_output=True, text=True,
                         check=True).stdout
    lines = [re.sub(r"/\*[0-9a-f]{4,}\*/", "", ln).strip() for ln in sass.splitlines()
             if re.match(r"\s+/\*[0-9a-f]{4,}\*/", ln)]
    ops = collections.Counter(re.match(r"(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", ln).group(1) for ln in lines)
    reg = re.search(r"REG:(\d+)", res)
    stack = re.search(r"STACK:(\d+)", res)
    return {"registers": int(reg.group(1)) if reg else None, "stack_bytes": int(stack.group(1)) if stack else None,
            "shared_bytes": k.metadata.shared, "instructions": len(lines),
            "histogram": dict(ops.most_common(16)),
            "sass_sha1": hashlib.sha1("\n".join(lines).encode()).hexdigest()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--src", default="src", help="the source tree whose dgq package is compiled")
    ap.add_argument("--out", required=True)
    ap.add_argument("--label", help="what the tree is (e.g. a commit); default: --src")
    ap.add_argument("--compare", help="an earlier report: say which kernels' SASS is identical")
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.src))
    import triton

    from dgq.kernels import triton_a8w4 as T

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for fn, consts, w, st, ptrs in configs(T):
            key = f"{fn.__name__}[{', '.join(f'{k}={v}' for k, v in consts.items())}, warps={w}, stages={st}]"
            try:
                rows[key] = compile_one(triton, fn, consts, w, st, ptrs, tmp)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
                rows[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[-1][:300]}"}
            r = rows[key]
            print(key, "->", r.get("error") or f"{r['registers']} regs, stack {r['stack_bytes']}, "
                  f"smem {r['shared_bytes']}, {r['instructions']} instr", flush=True)
    out = {"triton": triton.__version__, "target": "sm_90", "src": a.label or a.src, "kernels": rows}
    if a.compare:
        with open(a.compare) as f:
            ref = json.load(f)
        same = {key: r.get("sass_sha1") is not None and ref["kernels"].get(key, {}).get("sass_sha1") == r["sass_sha1"]
                for key, r in rows.items()}
        out["compared_with"] = {"src": ref.get("src"), "sass_identical": same}
        for key, s in same.items():
            print(("IDENTICAL " if s else "DIFFERENT ") + key)
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
