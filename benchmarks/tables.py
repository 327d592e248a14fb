"""Render the README's result tables (markdown) from the committed benchmark JSON files.

    python benchmarks/tables.py quality|sources|cpu|zeroshot|kv
"""

import json
import sys
from pathlib import Path

R = Path(__file__).parent / "results"

LABELS = {
    "fp": "FP32 (GGUF Q4_1 dequantized)",
    "rtn": "RTN A8W4 (round s_int), dynamic",
    "rtn-ceil": "RTN A8W4 (ceil s_int), dynamic",
    "rtn-w4a16": "RTN W4A16 (round), same format",
    "rtn-ceil-w4a16": "RTN W4A16 (ceil), same format",
    "dgq-dyn": "DGQ A8W4 dynamic, smoothing",
    "dgq-dyn-nosmooth": "DGQ A8W4 dynamic, no smoothing",
    "dgq-dyn-selective": "DGQ A8W4 dynamic, selective smoothing",
    "dgq-dyn-phase1": "DGQ A8W4 dynamic, smoothing, phase 1 only",
    "dgq-dyn-nosmooth-phase1": "DGQ A8W4 dynamic, no smoothing, phase 1 only",
    "dgq-dyn-nosearch": "DGQ A8W4 dynamic, smoothing, no search",
    "dgq-static": "DGQ A8W4 static, smoothing",
    "dgq-static-nosmooth": "DGQ A8W4 static, no smoothing",
    "dgq-static-selective": "DGQ A8W4 static, selective smoothing",
    "dgq-static-phase1": "DGQ A8W4 static, smoothing, phase 1 only",
    "dgq-static-nosmooth-phase1": "DGQ A8W4 static, no smoothing, phase 1 only",
    "dgq-static-nosearch": "DGQ A8W4 static, smoothing, no search",
    "dgq-w4a16": "DGQ W4A16 (weights of dgq, float activations)",
}


def quality():
    d = json.loads((R / "quality.json").read_text())
    print("| row | WikiText-2 ppl | Δ vs FP | quantize s | peak RSS MB |\n|---|---|---|---|---|")
    for r in d["results"]:
        q = "–" if r["config"] is None else r["quant_seconds"]
        print(f"| {LABELS.get(r['row'], r['row'])} (`{r['row']}`) | {r['ppl']:.2f} | {r['delta_ppl_pct']:+.1f}% | {q} "
              f"| {r['peak_rss_mb']} |")
    m = d["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}")


def sources(row="dgq-dyn-nosmooth"):
    d = json.loads((R / "quality.json").read_text())
    r = next(x for x in d["results"] if x["row"] == row)
    es = r["error_sources"]["per_layer_type"]
    print(f"| layer (`{row}`, mean over 30 blocks) | W4 only | A8 only | A8W4 |\n|---|---|---|---|")
    for name, e in es.items():
        print(f"| {name} | {e['w4']:.3f} | {e.get('a8', float('nan')):.3f} | {e.get('a8w4', float('nan')):.3f} |")
    worst = r["error_sources"]["worst_blocks"]
    print(f"\nWorst blocks by output error: {worst}.")


def cpu():
    d = json.loads((R / "cpu_linear.json").read_text())
    shapes = list(dict.fromkeys(r["shape"] for r in d["results"]))
    ms = sorted({r["M"] for r in d["results"]})
    print("| shape (N×K) | " + " | ".join(f"M={m}" for m in ms) + " |\n|---|" + "---|" * len(ms))
    for s in shapes:
        row = {r["M"]: r for r in d["results"] if r["shape"] == s}
        n, k = row[ms[0]]["N"], row[ms[0]]["K"]
        print(f"| {s} ({n}×{k}) | " + " | ".join(f"{row[m]['speedup']:.2f}×" for m in ms) + " |")
    m = d["machine"]
    print(f"\n{m['cpu']}, {m['cores']} cores, torch {m['torch']}, {m['date']}")


def zeroshot():
    for name in ("zeroshot.json", "zeroshot_qwen.json"):
        f = R / name
        if f.exists():
            zeroshot_table(json.loads(f.read_text()), name)


def zeroshot_table(d, name):
    tasks = d["eval"]["tasks"]
    print(f"\n`results/{name}`: first {d['eval']['limit']} documents per task, batch size {d['eval']['batch_size']}\n")
    print("| model | " + " | ".join(tasks) + " | mean acc | wall s |\n|---|" + "---|" * (len(tasks) + 2))
    for r in d["rows"]:
        cells = []
        for t in tasks:
            v = r["tasks"][t]
            c = f"{100 * v['acc']:.1f} ± {100 * v['acc_stderr']:.1f}"
            if "acc_norm" in v:
                c += f" ({100 * v['acc_norm']:.1f})"
            cells.append(c)
        mean = sum(r["tasks"][t]["acc"] for t in tasks) / len(tasks)
        wall = sum(r["tasks"][t]["elapsed_s"] for t in tasks)
        print(f"| {r['label']} | " + " | ".join(cells) + f" | {100 * mean:.1f} | {wall:.0f} |")


KV_LABELS = {"none": "float", "int8": "int8 dynamic", "int8-static": "int8 static",
             "int8-smooth": "int8 dynamic, keys smoothed"}
WEIGHT_LABELS = {"fp": "FP", "dgq": "DGQ A8W4", "rtn": "RTN A8W4 (DGQ format)"}


def kv():
    for name in ("kv_cache_smollm2.json", "kv_cache_qwen.json"):
        f = R / name
        if not f.exists():
            continue
        d = json.loads(f.read_text())
        g = d["quantized_recipe"]["group_size"]
        print(f"\n`{d['model']}`, {d['tokens']} tokens of `{Path(d['text']).name}` (windows of {d['seqlen']}); "
              f"quantized: {d['quantized_recipe']['method']} g{g}\n")
        print("| weights | KV cache | ppl | Δ vs same weights, float KV | Δ vs FP | decode check: ppl decoded / one "
              "forward (tokens) |\n|---|---|---|---|---|---|")
        order = list(KV_LABELS)
        for r in sorted(d["rows"], key=lambda r: (r["model"] != "fp", order.index(r["kv"]))):
            c = r.get("decode_check")
            check = f"{c['ppl_decoded']:.4f} / {c['ppl_one_forward']:.4f} ({c['tokens']})" if c else "–"
            print(f"| {WEIGHT_LABELS.get(r['model'], r['model'])} | {KV_LABELS[r['kv']]} | {r['ppl']:.4f} | "
                  f"{r['delta_vs_same_weights_pct']:+.2f}% | {r['delta_vs_fp_pct']:+.2f}% | {check} |")
    f = R / "kv_cache_memory.json"
    if f.exists():
        d = json.loads(f.read_text())
        print("\n| tokens | KV cache | cache GiB | × bf16 | peak RSS over start, MB | prefill update s | "
              "decode update ms/step |\n|---|---|---|---|---|---|---|")
        for r in sorted(d["rows"], key=lambda r: (r["tokens"], list(KV_LABELS).index(r["kv"]))):
            print(f"| {r['tokens']} | {KV_LABELS[r['kv']]} | {r['cache_gib']:.3f} | {r['bytes_vs_bf16']:.3f} | "
                  f"{r['peak_over_start_mb']} | {r['prefill_update_s']} | {r['decode_update_ms_per_step']} |")


if __name__ == "__main__":
    {"quality": quality, "cpu": cpu, "zeroshot": zeroshot, "sources": sources, "kv": kv}[sys.argv[1]]()
