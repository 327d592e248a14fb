"""Compile the dgq Triton GEMM kernels for sm_90 (H100) on a machine without a GPU and report, per kernel config:
registers, stack (spills), shared memory, an instruction histogram and a hash of the SASS instruction stream.

Used for the offline claims in docs/gpu-kernel.md (a refactor leaves the SASS byte-identical; the pipelined GEMV
candidates compile to LDGSTS prefetch at 32-48 registers). Needs the triton version of the GPU image (3.6.0), which
ships ptxas/cuobjdump; it does not need a GPU:

    pip download --no-deps triton==3.6.0 -d /tmp/whl && pip install --no-deps --target /tmp/tri36 /tmp/whl/triton-*.whl
    git archive acf5a92 src | tar -x -C /tmp/old     # the tree of the fifth H100 run
    PYTHONPATH=/tmp/tri36 python benchmarks/sass_report.py --src /tmp/old/src --label acf5a92 --out /tmp/old.json
    PYTHONPATH=/tmp/tri36 python benchmarks/sass_report.py --src src --label HEAD --out \
        benchmarks/results/sass_sm90_triton36.json --compare /tmp/old.json   # --compare is repeatable

Kernels are reported under their current names (``_mma_kernel``, ``_dp4a_gemv_kernel`` in
``dgq.kernels.triton_gemm``); an older tree is compiled under the names it has (``_v3_kernel``, ``_gemv_kernel`` in
``dgq.kernels.triton_a8w4``), so ``--compare`` pairs the same kernel across the rename (older reports' keys are
renamed the same way). Launch-time specialisations are reproduced: pointers and the N/K/stride arguments are
marked divisible by 16 (as Triton's JIT does for the aligned tensors the dispatch passes).
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

PTRS = {"x_ptr": "*i8", "qw_ptr": "*i32", "sc_ptr": "*i32", "sx_ptr": "*fp32", "sch_ptr": "*fp32", "b_ptr": "*fp32",
        "y_ptr": "*bf16", "ws_ptr": "*i32", "cnt_ptr": "*i32"}
DIV16 = ("N", "K", "stride_xm", "stride_qw", "stride_ym", "stride_xw")


# report name -> (module, function name) in the trees this script compiles, newest first
KERNELS = {
    "_dp4a_gemv_kernel": [("dgq.kernels.triton_gemm", "_dp4a_gemv_kernel"),
                          ("dgq.kernels.triton_a8w4", "_gemv_kernel")],
    "_mma_kernel": [("dgq.kernels.triton_gemm", "_mma_kernel"), ("dgq.kernels.triton_a8w4", "_v3_kernel")],
}
OLD_NAMES = {old: new for new, places in KERNELS.items() for _, old in places[1:]}


def find_kernel(name):
    """The jit function reported as ``name`` in the tree on ``sys.path`` (under its current or an older name)."""
    import importlib

    for mod, fn in KERNELS[name]:
        try:
            m = importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise
            continue
        if hasattr(m, fn):
            return getattr(m, fn)
    raise LookupError(f"{name}: none of {KERNELS[name]} in this tree")


def report_key(key: str) -> str:
    """A report key with an older kernel name replaced by the current one."""
    name, rest = key.split("[", 1)
    return f"{OLD_NAMES.get(name, name)}[{rest}"


def configs():
    """(kernel, constexprs, num_warps, num_stages, extra pointer types) to compile: the tuned winners of the fifth
    H100 run, the candidates added since, the other tensor-core candidates, g = 64 (several groups per K step)
    and a bias epilogue."""
    out = []

    def gemv(bm, bn, bk, sk, st, g=128):
        out.append(("_dp4a_gemv_kernel", dict(GROUP=g, BM=bm, BN=bn, BK=bk, SPLIT_K=sk, ASM=True, HAS_BIAS=False,
                                              OUT_INT32=False, STAGES=st), 4, st, {"x_ptr": "*i32"}))

    def mma(bm, bn, sw, w, st, sk=1, g=128, bias=False):
        out.append(("_mma_kernel", dict(GROUP=g, BM=bm, BN=bn, BK=128, SPLIT_K=sk, GROUP_M=8, SWAP=sw,
                                        HAS_BIAS=bias, OUT_INT32=False), w, st, {}))

    for bm, bn, bk, sk, st in [(1, 64, 256, 16, 1), (1, 128, 128, 32, 1), (4, 64, 128, 16, 1), (1, 8, 512, 1, 3),
                               (1, 16, 256, 1, 3), (1, 8, 256, 1, 3), (4, 8, 256, 1, 3), (16, 8, 128, 1, 3)]:
        gemv(bm, bn, bk, sk, st)
    for bm, bn, sw, w in [(128, 128, False, 8), (256, 128, True, 8), (256, 128, False, 8), (16, 64, True, 4)]:
        mma(bm, bn, sw, w, 3 if bm > 16 else 4, sk=1 if bm > 16 else 4)
    # added with the rename (not in the report of the fifth run's tree before): the remaining tensor-core
    # candidates, group 64 (two groups per 128-k step), a bias epilogue, GEMV tiles of the other M buckets
    mma(128, 256, False, 8, 3)
    mma(64, 128, False, 4, 4)
    mma(64, 64, False, 4, 4)
    mma(128, 128, False, 8, 3, g=64)
    mma(16, 64, True, 4, 4, sk=4, g=64, bias=True)
    gemv(1, 64, 256, 16, 1, g=64)
    gemv(2, 64, 256, 16, 1)
    gemv(8, 16, 256, 8, 1)
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
    ap.add_argument("--compare", action="append", default=[],
                    help="an earlier report: say which kernels' SASS is identical (repeatable)")
    a = ap.parse_args()
    sys.path.insert(0, os.path.abspath(a.src))
    import triton

    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, consts, w, st, ptrs in configs():
            key = f"{name}[{', '.join(f'{k}={v}' for k, v in consts.items())}, warps={w}, stages={st}]"
            try:
                rows[key] = compile_one(triton, find_kernel(name), consts, w, st, ptrs, tmp)
            except Exception as e:  # noqa: BLE001 - a config that does not compile is a result too
                rows[key] = {"error": f"{type(e).__name__}: {str(e).splitlines()[-1][:300]}"}
            r = rows[key]
            print(key, "->", r.get("error") or f"{r['registers']} regs, stack {r['stack_bytes']}, "
                  f"smem {r['shared_bytes']}, {r['instructions']} instr", flush=True)
    out = {"triton": triton.__version__, "target": "sm_90", "src": a.label or a.src, "kernels": rows}
    for path in a.compare:
        with open(path) as f:
            ref = json.load(f)
        old = {report_key(key): r for key, r in ref["kernels"].items()}
        same = {key: ("IDENTICAL" if r.get("sass_sha1") and old[key].get("sass_sha1") == r["sass_sha1"] else
                      "DIFFERENT") if key in old else "not in the earlier report"
                for key, r in rows.items()}
        out.setdefault("compared_with", []).append(
            {"src": ref.get("src"), "counts": dict(collections.Counter(same.values())), "sass": same,
             "only_in_earlier_report": sorted(set(old) - set(rows))})
        print(f"compared with {ref.get('src')}:")
        for key, verdict in same.items():
            print(f"  {verdict}: {key}")
        print(f"  {out['compared_with'][-1]['counts']}")
    with open(a.out, "w") as f:
        json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
