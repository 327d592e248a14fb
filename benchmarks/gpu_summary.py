"""Short summary of one GPU run (the last thing benchmarks/gpu_run.sh prints): reads gpu_gemm.json, gpu_e2e.json
and gpu_tests.jsonl in ``--out``, writes gpu_summary.json there and prints a compact table."""

from __future__ import annotations

import argparse
import json
import os


def load(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def tests_summary(out):
    """Counts from gpu_tests.jsonl (one line per finished test, written by gpu_pytest_live.py)."""
    res = {"passed": 0, "failed": 0, "error": 0, "skipped": 0, "failures": []}
    try:
        with open(os.path.join(out, "gpu_tests.jsonl")) as f:
            recs = [json.loads(line) for line in f if line.strip()]
    except (OSError, ValueError):
        recs = []
    for r in recs:
        res[r["outcome"]] = res.get(r["outcome"], 0) + 1
        if r["outcome"] in ("failed", "error"):
            tail = (r.get("longrepr") or "").strip().splitlines()[-1:] or [""]
            res["failures"].append(f"{r['test']}: {tail[0][:300]}")
    return res


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default=os.environ.get("OUT", "benchmarks/results"))
    args = ap.parse_args()
    gemm = load(os.path.join(args.out, "gpu_gemm.json"))
    e2e = load(os.path.join(args.out, "gpu_e2e.json"))
    tests = tests_summary(args.out)
    summ = {"tests": tests}
    cols = ["bf16", "int8", "tinygemm", "tri-int8", "dgq", "dgq+q"]
    if gemm:
        rows = gemm["rows"]
        pts = sorted({(r["n"], r["k"], r["m"]) for r in rows})
        table = {}
        for n, k, m in pts:
            d = {r["kernel"]: r["tops"] for r in rows if (r["n"], r["k"], r["m"]) == (n, k, m)}
            table[f"{n}x{k} M={m}"] = d
        bad = [c for c in gemm["checks"] if not (c.get("int32_exact") and c.get("out_exact"))]
        summ["gemm"] = {"card": gemm["card"], "points": len(pts), "checks": len(gemm["checks"]),
                        "not_exact": bad, "tops": table, "tuned": gemm.get("tuned")}
        print(f"GEMM on {gemm['card']}: {len(gemm['checks']) - len(bad)}/{len(gemm['checks'])} points int32+output "
              f"exact; TOP/s (dgq = dispatch-tuned best of the mma/GEMV configs; dgq+q with activation quantization)")
        print(f"{'point':22}" + "".join(f"{c:>9}" for c in cols) + f"{'dgq/tri':>9}{'dgq/int8':>9}{'dgq/bf16':>9}"
              f"{'dgq/tg':>8}")
        for key, d in table.items():
            r = [d.get("dgq", 0) / d[x] if d.get(x) else float("nan") for x in ("tri-int8", "int8", "bf16", "tinygemm")]
            print(f"{key:22}" + "".join(f"{d.get(c, float('nan')):9.1f}" for c in cols)
                  + "".join(f"{v:9.2f}" for v in r[:3]) + f"{r[3]:8.2f}")
    else:
        print("GEMM: no gpu_gemm.json")
    if e2e:
        summ["e2e"] = {"speedup": e2e.get("speedup"), "speedup_fused": e2e.get("speedup_fused"),
                       "bf16": e2e.get("bf16"), "dgq": e2e.get("dgq_a8w4"), "dgq_fused": e2e.get("dgq_a8w4_fused")}
        print("E2E (dgq / bf16 tokens/s): " + ", ".join(f"{k} {v:.2f}x" for k, v in e2e["speedup"].items()))
        if e2e.get("speedup_fused"):
            print("E2E fused siblings (dgq / bf16): "
                  + ", ".join(f"{k} {v:.2f}x" for k, v in e2e["speedup_fused"].items()))
        b, d = e2e.get("bf16", {}), e2e.get("dgq_a8w4", {})
        if "max_memory_allocated_GiB" in b:
            print(f"E2E max allocated GiB: bf16 {b['max_memory_allocated_GiB']:.2f}, dgq "
                  f"{d.get('max_memory_allocated_GiB', float('nan')):.2f}")
    else:
        print("E2E: no gpu_e2e.json")
    print(f"TESTS (compiled kernels): {tests['passed']} passed, {tests['failed']} failed, {tests['error']} errors, "
          f"{tests['skipped']} skipped (tests cut by a step timeout are not counted)")
    for f in tests["failures"][:8]:
        print(f"  FAIL {f}")
    with open(os.path.join(args.out, "gpu_summary.json"), "w") as f:
        json.dump(summ, f, indent=1)


if __name__ == "__main__":
    main()
