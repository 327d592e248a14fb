"""Generation speed (and perplexity) of one dgq checkpoint in each engine that runs it on the CPU: dgq's own runtime
(``model.generate``, as ``dgq generate`` runs it), vLLM CPU (the ``ct-w8a8`` export, and the dgq checkpoint itself
through dgq's vLLM plugin), llama.cpp (llama-cpp-python,
the ``gguf-q4_1`` and ``gguf-q8_0`` exports) and, for scale, transformers on the unquantized float32 model.

Every engine gets the same token ids: ``--prompts`` prompts (the first WikiText-2 test paragraphs, cut to
``--prompt-tokens`` tokens), ``--new-tokens`` greedy tokens each (EOS ignored), on ``--threads`` threads, one engine
at a time in this one run. ``batch1``: the prompts one after another; ``batched``: all of them in one call, where the
engine has such a mode (dgq/transformers: ``generate`` on the left-padded batch; vLLM: one ``generate`` call; the
llama-cpp-python API has none). Tokens/s = generated tokens / wall-clock seconds of the mode, best of ``--repeats``
(after one warm-up generation); load time is not counted. Perplexity (``--ppl-windows`` windows of ``--seqlen``
tokens of WikiText-2 test, the windows dgq's evaluation scores): dgq's own evaluation, the ``ct-w8a8`` export
through transformers (compressed-tensors' own float emulation), vLLM, llama.cpp; ``--ppl-windows 0`` skips it.

Timings are meaningless on a busy machine: run it alone.

    python benchmarks/serving.py [--ckpt DIR] [--threads 2] [--prompts 8] [--new-tokens 64] [--repeats 2]
        [--ppl-windows 4] [--json benchmarks/results/serving_smollm2.json]

The checkpoint is SmolLM2-135M quantized data-free (RTN A8W4, group 64, int8 dynamic activations) unless ``--ckpt``
names another dgq checkpoint of an alias model (the GGUF exports need the alias's source GGUF).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(__file__))
import dgq  # noqa: E402
import llamacpp_check as lc  # noqa: E402
import vllm_check as vc  # noqa: E402
from _common import machine_info  # noqa: E402
from dgq.data import eval_ids, read_text, windows  # noqa: E402
from dgq.eval.perplexity import perplexity_of_ids  # noqa: E402

RECIPE = vc.RECIPES["ct-w8a8"]
GGUF_TARGETS = ("gguf-q4_1", "gguf-q8_0")


def build(workdir: Path, ckpt: Path | None) -> dict:
    """The checkpoint (quantized here unless given) and its ``ct-w8a8`` and GGUF exports."""
    if ckpt is None:
        model, tok = dgq.load_model(vc.ALIAS)
        dgq.quantize(model, dgq.DGQConfig(**RECIPE), progress=False)
        ckpt = workdir / "ckpt"
        dgq.save(model, ckpt, tokenizer=tok)
    out = {"ckpt": Path(ckpt), "ct-w8a8": dgq.export(ckpt, to="ct-w8a8", out=workdir / "ct-w8a8")}
    for to in GGUF_TARGETS:
        out[to] = dgq.export(ckpt, to=to, out=workdir / f"model-{to}.gguf")
    return out


def prompt_set(tok, n: int, length: int, text: Path = vc.TEXT) -> list[list[int]]:
    """The first ``n`` paragraphs of ``text`` with at least ``length`` tokens, each cut to ``length`` tokens."""
    out = []
    for para in read_text(str(text)).split("\n"):
        ids = tok(para.strip(), add_special_tokens=False).input_ids
        if len(ids) >= length:
            out.append(ids[:length])
            if len(out) == n:
                return out
    raise ValueError(f"{text} has fewer than {n} paragraphs of {length} tokens")


# -- dgq / transformers -------------------------------------------------------------------------------------------
@torch.no_grad()
def hf_generate(model, prompts: list[list[int]], new: int, pad: int) -> list[list[int]]:
    """Greedy ``new`` tokens for each prompt in one ``generate`` call (left-padded batch)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    y = model.generate(ids, attention_mask=mask, max_new_tokens=new, min_new_tokens=new, do_sample=False,
                       pad_token_id=pad)
    return y[:, width:].tolist()


def timed(fn, repeats: int) -> tuple[float, object]:
    best, out = None, None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        dt = time.perf_counter() - t0
        best = dt if best is None else min(best, dt)
    return best, out


def hf_speed(model, prompts, new: int, pad: int, repeats: int) -> dict:
    hf_generate(model, prompts[:1], 4, pad)  # warm-up (weight caches, kernel choice)
    res = {}
    for mode in ("batch1", "batched"):
        if mode == "batch1":
            secs, ids = timed(lambda: [hf_generate(model, [p], new, pad)[0] for p in prompts], repeats)
        else:
            secs, ids = timed(lambda: hf_generate(model, prompts, new, pad), repeats)
        n = sum(len(x) for x in ids)
        res[mode] = {"seconds": round(secs, 3), "new_tokens": n, "tokens_per_s": n / secs, "ids": ids}
    return res


def hf_ppl(model, rows: torch.Tensor) -> float:
    per = [perplexity_of_ids(model, r, rows.shape[1], None, progress=False)["nll"] for r in rows]
    return math.exp(sum(per) / len(per))


def ct_transformers_ppl(export: Path, rows: torch.Tensor) -> dict:
    """The ct-w8a8 export loaded by transformers (compressed-tensors decompresses it; activations fake-quantized
    by compressed-tensors' own rule)."""
    from transformers import AutoModelForCausalLM

    try:
        m = AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32).eval()
    except Exception as e:  # noqa: BLE001 - record why transformers cannot run it
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
    import compressed_tensors

    return {"ppl": hf_ppl(m, rows), "compressed_tensors": compressed_tensors.__version__}


def exports_in_transformers(workdir: Path, paths: dict, rows: torch.Tensor) -> dict:
    """Each 4-bit export through transformers' own loaders, against dgq's evaluation of the same weights with
    float activations (what those targets carry: ``ct-w4a16`` and GGUF have no int8 activations): the RTN A8W4
    checkpoint's weights quantized ``weights_only`` in the DGQ format (the same codes and scales), exported to
    ``ct-w4a16`` (loaded with ``CompressedTensorsConfig(dequantize=True)``: transformers' packed route expects
    unpacked zero points), and the GGUF exports through ``from_pretrained(gguf_file=...)`` (float32)."""
    from transformers import AutoModelForCausalLM, CompressedTensorsConfig

    model, tok = dgq.load_model(vc.ALIAS)
    dgq.quantize(model, dgq.DGQConfig(**vc.RECIPES["ct-w4a16"]), progress=False)  # DGQ format, weights only
    wo = workdir / "ckpt-weights-only"
    dgq.save(model, wo, tokenizer=tok)
    res = {"dgq_weights_only": {"ppl": hf_ppl(model, rows), "what": "dgq's evaluation, DGQ weights, float activations"}}
    del model
    ct_dir = dgq.export(wo, to="ct-w4a16", out=workdir / "ct-w4a16")
    m = AutoModelForCausalLM.from_pretrained(ct_dir, dtype=torch.float32,
                                             quantization_config=CompressedTensorsConfig(dequantize=True)).eval()
    res["ct-w4a16"] = {"ppl": hf_ppl(m, rows), "what": "ct-w4a16 export, transformers + compressed-tensors "
                       "(dequantized; folded scale s_ch*s_int rounded to the model dtype)"}
    del m
    for to in GGUF_TARGETS:
        f = Path(paths[to])
        m = AutoModelForCausalLM.from_pretrained(f.parent, gguf_file=f.name, dtype=torch.float32).eval()
        res[to] = {"ppl": hf_ppl(m, rows), "what": f"{to} export, transformers' GGUF loader (float32)"}
        del m
    ref = res["dgq_weights_only"]["ppl"]
    for r in res.values():
        r["rel_diff_vs_dgq_weights_only"] = r["ppl"] / ref - 1
    return res


# -- llama.cpp ----------------------------------------------------------------------------------------------------
def llama_generate(llm, prompt: list[int], new: int) -> list[int]:
    """Greedy ``new`` tokens (argmax, EOS ignored) through llama.cpp's own sampler chain (top-k 1)."""
    out = []
    for t in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(int(t))
        if len(out) == new:
            break
    return out


def llama_speed(path: Path, prompts, new: int, threads: int, repeats: int, ctx: int) -> dict:
    import llama_cpp

    llm = llama_cpp.Llama(model_path=str(path), n_ctx=ctx, n_threads=threads, n_threads_batch=threads,
                          n_batch=min(512, ctx), verbose=False)
    llama_generate(llm, prompts[0], 4)  # warm-up
    secs, ids = timed(lambda: [llama_generate(llm, p, new) for p in prompts], repeats)
    llm.close()
    n = sum(len(x) for x in ids)
    return {"batch1": {"seconds": round(secs, 3), "new_tokens": n, "tokens_per_s": n / secs, "ids": ids},
            "batched": None, "batched_note": "llama-cpp-python's high-level API generates one sequence at a time"}


# -- the run ------------------------------------------------------------------------------------------------------
def agreement(a: list[list[int]], b: list[list[int]]) -> float:
    """Mean number of leading tokens two engines' greedy continuations share, per prompt."""
    def same(x, y):
        return next((i for i in range(min(len(x), len(y))) if x[i] != y[i]), min(len(x), len(y)))
    return sum(same(x, y) for x, y in zip(a, b, strict=True)) / len(a)


def run(workdir: Path, ckpt: Path | None = None, threads: int = 2, n_prompts: int = 8, prompt_tokens: int = 32,
        new: int = 64, repeats: int = 2, ppl_windows: int = 4, seqlen: int = 1024, engines: tuple = ()) -> dict:
    torch.set_num_threads(threads)
    paths = build(workdir, ckpt)
    model, tok = dgq.load_model(str(paths["ckpt"]))
    pad = tok.eos_token_id
    prompts = prompt_set(tok, n_prompts, prompt_tokens)
    rows = None
    if ppl_windows:
        ids, bos = eval_ids(str(vc.TEXT), tok, max_tokens=ppl_windows * seqlen)
        rows = windows(ids, seqlen, bos)
    engines = engines or ("dgq", "transformers-fp32", "vllm", "vllm-dgq-plugin", *GGUF_TARGETS,
                          "exports-in-transformers")
    res = {"model": vc.ALIAS if ckpt is None else Path(ckpt).name, "recipe": RECIPE if ckpt is None else None,
           "threads": threads, "prompts": n_prompts, "prompt_tokens": prompt_tokens, "new_tokens": new,
           "repeats": repeats, "greedy": True,
           "ppl": {"text": str(vc.TEXT.relative_to(vc.ROOT.parent)), "windows": ppl_windows, "seqlen": seqlen},
           "engines": {}}
    e = res["engines"]
    if "dgq" in engines:
        e["dgq"] = {"what": "dgq runtime (DGQ A8W4 modules, CPU int8 kernel), transformers generate",
                    **hf_speed(model, prompts, new, pad, repeats)}
        if rows is not None:
            e["dgq"]["ppl"] = hf_ppl(model, rows)
            e["dgq"]["ppl_ct_w8a8_transformers"] = ct_transformers_ppl(paths["ct-w8a8"], rows)
    del model
    if "transformers-fp32" in engines:
        fp, _ = dgq.load_model(vc.ALIAS)
        e["transformers-fp32"] = {"what": "the unquantized model, float32, transformers generate",
                                  **hf_speed(fp, prompts, new, pad, repeats)}
        if rows is not None:
            e["transformers-fp32"]["ppl"] = hf_ppl(fp, rows)
        del fp
    vllm_runs = {"vllm": (paths["ct-w8a8"], "vLLM CPU, ct-w8a8 export (int8 W8A8, dynamic per-token), float32, eager"),
                 "vllm-dgq-plugin": (paths["ckpt"], "vLLM CPU, the dgq checkpoint itself through dgq's plugin "
                                     "(4-bit weights, expanded per call: DGQ_VLLM_WEIGHT_CACHE unset), float32, eager")}
    for name, (model_dir, what) in vllm_runs.items():
        if name not in engines:
            continue
        req = {"model": str(model_dir), "dtype": "float32", "threads": threads,
               "max_model_len": max(prompt_tokens + new, seqlen) + 8, "max_num_seqs": max(n_prompts, 1),
               "serve": {"prompts": prompts, "max_tokens": new, "modes": ["batch1", "batched"], "repeats": repeats}}
        if rows is not None:
            req["windows"] = rows.tolist()
        r = vc.run_worker(req, workdir / name)
        if "serve" not in r:
            e[name] = {"error": r.get("load_error") or r.get("run_error")}
        else:
            e[name] = {"what": what, **r["serve"], "load_seconds": r["load_seconds"], "versions": r["versions"],
                       "engine_args": r["engine_args"], "env": r["env"]}
            if "perplexity" in r:
                e[name]["ppl"] = r["perplexity"]["ppl"]
    if "exports-in-transformers" in engines and rows is not None:
        res["exports_in_transformers"] = exports_in_transformers(workdir, paths, rows)
    for to in GGUF_TARGETS:
        if to not in engines:
            continue
        import llama_cpp

        e[to] = {"what": f"llama.cpp (llama-cpp-python {llama_cpp.__version__}), {to} export",
                 **llama_speed(paths[to], prompts, new, threads, repeats, max(prompt_tokens + new, seqlen) + 8)}
        if rows is not None:
            import llama_cpp

            llm = llama_cpp.Llama(model_path=str(paths[to]), n_ctx=seqlen, logits_all=True, n_threads=threads,
                                  n_threads_batch=threads, n_batch=seqlen, verbose=False)
            e[to]["ppl"] = lc.llama_ppl(llm, rows.flatten(), seqlen, None)["ppl"]
            llm.close()
    ref = e.get("dgq", {}).get("batch1", {}).get("ids")
    for r in e.values():
        if ref and isinstance(r, dict) and r.get("batch1"):
            r["batch1"]["greedy_agreement_with_dgq"] = agreement(r["batch1"]["ids"], ref)
    return res


def versions(res: dict) -> dict:
    import compressed_tensors
    import transformers

    out = {"dgq": dgq.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
           "compressed_tensors": compressed_tensors.__version__}
    try:
        import llama_cpp

        out["llama_cpp_python"] = llama_cpp.__version__
    except ImportError:
        pass
    v = res["engines"].get("vllm", {}).get("versions")
    if v:
        out["vllm_venv"] = v
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", type=Path)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--prompt-tokens", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--ppl-windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--engines", default="", help="comma-separated subset of: dgq, transformers-fp32, vllm, "
                                                 "vllm-dgq-plugin, exports-in-transformers, "
                                                 + ", ".join(GGUF_TARGETS))
    p.add_argument("--json", default="benchmarks/results/serving_smollm2.json")
    a = p.parse_args()
    engines = tuple(x for x in a.engines.split(",") if x)
    if not engines or {"vllm", "vllm-dgq-plugin"} & set(engines):
        why = vc.missing_vllm()
        if why:
            sys.exit(why)
    with tempfile.TemporaryDirectory() as d:
        res = run(Path(d), a.ckpt, a.threads, a.prompts, a.prompt_tokens, a.new_tokens, a.repeats, a.ppl_windows,
                  a.seqlen, engines)
    res["machine"] = machine_info()
    res["versions"] = versions(res)
    res["machine"]["load_average_at_end"] = os.getloadavg()
    for name, r in res["engines"].items():
        if "error" in r:
            print(f"{name:18s} error: {r['error'][:200]}")
            continue
        b1, bb = r["batch1"], r.get("batched")
        print(f"{name:18s} batch1 {b1['tokens_per_s']:7.1f} tok/s  batched "
              + (f"{bb['tokens_per_s']:7.1f} tok/s" if bb else "      -")
              + (f"  ppl {r['ppl']:.4f}" if "ppl" in r else ""))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
