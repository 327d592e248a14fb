"""dgq checkpoints in vLLM through dgq's plugin (:mod:`dgq.vllm_plugin`, the quantization method ``dgq``): the
checkpoint's own 4-bit format in vLLM's memory, run by dgq's kernels.

SmolLM2-135M is quantized data-free (RTN, A8W4: 4-bit weights, group 64, dynamic int8 activations) and saved;
``vllm.LLM(model=ckpt)`` loads it through the plugin. Measured: perplexity through vLLM's ``prompt_logprobs`` on the
very token windows dgq's own evaluation scores (``dgq eval``: :func:`dgq.eval.perplexity.perplexity_of_ids` on the
loaded checkpoint), in float32 and bfloat16; greedy generation against dgq's; the bytes of the weights vLLM holds;
batch-1 decoding speed with the expanded-weight cache off (the default: 4-bit memory) and on. Tensor parallelism 2
runs on a tiny random Llama (SmolLM2's 9 attention heads do not split in 2): its NLL against tensor parallelism 1
and dgq's, and a group size a row-parallel split cannot honour, refused; the tiny model's W8A8 and W4A16
checkpoints (the peer formats a dgq checkpoint may hold) and the default recipe's rotated A8W4 checkpoint (norms
folded, residual stream rotated) at tensor parallelism 1 and 2.

vLLM runs in its own environment: ``DGQ_VLLM_PYTHON`` (default ``.venv-vllm/bin/python`` at the repository root),
with this checkout installed there (``pip install -e . --no-deps``: the plugin's entry point). Each engine is a
subprocess running ``benchmarks/vllm_plugin_worker.py``.

    python benchmarks/vllm_plugin.py [--windows 8] [--seqlen 512] [--json benchmarks/results/vllm_plugin_smollm2.json]
    python benchmarks/vllm_plugin.py --formats-only --json benchmarks/results/vllm_plugin_formats.json

The test ``tests/test_vllm_plugin.py`` runs the same functions on fewer windows.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

import dgq
from dgq.data import eval_ids, windows
from dgq.eval.perplexity import perplexity_of_ids

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().parent / "vllm_plugin_worker.py"
ALIAS = "smollm2-135m"
TEXT = "squad-wiki"
PROMPT = "The capital of France is"
RECIPE = {"method": "rtn", "group_size": 64}  # A8W4, dynamic per-token int8 activations
# relative perplexity difference vLLM vs dgq allowed (benchmarks/results/vllm_plugin_smollm2.json, float32 engine:
# +0.98% on the first 4 windows of 512 tokens, what the test scores, +0.39% on all 8; dgq against itself with eager
# instead of SDPA attention: +0.28% and +0.005%; per-window NLL gaps up to 0.016 and 0.013). The linears are bitwise
# dgq's; vLLM's attention and norms round differently at 1e-7, and dynamic int8 activations turn that into other
# rounding decisions downstream, so the gap is noise of the size dgq shows against itself, averaging out over more
# windows. About 2x the largest measured gap; a wrong nibble order, group scale, zero point or shard also breaks the
# bitwise layer check.
PPL_TOL_FP32 = 0.02
# bfloat16 engine against dgq's float32 evaluation (bfloat16 everywhere but the int8 GEMMs): measured -0.19%
PPL_TOL_BF16 = 0.02
TINY = {"hidden_size": 256, "intermediate_size": 512, "num_hidden_layers": 2, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 256}  # head_dim 64 (vLLM CPU: 32+)


def vllm_python() -> Path:
    return Path(os.environ.get("DGQ_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))


def plugin_status(py: Path | None = None) -> str | None:
    """Why the vLLM environment cannot run this checkout's plugin (None: it can)."""
    py = py or vllm_python()
    if not py.exists():
        return f"no vLLM environment at {py} (set DGQ_VLLM_PYTHON)"
    code = ("import importlib.metadata as m, json, os, dgq, vllm; print(json.dumps([os.path.dirname(dgq.__file__), "
            "[e.value for e in m.entry_points(group='vllm.general_plugins') if e.name == 'dgq']]))")
    p = subprocess.run([str(py), "-c", code], capture_output=True, text=True, timeout=300)
    if p.returncode:
        return f"{py} cannot import vllm and dgq: {p.stderr.strip().splitlines()[-1:]}"
    path, eps = json.loads(p.stdout.strip().splitlines()[-1])
    here = str(ROOT / "src" / "dgq")
    if Path(path).resolve() != Path(here).resolve() or eps != ["dgq.vllm_plugin:register"]:
        return (f"the vLLM environment's dgq is {path} (entry point {eps}), not this checkout: "
                f"{py.parent}/pip install -e {ROOT} --no-deps")
    return None


def run_worker(req: dict, workdir: Path, name: str, timeout: int = 1800) -> dict:
    """One engine: the request in, the worker's result out (with the DGQError lines of its log, if any)."""
    rq, rs = workdir / f"{name}.req.json", workdir / f"{name}.res.json"
    rq.write_text(json.dumps(req))
    t0 = time.perf_counter()
    p = subprocess.run([str(vllm_python()), str(WORKER), str(rq), str(rs)], capture_output=True, text=True,
                       timeout=timeout, cwd=workdir)
    if not rs.exists():
        raise RuntimeError(f"vLLM worker {name} failed (exit {p.returncode}):\n{p.stderr[-4000:]}")
    res = json.loads(rs.read_text())
    res["exit_status"], res["wall_s"] = p.returncode, round(time.perf_counter() - t0, 1)
    res["dgq_errors"] = sorted({ln.split("DGQError: ", 1)[1].strip() for ln in (p.stdout + p.stderr).splitlines()
                                if "DGQError: " in ln})  # vLLM logs its workers' errors on stdout
    return res


def build_smollm2(workdir: Path) -> tuple[Path, object]:
    model, tok = dgq.load_model(ALIAS)
    dgq.quantize(model, dgq.DGQConfig(**RECIPE), progress=False)
    ckpt = workdir / "smollm2-rtn-a8w4-g64"
    dgq.save(model, ckpt, tokenizer=tok)
    return ckpt, tok


def build_tiny(workdir: Path, group_size: int, method: str = "rtn", **recipe) -> Path:
    """A tiny random Llama (seeded), quantized with this group size (RTN A8W4 unless ``recipe`` says otherwise:
    ``w_bits=8`` W8A8, ``weights_only=True`` W4A16), saved without a tokenizer. A calibrated ``method`` gets random
    norm weights in [0.5, 1.5] and 4 seeded random windows of 64 tokens (``dgq-gptq``: the residual-stream rotation is
    on by default, so its checkpoint is rotated, with every norm folded into the linears: unit norm weights)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**TINY, tie_word_embeddings=False)).eval()
    calib = None
    if method != "rtn":  # norm weights other than 1, so that a folded (rotated) checkpoint shows it: unit norms
        with torch.no_grad():
            for name, m in model.named_modules():
                if name.endswith("norm"):
                    m.weight.uniform_(0.5, 1.5)
        calib = torch.randint(3, TINY["vocab_size"], (4, 64), generator=torch.Generator().manual_seed(2))
    dgq.quantize(model, dgq.DGQConfig(method=method, group_size=group_size, **recipe), calib=calib, progress=False)
    name = "tiny-llama-" + method + "-g" + str(group_size) + "".join(f"-{k}{v}" for k, v in recipe.items())
    ckpt = workdir / name
    dgq.save(model, ckpt)
    return ckpt


@torch.no_grad()
def dgq_reference(model, rows: torch.Tensor, prompt_ids: list[int] | None, n_gen: int, eos: int | None,
                  control: bool = False) -> dict:
    """What dgq computes for the checkpoint (``model = dgq.load(ckpt)``, float32): the perplexity of the windows
    ``rows`` (``dgq eval``'s function, per window too) and greedy tokens. ``control``: the perplexity again with
    transformers' eager attention instead of SDPA, a float-rounding-sized change inside dgq itself (dynamic int8
    activations turn such changes into different rounding decisions, so this is the noise floor of the comparison)."""
    def nll_of(rows_):
        return [perplexity_of_ids(model, row, rows_.shape[1], None, progress=False)["nll"] for row in rows_]

    t0 = time.perf_counter()
    per_window = nll_of(rows)
    out = {"nll_per_window": per_window, "nll": sum(per_window) / len(per_window),
           "scored_tokens": rows.numel() - rows.shape[0], "seconds": round(time.perf_counter() - t0, 1)}
    out["ppl"] = math.exp(out["nll"])
    if control:
        model.set_attn_implementation("eager")
        eager = nll_of(rows)
        model.set_attn_implementation("sdpa")
        out["control_eager_attention"] = {
            "ppl": math.exp(sum(eager) / len(eager)), "rel_diff": math.exp(sum(eager) / len(eager)) / out["ppl"] - 1,
            "max_abs_window_nll_diff": max(abs(a - b) for a, b in zip(eager, per_window, strict=True)),
            "rel_diff_first_4_windows": first4(eager) / first4(per_window) - 1}
    if prompt_ids:
        x = torch.tensor([prompt_ids])
        y = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=n_gen, min_new_tokens=n_gen,
                           do_sample=False, pad_token_id=eos)
        out["greedy_ids"] = y[0, len(prompt_ids):].tolist()
    return out


@torch.no_grad()
def margin_at_divergence(model, prompt_ids: list[int], ours: list[int], theirs: list[int]) -> float | None:
    """Where the greedy paths part: dgq's log-probability of its own token minus that of vLLM's (small: a near-tie
    that float rounding decided)."""
    n = next((i for i in range(min(len(ours), len(theirs))) if ours[i] != theirs[i]), None)
    if n is None:
        return None
    logp = torch.log_softmax(model(torch.tensor([prompt_ids + ours[:n]])).logits[0, -1].float(), -1)
    return (logp[ours[n]] - logp[theirs[n]]).item()


def first4(nll_per_window: list[float]) -> float:
    """Perplexity of the first 4 windows (what the test scores)."""
    return math.exp(sum(nll_per_window[:4]) / len(nll_per_window[:4]))


def compare(ref: dict, got: dict, n_gen: int) -> dict:
    """vLLM's perplexity and greedy tokens against dgq's."""
    p = got["perplexity"]
    res = {"ppl_vllm": p["ppl"], "ppl_dgq": ref["ppl"], "rel_diff": p["ppl"] / ref["ppl"] - 1,
           "nll_vllm": p["nll"], "nll_dgq": ref["nll"], "scored_tokens": p["scored_tokens"], "windows": p["windows"],
           "max_abs_window_nll_diff": max(abs(a - b) for a, b in zip(p["nll_per_window"], ref["nll_per_window"],
                                                                     strict=True)),
           "rel_diff_first_4_windows": first4(p["nll_per_window"]) / first4(ref["nll_per_window"]) - 1,
           "vllm_ppl_seconds": p["seconds"]}
    if "greedy" in got and "greedy_ids" in ref:
        a, b = got["greedy"]["ids"], ref["greedy_ids"]
        n = min(len(a), len(b))
        res["greedy_same_prefix_tokens"] = next((i for i in range(n) if a[i] != b[i]), n)
        res["greedy_tokens"] = n_gen
    return res


def quantized_weights(ckpt: Path) -> int:
    """Number of weights in the checkpoint's quantized linears."""
    q = json.loads((ckpt / "config.json").read_text())["quantization_config"]["modules"]
    return sum(m["in_features"] * m["out_features"] for m in q.values())


def memory(held: dict, n_weights: int) -> dict:
    """Bytes of the quantized linears' tensors vLLM holds (per rank) against their float sizes;
    ``codes_bytes_per_weight``: the uint8 bytes (DGQ: the packed codes; W4A16: codes and zero points)."""
    ranks = held["weight_bytes"]
    total = sum(r["quantized_total"] for r in ranks)
    return {"quantized_weights": n_weights, "per_rank": ranks, "quantized_bytes_all_ranks": total,
            "bytes_per_weight": total / n_weights, "codes_bytes_per_weight": sum(r["quantized"].get("uint8", 0)
                                                                                 for r in ranks) / n_weights,
            "bf16_bytes": 2 * n_weights, "fp32_bytes": 4 * n_weights}


def run_smollm2(workdir: Path, n_windows: int, seqlen: int, n_gen: int, dtypes=("float32",),
                speed: bool = False) -> dict:
    ckpt, tok = build_smollm2(workdir)
    ids, bos = eval_ids(TEXT, tok, max_tokens=n_windows * seqlen)
    rows = windows(ids, seqlen, bos)
    prompt = tok(PROMPT, add_special_tokens=False).input_ids
    model = dgq.load(ckpt)
    ref = dgq_reference(model, rows, prompt, n_gen, tok.eos_token_id, control=True)
    n_weights = quantized_weights(ckpt)
    base = {"model": str(ckpt), "max_model_len": seqlen + 16, "threads": 1, "layer_check": True,
            "windows": rows.tolist(), "greedy": {"prompt_ids": prompt, "max_tokens": n_gen}}
    res = {"model": ALIAS, "recipe": RECIPE, "text": TEXT, "seqlen": seqlen, "n_windows": int(rows.shape[0]),
           "prompt": PROMPT, "tolerance_rel_ppl": {"float32": PPL_TOL_FP32, "bfloat16": PPL_TOL_BF16},
           "dgq": {k: v for k, v in ref.items() if k != "nll_per_window"}, "engines": {}}
    res["dgq"]["greedy_text"] = tok.decode(ref["greedy_ids"])
    for dtype in dtypes:
        got = run_worker({**base, "dtype": dtype}, workdir, f"smollm2-{dtype}")
        if "load_error" in got:
            raise RuntimeError(f"vLLM refused the checkpoint ({dtype}): {got['load_error']} {got['dgq_errors']}")
        r = compare(ref, got, n_gen)
        r["greedy_dgq_logprob_margin_at_divergence"] = margin_at_divergence(model, prompt, ref["greedy_ids"],
                                                                           got["greedy"]["ids"])
        r.update({"greedy_text": tok.decode(got["greedy"]["ids"]), "layer_check": got["layer_check"],
                  "load_seconds": got["load_seconds"],
                  "model_dtype": got["model_dtype"], "quantization": got["quantization"], "layers": got["layers"],
                  "memory": memory(got, n_weights)})
        res["engines"][dtype] = r
        res["versions"] = got["versions"]
    if speed:
        res["speed"] = {}
        speed_req = {"model": str(ckpt), "max_model_len": 256, "threads": 1, "dtype": "float32",
                     "speed": {"prompt_ids": rows[0, :64].tolist(), "max_tokens": 32, "repeats": 2}}
        for cache in ("0", "1"):
            got = run_worker({**speed_req, "env": {"DGQ_VLLM_WEIGHT_CACHE": cache}}, workdir, f"speed-cache{cache}")
            res["speed"][f"DGQ_VLLM_WEIGHT_CACHE={cache}"] = {
                **got["speed"], "quantized_bytes": got["held_after_speed"]["weight_bytes"][0]["quantized_total"],
                "kernel_cache_bytes": got["held_after_speed"]["weight_bytes"][0]["kernel_cache"]}
    return res


def run_tp(workdir: Path, n_windows: int = 4, seqlen: int = 64, refused_group: int = 256) -> dict:
    """Tensor parallelism on the tiny Llama: g64 at TP 1 and 2 (and TP 1 compiled: torch.compile, not eager) against
    dgq; ``refused_group`` (the whole 256 inputs of o_proj, which TP 2 would split mid-group) must be refused, and so
    must an edited config.json (checksums)."""
    ckpt = build_tiny(workdir, 64)
    g = torch.Generator().manual_seed(0)
    rows = torch.randint(3, TINY["vocab_size"], (n_windows, seqlen), generator=g)
    ref = dgq_reference(dgq.load(ckpt), rows, None, 0, None)
    n_weights = quantized_weights(ckpt)
    res = {"model": "tiny random Llama " + json.dumps(TINY), "recipe": {"method": "rtn", "group_size": 64},
           "windows": n_windows, "seqlen": seqlen, "nll_dgq": ref["nll"], "engines": {}}
    for name, tp, eager in (("tp1", 1, True), ("tp2", 2, True), ("tp1-compiled", 1, False)):
        got = run_worker({"model": str(ckpt), "max_model_len": seqlen + 16, "dtype": "float32",
                          "tensor_parallel_size": tp, "enforce_eager": eager, "windows": rows.tolist()}, workdir,
                         f"tiny-{name}")
        if "load_error" in got:
            res["engines"][name] = {"load_error": got["load_error"], "dgq_errors": got["dgq_errors"]}
            continue
        p = got["perplexity"]
        res["engines"][name] = {
            "nll": p["nll"], "rel_diff_nll_vs_dgq": p["nll"] / ref["nll"] - 1,
            "max_abs_window_nll_diff": max(abs(a - b) for a, b in zip(p["nll_per_window"], ref["nll_per_window"],
                                                                      strict=True)),
            "load_seconds": got["load_seconds"], "wall_s": got["wall_s"], "memory": memory(got, n_weights)}
    bad = build_tiny(workdir, refused_group)
    got = run_worker({"model": str(bad), "max_model_len": seqlen + 16, "dtype": "float32",
                      "tensor_parallel_size": 2}, workdir, f"tiny-tp2-g{refused_group}")
    res["refused"] = {"group_size": refused_group, "load_error": got.get("load_error"),
                      "dgq_errors": got["dgq_errors"], "exit_status": got["exit_status"]}
    cfg = json.loads((ckpt / "config.json").read_text())  # an edited config.json: the checksums refuse it
    cfg["rms_norm_eps"] = 1e-3
    (ckpt / "config.json").write_text(json.dumps(cfg))
    got = run_worker({"model": str(ckpt), "max_model_len": seqlen + 16, "dtype": "float32"}, workdir, "tiny-edited")
    res["edited_config"] = {"load_error": got.get("load_error"), "exit_status": got["exit_status"]}
    return res


def run_formats(workdir: Path, n_windows: int = 4, seqlen: int = 64) -> dict:
    """The peer formats a dgq checkpoint may hold, on the tiny Llama at TP 1 and 2: W8A8 (per-channel int8 weights,
    dynamic int8 activations) and W4A16 (4-bit weights, float activations), NLL against dgq's; and ``rotated``: the
    default recipe (``dgq-gptq``, A8W4, residual stream rotated and norms folded into the linears)."""
    g = torch.Generator().manual_seed(1)
    rows = torch.randint(3, TINY["vocab_size"], (n_windows, seqlen), generator=g)
    res = {}
    for fmt, recipe in (("w8a8", {"w_bits": 8}), ("w4a16", {"weights_only": True}),
                        ("rotated", {"method": "dgq-gptq"})):
        recipe = {"method": "rtn", **recipe}
        ckpt = build_tiny(workdir, 64, **recipe)
        model = dgq.load(ckpt)
        ref = dgq_reference(model, rows, None, 0, None)
        res[fmt] = {"recipe": {"group_size": 64, **recipe}, "nll_dgq": ref["nll"],
                    "rotate_residual": model.dgq_config["recipe"]["rotate_residual"],
                    "norms_folded": all(bool((m.weight == 1).all()) for n, m in model.named_modules()
                                        if n.endswith("norm"))}
        for tp in (1, 2):
            got = run_worker({"model": str(ckpt), "max_model_len": seqlen + 16, "dtype": "float32",
                              "tensor_parallel_size": tp, "windows": rows.tolist()}, workdir, f"{fmt}-tp{tp}")
            if "load_error" in got:
                res[fmt][f"tp{tp}"] = {"load_error": got["load_error"], "dgq_errors": got["dgq_errors"]}
                continue
            res[fmt][f"tp{tp}"] = {"nll": got["perplexity"]["nll"],
                                   "rel_diff_nll_vs_dgq": got["perplexity"]["nll"] / ref["nll"] - 1,
                                   "layers": got["layers"], "memory": memory(got, quantized_weights(ckpt))}
    return res


def main() -> None:
    from dgq.provenance import machine_info

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=512)
    p.add_argument("--gen", type=int, default=16)
    p.add_argument("--no-tp", action="store_true", help="skip the tensor-parallel runs")
    p.add_argument("--json", default="benchmarks/results/vllm_plugin_smollm2.json")
    p.add_argument("--formats-only", action="store_true",
                   help="only the tiny Llama's checkpoint formats (W8A8, W4A16, rotated A8W4) at TP 1 and 2")
    a = p.parse_args()
    why = plugin_status()
    if why:
        sys.exit(why)
    with tempfile.TemporaryDirectory() as d:
        if a.formats_only:
            res = {"formats": run_formats(Path(d))}
        else:
            res = run_smollm2(Path(d), a.windows, a.seqlen, a.gen, dtypes=("float32", "bfloat16"), speed=True)
            if not a.no_tp:
                res["tensor_parallel"] = run_tp(Path(d))
                res["formats"] = run_formats(Path(d))
    res["machine"] = machine_info()
    for dtype, r in res.get("engines", {}).items():
        print(f"{dtype:9s} ppl vLLM {r['ppl_vllm']:.4f} dgq {r['ppl_dgq']:.4f} ({100 * r['rel_diff']:+.3f}%)  "
              f"greedy same {r['greedy_same_prefix_tokens']}/{r['greedy_tokens']}  "
              f"{r['memory']['bytes_per_weight']:.3f} bytes/weight")
    for k, s in res.get("speed", {}).items():
        print(f"{k}: decode {s['decode_tokens_per_s']} tok/s, prefill {s['prefill_s']} s, "
              f"kernel cache {s['kernel_cache_bytes']} bytes")
    for k, r in res.get("tensor_parallel", {}).get("engines", {}).items():
        print(f"tiny {k}: {r}")
    for k, r in res.get("formats", {}).items():
        print(f"tiny {k}: {r}")
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
