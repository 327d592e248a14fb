"""The vLLM side of ``vllm_plugin.py``: runs with the vLLM environment's Python (which has dgq installed, for the
plugin's entry point), reads a JSON request, writes a JSON result.

    .venv-vllm/bin/python benchmarks/vllm_plugin_worker.py REQUEST.json RESULT.json

Request: ``model`` (a dgq checkpoint folder), ``dtype``, ``max_model_len``, ``tensor_parallel_size``,
``enforce_eager`` (default true), ``threads``,
``env`` (extra environment, e.g. ``DGQ_VLLM_WEIGHT_CACHE``) and any of ``windows`` (lists of token ids: perplexity
through ``prompt_logprobs``), ``greedy`` (``prompt_ids``, ``max_tokens``) and ``speed`` (``prompt_ids``,
``max_tokens``, ``repeats``: batch-1 greedy decoding, wall clock) and ``layer_check`` (every quantized layer against
dgq's module on the same input). A model vLLM refuses gives ``{"load_error": ...}``
and exit status 3 (with tensor parallelism the workers' own error is in their log, on stderr).
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
import traceback

from vllm_worker import ENV  # noqa: E402,F401 - vLLM CPU settings shared with the ct worker (no vLLM import there)
from vllm_worker import perplexity as _perplexity  # noqa: E402


def engine_args(req: dict) -> dict:
    """Eager mode unless the request says otherwise (torch.compile: minutes on 2 cores), no prefix caching (every
    window scored from scratch); the tokenizer is skipped: prompts are token ids, outputs are compared as ids."""
    return {"model": req["model"], "dtype": req.get("dtype", "float32"), "max_model_len": req["max_model_len"],
            "tensor_parallel_size": req.get("tensor_parallel_size", 1),
            "enforce_eager": req.get("enforce_eager", True),
            "enable_prefix_caching": False, "seed": 0, "max_num_seqs": 8, "skip_tokenizer_init": True,
            "max_num_batched_tokens": max(req["max_model_len"], 2048)}


def versions() -> dict:
    import importlib.metadata as md

    import torch
    import transformers
    import vllm

    import dgq

    plugins = [e.value for e in md.entry_points(group="vllm.general_plugins") if e.name == "dgq"]
    return {"vllm": vllm.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "dgq": dgq.__version__, "dgq_path": os.path.dirname(dgq.__file__), "dgq_entry_point": plugins,
            "python": platform.python_version(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}


def sampling(**kw):
    from vllm import SamplingParams

    return SamplingParams(temperature=0.0, detokenize=False, **kw)


def prompts(ids_list):
    from vllm.inputs import TokensPrompt

    return [TokensPrompt(prompt_token_ids=ids) for ids in ids_list]


def perplexity(llm, windows: list[list[int]]) -> dict:
    """NLL per window from vLLM's prompt log-probabilities (the ct worker's; no tokenizer in this engine)."""
    return _perplexity(llm, windows, detokenize=False)


def greedy(llm, prompt_ids: list[int], max_tokens: int) -> dict:
    o = llm.generate(prompts([prompt_ids]), sampling(max_tokens=max_tokens, logprobs=1), use_tqdm=False)[0]
    out = o.outputs[0]
    return {"ids": list(out.token_ids),
            "logprobs": [float(d[t].logprob) for t, d in zip(out.token_ids, out.logprobs or [], strict=False)]}


def speed(llm, prompt_ids: list[int], max_tokens: int, repeats: int) -> dict:
    """Batch-1 greedy decoding of ``max_tokens`` tokens (EOS ignored), best of ``repeats``; the prompt's prefill is
    timed apart (one token generated)."""
    llm.generate(prompts([prompt_ids]), sampling(max_tokens=2), use_tqdm=False)  # warm-up
    best_prefill, best_total = math.inf, math.inf
    for _ in range(repeats):
        t0 = time.perf_counter()
        llm.generate(prompts([prompt_ids]), sampling(max_tokens=1), use_tqdm=False)
        t1 = time.perf_counter()
        llm.generate(prompts([prompt_ids]), sampling(max_tokens=max_tokens, min_tokens=max_tokens, ignore_eos=True),
                     use_tqdm=False)
        t2 = time.perf_counter()
        best_prefill, best_total = min(best_prefill, t1 - t0), min(best_total, t2 - t1)
    decode = max(best_total - best_prefill, 1e-9)
    return {"prompt_tokens": len(prompt_ids), "new_tokens": max_tokens, "prefill_s": round(best_prefill, 3),
            "total_s": round(best_total, 3), "decode_tokens_per_s": round((max_tokens - 1) / decode, 3),
            "repeats": repeats}


def held(llm) -> dict:
    """Per rank: the bytes of the weights vLLM holds and what the quantized layers run (``dgq.vllm_plugin``)."""
    from dgq.vllm_plugin.engine import describe, weight_bytes

    return {"weight_bytes": llm.apply_model(weight_bytes), "layers": [json.loads(d) for d in llm.apply_model(describe)]}


def layer_check(llm, ckpt: str) -> dict:
    """Every quantized vLLM layer against dgq's own modules of the checkpoint (``dgq.load``, unfused) on the same
    random input: the largest absolute difference (0: bitwise equal). Tensor parallelism 1 only."""
    import torch

    import dgq

    ref = dgq.load(ckpt, fuse=False)

    def check(model) -> dict:
        worst, n = 0.0, 0
        g = torch.Generator().manual_seed(0)
        for mod in model.modules():
            if "dgq_runtime" not in mod.__dict__:
                continue
            rt = mod.__dict__["dgq_runtime"]
            dtype = next(p for p in model.parameters() if p.is_floating_point()).dtype
            x = (torch.randn(7, rt.in_features, generator=g) * 3).to(dtype)
            with torch.no_grad():
                got = mod(x)[0]
                want = torch.cat([ref.get_submodule(name)(x) for name in mod.quant_method.spec.names], -1)
            worst = max(worst, (got.float() - want.float()).abs().max().item())
            n += 1
        return {"layers": n, "max_abs_diff": worst}

    return llm.apply_model(check)[0]


def main() -> int:
    req_path, out_path = sys.argv[1], sys.argv[2]
    req = json.loads(open(req_path).read())
    threads = str(req.get("threads", 1))
    os.environ.update(ENV)
    os.environ.update({"OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads, **req.get("env", {})})
    import torch

    torch.set_num_threads(int(threads))
    res: dict = {"versions": versions(), "engine_args": engine_args(req), "env": {**ENV, **req.get("env", {})},
                 "threads": int(threads)}

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
    mc = llm.llm_engine.model_config
    res["model_dtype"], res["quantization"] = str(mc.dtype), mc.quantization
    res.update(held(llm))
    if req.get("layer_check"):
        res["layer_check"] = layer_check(llm, req["model"])
    if req.get("windows"):
        res["perplexity"] = perplexity(llm, req["windows"])
    if req.get("greedy"):
        res["greedy"] = greedy(llm, req["greedy"]["prompt_ids"], req["greedy"]["max_tokens"])
    if req.get("speed"):
        s = req["speed"]
        res["speed"] = speed(llm, s["prompt_ids"], s["max_tokens"], s.get("repeats", 1))
        res["held_after_speed"] = held(llm)  # with the weight cache on, what dgq's kernels cached meanwhile
    open(out_path, "w").write(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":  # spawned tensor-parallel workers import this module: nothing may run on import
    sys.exit(main())
