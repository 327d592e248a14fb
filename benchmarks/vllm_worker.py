"""The vLLM side of ``vllm_check.py`` and ``serving.py``: runs with the vLLM venv's Python (``.venv-vllm``, which
need not have dgq), reads a JSON request, writes a JSON result. Self-contained: it imports vLLM only.

    .venv-vllm/bin/python benchmarks/vllm_worker.py REQUEST.json RESULT.json

Request: ``model`` (a compressed-tensors folder), ``dtype``, ``threads``, ``max_model_len`` and any of
``windows`` (lists of token ids: perplexity through ``prompt_logprobs``), ``greedy`` (``prompt_ids``,
``max_tokens``: greedy continuation) and ``serve`` (``prompts`` as lists of token ids, ``max_tokens``, ``modes``:
``batch1`` one request at a time, ``batched`` all in one ``generate``; wall-clock tokens/s) and ``int8_linears``
(``in``, ``out``: safetensors files; vLLM's int8 linear kernels alone, no ``model`` needed). A model vLLM refuses
to load gives ``{"load_error": ...}`` and exit status 3; one that loads but fails to run (a kernel missing from
this CPU build) ``{"run_error": ...}`` and exit status 4.

The settings that make vLLM CPU work on a small shared machine live here, in :data:`ENV` and :func:`engine_args`,
and nowhere else.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
import traceback

# vLLM CPU settings, set before vLLM is imported. The engine runs in this process (no engine-core subprocess: the
# real exception of a refused model reaches us, and no core is reserved for a scheduler process, which vLLM's
# automatic binding would do, leaving 1 of 2 cores); the KV cache gets a fixed 1 GiB (SmolLM2-135M needs ~45 KB per
# token in float32), so vLLM neither reserves 90% of RAM nor profiles memory; the threads are bound by us below.
ENV = {
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_CPU_OMP_THREADS_BIND": "nobind",
    "VLLM_LOGGING_LEVEL": "WARNING",
    "VLLM_NO_USAGE_STATS": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}


def engine_args(req: dict) -> dict:
    """``vllm.LLM`` keyword arguments: eager mode (no torch.compile / inductor, minutes on 2 cores), no prefix
    caching (every prompt is scored from scratch, so ``prompt_logprobs`` covers each position), greedy sampling is
    per request."""
    return {"model": req["model"], "dtype": req.get("dtype", "float32"), "max_model_len": req["max_model_len"],
            "enforce_eager": True, "enable_prefix_caching": False, "seed": 0,
            "max_num_seqs": req.get("max_num_seqs", 16),
            "max_num_batched_tokens": max(req["max_model_len"], req.get("max_num_batched_tokens", 2048))}


def versions() -> dict:
    import compressed_tensors
    import torch
    import transformers
    import vllm

    return {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "compressed_tensors": compressed_tensors.__version__, "python": platform.python_version(),
            "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def perplexity(llm, windows: list[list[int]], detokenize: bool = True) -> dict:
    """NLL of each window's tokens 1..L-1 from vLLM's prompt log-probabilities (raw logits, before sampling);
    ``detokenize=False`` for an engine started without its tokenizer (``skip_tokenizer_init``)."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=detokenize)
    t0 = time.perf_counter()
    outs = llm.generate([TokensPrompt(prompt_token_ids=w) for w in windows], sp, use_tqdm=False)
    secs = time.perf_counter() - t0
    per_window, nll, count = [], 0.0, 0
    for w, o in zip(windows, outs, strict=True):
        plp = o.prompt_logprobs
        assert plp is not None and len(plp) == len(w), (len(plp or []), len(w))
        s = -sum(plp[i][w[i]].logprob for i in range(1, len(w)))
        per_window.append(s / (len(w) - 1))
        nll += s
        count += len(w) - 1
    return {"ppl": math.exp(nll / count), "nll": nll / count, "scored_tokens": count, "windows": len(windows),
            "nll_per_window": per_window, "seconds": round(secs, 2)}


def greedy(llm, prompt_ids: list[int], max_tokens: int) -> dict:
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0, logprobs=2)
    o = llm.generate([TokensPrompt(prompt_token_ids=prompt_ids)], sp, use_tqdm=False)[0].outputs[0]
    return {"ids": list(o.token_ids), "text": o.text,
            "top2": [[[int(t), float(lp.logprob)] for t, lp in sorted(d.items(), key=lambda kv: -kv[1].logprob)]
                     for d in (o.logprobs or [])]}


def serve(llm, prompts: list[list[int]], max_tokens: int, modes: list[str], repeats: int = 1) -> dict:
    """Wall-clock generation of ``max_tokens`` greedy tokens (EOS ignored) per prompt; best of ``repeats``."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=max_tokens, min_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    tp = [TokensPrompt(prompt_token_ids=p) for p in prompts]
    llm.generate(tp[:1], SamplingParams(max_tokens=4, temperature=0.0), use_tqdm=False)  # warm-up
    out = {}
    for mode in modes:
        best, texts = None, None
        for _ in range(repeats):
            t0 = time.perf_counter()
            if mode == "batch1":
                res = [llm.generate([p], sp, use_tqdm=False)[0] for p in tp]
            elif mode == "batched":
                res = llm.generate(tp, sp, use_tqdm=False)
            else:
                raise ValueError(f"unknown serve mode {mode!r}")
            secs = time.perf_counter() - t0
            best = secs if best is None else min(best, secs)
            texts = [list(r.outputs[0].token_ids) for r in res]
        n = sum(len(t) for t in texts)
        out[mode] = {"seconds": round(best, 3), "new_tokens": n, "tokens_per_s": n / best, "ids": texts}
    return out


def int8_linears(path_in: str, path_out: str) -> dict:
    """vLLM CPU's own int8 linear kernels (the ones its compressed-tensors W8A8 scheme calls on x86) on the tensors
    ``NAME.x`` (float input ``[M, K]``), ``NAME.w8`` (int8 weight ``[N, K]``), ``NAME.ws`` (float32 scale
    ``[N, 1]``): writes ``NAME.x8``, ``NAME.sx`` (its dynamic per-token quantization) and ``NAME.y`` (the output)."""
    import torch
    from safetensors.torch import load_file, save_file
    from vllm import _custom_ops as ops
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    t = load_file(path_in)
    out = {}
    for n in sorted({k.rsplit(".", 1)[0] for k in t}):
        x, w8, ws = t[f"{n}.x"].contiguous(), t[f"{n}.w8"], t[f"{n}.ws"].contiguous()
        x8, sx, _ = ops.onednn_scaled_int8_quant(x, None, None, True)
        handler = ops.create_onednn_scaled_mm(w8.t(), ws, x.dtype, True, False, 32)  # as CPUInt8ScaledMMLinearKernel
        y = torch.empty(x.shape[0], w8.shape[0], dtype=x.dtype)
        ops.onednn_scaled_mm(handler, x8, y, sx, None, None, None)
        out.update({f"{n}.x8": x8, f"{n}.sx": sx.reshape(-1).contiguous(), f"{n}.y": y})
    save_file(out, path_out)
    return {"linears": len(out) // 3}


def main() -> int:
    req_path, out_path = sys.argv[1], sys.argv[2]
    req = json.loads(open(req_path).read())
    threads = str(req.get("threads", 2))
    os.environ.update(ENV)
    os.environ.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads})
    import torch

    torch.set_num_threads(int(threads))
    res: dict = {"versions": versions(), "threads": int(threads)}
    if req.get("int8_linears"):
        res["int8_linears"] = int8_linears(req["int8_linears"]["in"], req["int8_linears"]["out"])
    if not req.get("model"):
        open(out_path, "w").write(json.dumps(res, indent=1) + "\n")
        return 0
    res.update({"engine_args": engine_args(req), "env": ENV})

    from vllm import LLM

    t0 = time.perf_counter()
    try:
        llm = LLM(**engine_args(req))
    except Exception as e:  # noqa: BLE001 - any refusal is the answer here
        res["load_error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()[-4000:]
        open(out_path, "w").write(json.dumps(res, indent=1) + "\n")
        return 3
    res["load_seconds"] = round(time.perf_counter() - t0, 1)
    res["model_dtype"] = str(llm.llm_engine.model_config.dtype)
    try:
        if req.get("windows"):
            res["perplexity"] = perplexity(llm, req["windows"])
        if req.get("greedy"):
            res["greedy"] = greedy(llm, req["greedy"]["prompt_ids"], req["greedy"]["max_tokens"])
        if req.get("serve"):
            s = req["serve"]
            res["serve"] = serve(llm, s["prompts"], s["max_tokens"], s.get("modes", ["batch1", "batched"]),
                                 s.get("repeats", 1))
    except Exception as e:  # noqa: BLE001 - e.g. a kernel this CPU build of vLLM lacks
        res["run_error"] = f"{type(e).__name__}: {e}"
        res["traceback"] = traceback.format_exc()[-4000:]
        open(out_path, "w").write(json.dumps(res, indent=1) + "\n")
        return 4
    open(out_path, "w").write(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
