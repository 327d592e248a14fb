"""INT8 KV cache benchmarks (dgq.kvcache).

accuracy: perplexity of a float model and of its DGQ checkpoint with the KV cache in float, int8 (dynamic) and
    int8-static (scales calibrated on the same windows the DGQ checkpoint was calibrated on, with the model being
    measured). Every window is scored in one forward — the cache hands attention dequantized K/V for every position,
    the current one included, so one forward reads exactly what decoding reads — and, as a check of that, the first
    ``--decode-tokens`` are scored again by prefill of each window's first half and teacher-forced decoding of the
    second half one token per forward.

    python benchmarks/kv_cache.py accuracy --model smollm2-135m --quantized CKPT \\
        --calib ../shared/data/wikitext-2/valid.txt --text ../shared/data/wikitext-2/test.txt \\
        --out benchmarks/results/kv_cache_smollm2.json

memory: cache bytes, peak RSS and the per-token cost of an update for a LLaMA-7B attention shape (32 layers, 32 KV
    heads, head_dim 128, bf16 states) at 4k and 16k tokens, batch 1: a prefill update per layer, then decode steps;
    each case in a fresh process (random K/V: the cache does not care what the weights are).

    python benchmarks/kv_cache.py memory --out benchmarks/results/kv_cache_memory.json
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import dgq  # noqa: E402
from _common import machine_info, proc_status_mb  # noqa: E402
from big_model import SHAPE  # noqa: E402
from dgq import kvcache  # noqa: E402
from dgq.data import calibration_windows, eval_ids  # noqa: E402
from dgq.eval.perplexity import perplexity_of_ids  # noqa: E402

MODES = ("none", "int8", "int8-static", "int8-smooth")


def accuracy(a) -> dict:
    rows = [json.loads(line) for line in Path(a.prior_rows).read_text().splitlines()] if a.prior_rows else []
    for label, ref in (("fp", a.model), (_recipe(a.quantized)["method"], a.quantized)):
        model, tok = dgq.load_model(ref)
        ids, bos = eval_ids(a.text, tok, a.max_tokens)
        calib = calibration_windows(a.calib, tok, a.nsamples, a.calib_seqlen, 0)
        for mode in a.modes.split(","):
            if any(r["model"] == label and r["kv"] == mode for r in rows):
                continue  # measured by an earlier run of the same command (--prior-rows)
            kvcache.enable(model, "none")
            t0 = time.perf_counter()
            dgq.use_kv_cache(model, mode, calib if mode in ("int8-static", "int8-smooth") else None)
            calib_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            r = perplexity_of_ids(model, ids, a.seqlen, bos, progress=False)
            row = {"model": label, "kv": mode, "ppl": round(r["ppl"], 4), "nll": r["nll"], "windows": r["windows"],
                   "seconds": round(time.perf_counter() - t0, 1)}
            if mode in ("int8-static", "int8-smooth"):
                row["scales_seconds"] = round(calib_s, 1)
            if mode == "int8-static":
                row["k_scale_max"] = round(max(model.dgq_kv["k_scale"]) * 127, 3)
                row["v_scale_max"] = round(max(model.dgq_kv["v_scale"]) * 127, 3)
            if a.decode_tokens:
                t0 = time.perf_counter()
                d = perplexity_of_ids(model, ids[:a.decode_tokens], a.seqlen, bos, progress=False, decode=True)
                o = perplexity_of_ids(model, ids[:a.decode_tokens], a.seqlen, bos, progress=False)
                row["decode_check"] = {"tokens": a.decode_tokens, "ppl_decoded": round(d["ppl"], 4),
                                       "ppl_one_forward": round(o["ppl"], 4),
                                       "nll_abs_diff": abs(d["nll"] - o["nll"]),
                                       "seconds": round(time.perf_counter() - t0, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
        del model
    base = {r["model"]: r["ppl"] for r in rows if r["kv"] == "none"}
    for r in rows:
        r["delta_vs_fp_pct"] = round(100 * (r["ppl"] / base["fp"] - 1), 2)
        r["delta_vs_same_weights_pct"] = round(100 * (r["ppl"] / base[r["model"]] - 1), 2)
    return {"benchmark": "kv_cache accuracy", "model": a.model, "quantized": a.quantized,
            "quantized_recipe": _recipe(a.quantized),
            "text": a.text, "tokens": int(ids.numel()), "seqlen": a.seqlen,
            "static_calibration": {"text": a.calib, "windows": a.nsamples, "seqlen": a.calib_seqlen},
            "scoring": "one forward per window (attention reads dequantized K/V of every position); decode_check: "
                       "prefill of the first half + teacher-forced decode of the second half, one token per forward",
            "machine": machine_info(), "rows": rows}


def _recipe(path: str) -> dict:
    q = json.loads((Path(path) / "config.json").read_text())["quantization_config"]
    return {k: q["recipe"][k] for k in ("method", "group_size", "act")}


# -- memory ------------------------------------------------------------------------------------------------------
LLAMA7B = SHAPE  # the big-model benchmark's Llama-2-7B shape


def one_case(mode: str, tokens: int, decode_steps: int) -> dict:
    from transformers import DynamicCache, LlamaConfig

    cfg = LlamaConfig(**LLAMA7B)
    lay = kvcache.layout(cfg)
    h, d, n = lay["num_key_value_heads"], lay["head_dim"], lay["num_hidden_layers"]
    if mode == "none":
        cache = DynamicCache(config=cfg)
    elif mode == "int8":
        cache = kvcache.Int8KVCache(cfg, "int8")
    elif mode == "int8-smooth":
        cache = kvcache.Int8KVCache(cfg, "int8-smooth", {"k_smooth": [torch.full((h, d), 2.0)] * n})
    else:
        cache = kvcache.Int8KVCache(cfg, "int8-static", {"k_scale": [0.05] * n, "v_scale": [0.05] * n})
    gen = torch.Generator().manual_seed(0)
    # the prompt's random states, reused by every layer (the content does not change the bytes)
    k = (torch.randn(1, h, tokens, d, generator=gen) * 2).to(torch.bfloat16)
    v = (torch.randn(1, h, tokens, d, generator=gen) * 2).to(torch.bfloat16)
    base = proc_status_mb("VmRSS")
    t0 = time.perf_counter()
    for i in range(n):  # prefill: one update per layer with the whole prompt
        out = cache.update(k, v, i)
        del out
    prefill_s = time.perf_counter() - t0
    step_k, step_v = k[:, :, :1].clone(), v[:, :, :1].clone()
    t0 = time.perf_counter()
    for _ in range(decode_steps):
        for i in range(n):
            out = cache.update(step_k, step_v, i)  # what attention reads at this step
            del out
    step_ms = (time.perf_counter() - t0) / decode_steps * 1e3
    if mode == "none":
        held = sum(la.keys.nbytes + la.values.nbytes for la in cache.layers)
    else:
        held = cache.nbytes()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {"kv": mode, "tokens": tokens + decode_steps, "cache_bytes": held, "cache_gib": round(held / 2**30, 3),
            "bytes_per_token": held // (tokens + decode_steps), "rss_before_mb": round(base),
            "peak_rss_mb": round(peak), "peak_over_start_mb": round(peak - base),
            "prefill_update_s": round(prefill_s, 2), "decode_update_ms_per_step": round(step_ms, 2)}


def memory(a) -> dict:
    rows = [json.loads(line) for line in Path(a.prior_rows).read_text().splitlines()] if a.prior_rows else []
    for tokens in a.tokens:
        for mode in a.modes.split(","):
            if any(r["kv"] == mode and r["tokens"] == tokens + a.decode_steps for r in rows):
                continue
            out = subprocess.run([sys.executable, __file__, "_case", mode, str(tokens), str(a.decode_steps)],
                                 capture_output=True, text=True, check=True)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    for r in rows:
        fp = next(x for x in rows if x["tokens"] == r["tokens"] and x["kv"] == "none")
        r["bytes_vs_bf16"] = round(r["cache_bytes"] / fp["cache_bytes"], 4)
    lay = kvcache.layout(__import__("transformers").LlamaConfig(**LLAMA7B))
    per_tok_bf16 = 2 * lay["num_hidden_layers"] * lay["num_key_value_heads"] * lay["head_dim"] * 2
    per_tok_int8 = 2 * lay["num_hidden_layers"] * lay["num_key_value_heads"] * (lay["head_dim"] + 4)
    return {"benchmark": "kv_cache memory", "shape": {**lay, "states_dtype": "bfloat16", "batch": 1},
            "analytic_bytes_per_token": {"bf16": per_tok_bf16, "int8_dynamic": per_tok_int8,
                                         "int8_static": per_tok_int8 - 8 * lay["num_hidden_layers"]
                                         * lay["num_key_value_heads"]},
            "method": "Cache.update with the whole prompt per layer then single-token decode steps, random bf16 K/V, "
                      "one process per case; peak RSS from getrusage; update time includes handing attention the "
                      "full (dequantized) K/V of the layer",
            "gpu": "not measured: no GPU was lent to this session",
            "machine": machine_info(), "rows": rows}


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_case":
        torch.set_num_threads(2)
        print(json.dumps(one_case(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))))
        return
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    acc = sub.add_parser("accuracy")
    acc.add_argument("--model", required=True)
    acc.add_argument("--quantized", required=True, help="the model's DGQ checkpoint")
    acc.add_argument("--calib", required=True)
    acc.add_argument("--text", required=True)
    acc.add_argument("--nsamples", type=int, default=32)
    acc.add_argument("--calib-seqlen", type=int, default=512)
    acc.add_argument("--seqlen", type=int, default=1024)
    acc.add_argument("--max-tokens", type=int, default=32768)
    acc.add_argument("--decode-tokens", type=int, default=4096, help="0: no decode check")
    acc.add_argument("--modes", default=",".join(MODES), help="KV modes, comma-separated (default: all)")
    acc.add_argument("--prior-rows", help="JSON lines of rows an earlier run printed (their weights are skipped)")
    acc.add_argument("--out", required=True)
    mem = sub.add_parser("memory")
    mem.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384])
    mem.add_argument("--decode-steps", type=int, default=4)
    mem.add_argument("--modes", default=",".join(MODES), help="KV modes, comma-separated (default: all)")
    mem.add_argument("--prior-rows", help="JSON lines of rows an earlier run printed (skipped here)")
    mem.add_argument("--out", required=True)
    for p in (acc, mem):
        p.add_argument("--note", help="a remark stored in the JSON (e.g. what else ran on the machine)")
    a = ap.parse_args()
    res = accuracy(a) if a.cmd == "accuracy" else memory(a)
    if a.note:
        res["note"] = a.note
    Path(a.out).write_text(json.dumps(res, indent=2) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
