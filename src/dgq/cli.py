"""The ``dgq`` command: a thin layer over the Python API. The CLI is the host program, so it (not the library)
quiets transformers' logging."""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import TextStreamer

from . import methods
from .api import use_kv_cache
from .checkpoint import parse_size
from .compare import compare
from .config import DGQConfig
from .data import calibration_windows
from .errors import DGQError
from .eval.perplexity import perplexity
from .eval.tasks import check_tasks, evaluate_tasks, format_table
from .export import TARGETS as EXPORT_TARGETS
from .export import export
from .fsutil import check_output_dir, check_output_file
from .kvcache import KV_MODES
from .models import check_model_folder, load_model, load_tokenizer, model_folder
from .stream import quantize_to


def one_line(text: str) -> str:
    """``text`` with control characters (newlines in a path or a flag's value) shown escaped, on one line."""
    return re.sub(r"[\x00-\x1f\x7f\x85\u2028\u2029]", lambda m: repr(m.group())[1:-1], str(text))


class _Parser(argparse.ArgumentParser):
    """Argument errors as every other error: one line ``dgq: error: ...``, exit code 2 (``--help`` for usage)."""

    def error(self, message):
        self.exit(2, f"dgq: error: {one_line(message)} (see {self.prog} --help)\n")


def _int_at_least(low: int, name: str = "value"):
    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {v}")
        return v

    parse.__name__ = name
    return parse


def _group_size(text: str) -> int:
    v = _int_at_least(-1)(text)
    if v == 0:
        raise argparse.ArgumentTypeError("must be a positive size or -1 (per-channel), got 0")
    return v


def _unit_float(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not 0.0 <= v <= 1.0:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1], got {v}")
    return v


POSITIVE = _int_at_least(1, "positive int")
SEQLEN = _int_at_least(2, "sequence length")  # a window of one token scores nothing


def _add_model(p):
    p.add_argument("model", help="HF folder, .gguf file, dgq checkpoint, or alias (smollm2-135m)")


def _add_calib(p):
    p.add_argument("--calib", default="squad-wiki",
                   help="calibration text for the calibrated methods and static activation or KV scales: a file, "
                        "lambada or squad-wiki (default: squad-wiki, the packaged SQuAD Wikipedia paragraphs)")
    p.add_argument("--nsamples", type=POSITIVE, default=32, help="calibration windows (default 32)")
    p.add_argument("--calib-seqlen", type=SEQLEN, default=512, help="tokens per calibration window (default 512)")


def _add_kv(p):
    p.add_argument("--kv", default=None, choices=list(KV_MODES),
                   help="KV cache, overriding the checkpoint's (default: as the checkpoint says, else none); "
                        "int8-static/int8-smooth calibrate on --calib when the model has no scales")
    _add_calib(p)


def apply_kv(model, tok, a) -> None:
    """``--kv``: run the model on that KV cache (static scales calibrated when the model has none)."""
    if a.kv is None:
        return
    have = (getattr(model, "dgq_kv", None) or {"mode": "none"})["mode"]
    calib = None
    if a.kv in ("int8-static", "int8-smooth") and have != a.kv:
        calib = calibration_windows(a.calib, tok, a.nsamples, a.calib_seqlen, 0)
        print(f"{a.kv} KV cache: calibrating on {calib.shape[0]} x {calib.shape[1]} tokens of {a.calib}")
    use_kv_cache(model, a.kv, calib)


def _add_runtime(p):
    p.add_argument("--no-verify", action="store_true", help="skip the checkpoint checksums (faster load)")
    p.add_argument("--no-weight-cache", action="store_true",
                   help="expand quantized weights on every call instead of keeping them expanded (CPU: 1-4 bytes "
                        "per weight kept otherwise); slower, 4-bit memory")


def _add_placement(p, shards: bool = False):
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"],
                   help="dtype of the model's floating-point weights (default auto: the checkpoint's own; a GGUF "
                        "dequantizes to float32)")
    if shards:
        p.add_argument("--max-shard-size", default="500MB",
                       help="largest weights file of the output (e.g. 2GB, 500MB); more become shards with an "
                            "index. The shard being written is held in memory (default 500MB)")


def _quiet_transformers() -> None:
    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="dgq", description="DGQ A8W4 quantization: quantize, evaluate, export, generate.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model into a dgq checkpoint",
                       description="Quantize MODEL into the DGQ A8W4 format and save it to --out.")
    _add_model(q)
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    q.add_argument("--method", default="dgq-gptq", choices=methods.names(),
                   help="; ".join(f"{m}: {methods.get(m).summary}" for m in methods.names()))
    q.add_argument("--w-bits", type=int, default=None, choices=[4, 8],
                   help="weight bits (default: the method's; 8 with rtn: W8A8 per-channel int8)")
    q.add_argument("--alpha", type=_unit_float, default=0.5, help="smoothquant: migration strength (default 0.5)")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq, dgq-gptq: quantize columns by decreasing Hessian diagonal (static groups); default: "
                        "on for dgq-gptq, off for gptq")
    q.add_argument("--group-size", type=_group_size, default=None,
                   help="group size along K; -1 = per-channel (default: 128 where it divides every quantized layer, "
                        "else 64, else the largest size below 128 that does)")
    q.add_argument("--act", default="dynamic", choices=["dynamic", "static"],
                   help="activation quantization: per-token dynamic (default) or static per-tensor")
    q.add_argument("--weights-only", action="store_true", help="A16W4: keep float activations")
    q.add_argument("--s-int-rounding", default="round", choices=["round", "ceil"],
                   help="rounding of s_group/s_ch to the integer group scale (rtn; default round)")
    q.add_argument("--kv", default="none", choices=list(KV_MODES),
                   help="KV cache: none (float, default), int8 (dynamic: per token and KV head), int8-static "
                        "(one scale per layer for K and V, from --calib) or int8-smooth (int8 on keys divided by "
                        "their per-channel absmax from --calib); recorded in the checkpoint")
    q.add_argument("--rotate", default=None, choices=["off", "on", "measured"],
                   help="calibrated methods: rotate every attention head's values by a Hadamard matrix folded into "
                        "v_proj/o_proj (exact) so o_proj's int8 activations lose less: off, on, or measured per "
                        "block (kept where the block's calibration error falls); default: the method's")
    q.add_argument("--rotate-residual", action=argparse.BooleanOptionalAction, default=None,
                   help="calibrated methods: rotate the residual stream by an orthogonal matrix folded into the "
                        "weights (exact; norms folded, tied embeddings untied) so the int8 inputs of q/k/v and "
                        "gate/up lose their outlier channels; default: on for dgq-gptq, off for the others")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--force", action="store_true", help="replace --out if it exists")
    _add_calib(q)
    q.add_argument("--seqlen", dest="calib_seqlen", type=SEQLEN, help=argparse.SUPPRESS)  # old --calib-seqlen
    q.add_argument("--act-budget", type=float, default=None, metavar="GB",
                   help="keep the calibration activations (3 x nsamples x calib-seqlen x hidden x 4 bytes) in memory "
                        "up to GB; beyond it they are memory-mapped from temporary files in --act-dir (same result)")
    q.add_argument("--act-dir", default=None, help="folder for activations beyond --act-budget (default: the "
                                                   "system's temporary folder)")
    q.add_argument("--no-smooth", action="store_true", help="dgq: skip percentile-clipping smoothing")
    q.add_argument("--smooth", action="store_true", help="dgq: force smoothing on (the default for --act static)")
    q.add_argument("--no-search", action="store_true", help="dgq: data-free scales instead of the grid search")
    q.add_argument("--phase1-only", action="store_true", help="dgq: fine-grained search only (s_ch = absmax/127)")
    q.add_argument("--search-tokens", type=POSITIVE, default=4096,
                   help="dgq: calibration tokens sub-sampled for the search objectives (default 4096)")
    _add_placement(q, shards=True)

    e = sub.add_parser("eval", help="perplexity and/or zero-shot task accuracy of a model or checkpoint",
                       description="Perplexity on non-overlapping windows of a text; with --tasks, zero-shot "
                                   "multiple-choice accuracy (lm-eval 0.4.13 conventions) instead, or in addition "
                                   "when --text is given too.")
    _add_model(e)
    e.add_argument("--text", default=None,
                   help="a text file, lambada or squad-wiki (default squad-wiki; with --tasks only if given)")
    e.add_argument("--seqlen", type=SEQLEN, default=1024, help="tokens per scored window (default 1024)")
    e.add_argument("--max-tokens", type=_int_at_least(0), default=32768, help="score the first N tokens (0 = all)")
    e.add_argument("--tasks", help="comma-separated zero-shot tasks: arc_easy, arc_challenge, piqa, hellaswag, "
                                   "winogrande, boolq, or all")
    e.add_argument("--limit", type=POSITIVE, help="zero-shot: the first N documents of each task (default: all)")
    e.add_argument("--batch-size", type=POSITIVE, default=16, help="zero-shot: requests per forward (default 16)")
    e.add_argument("--json", help="write the result as JSON here")
    _add_kv(e)
    e.add_argument("--decode", action="store_true",
                   help="perplexity: score the second half of each window by teacher-forced decoding through the "
                        "KV cache, one token per forward (slow; a single forward exercises the int8 cache too)")
    _add_runtime(e)
    _add_placement(e)

    c = sub.add_parser("compare", help="FP and several methods in one harness: results.json/.md and a plot",
                       description="Quantize MODEL with each method (same calibration windows, evaluation windows "
                                   "and seed), save and reload each checkpoint, and evaluate its perplexity. Writes "
                                   "results.json, results.md and ppl_vs_bits.png into --out.")
    _add_model(c)
    c.add_argument("--methods", default=",".join(methods.names()),
                   help="comma-separated specs name[:field=value...] (rtn = its W4A16, W4A8 and W8A8 variants; "
                        "e.g. smoothquant:alpha=0.8, gptq:act_order=true); default: all")
    c.add_argument("--out", required=True, help="output folder")
    c.add_argument("--text", default="lambada", help="evaluation text: a file, lambada or squad-wiki")
    c.add_argument("--group-size", type=_group_size, default=None, help="as for quantize (default: chosen per model)")
    c.add_argument("--act", default="dynamic", choices=["dynamic", "static"],
                   help="activation mode of the int8-activation methods")
    _add_calib(c)
    c.add_argument("--seqlen", type=SEQLEN, default=1024, help="evaluation window (default 1024)")
    c.add_argument("--max-tokens", type=_int_at_least(0), default=32768, help="evaluate the first N tokens (0 = all)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--keep-checkpoints", action="store_true", help="keep every checkpoint under OUT/checkpoints")
    c.add_argument("--force", action="store_true", help="write into an earlier dgq compare output folder")
    c.add_argument("--resume", action="store_true",
                   help="keep the rows of an earlier report in --out (same model, calibration and evaluation "
                        "settings) and run only the methods it lacks")
    _add_placement(c)

    x = sub.add_parser("export", help="write a dgq checkpoint in another library's format (compressed-tensors, "
                                      "GGUF)",
                       description="Convert the dgq checkpoint CKPT into a compressed-tensors checkpoint (vLLM, "
                                   "transformers): ct-w8a8 (int-quantized: int8 weights s_int*(q-z), per-channel "
                                   "scale s_ch, int8 activations; lossless) or ct-w4a16 (pack-quantized: int4 "
                                   "asymmetric groups, scale s_ch*s_int in the model's dtype, float activations); "
                                   "or into a GGUF file (llama.cpp, Ollama): gguf-q8_0 (int8 s_int*(q-z), fp16 "
                                   "d=s_ch per 32-block) or gguf-q4_1 (codes as they are, fp16 d=s_ch*s_int, "
                                   "m=-d*z), with metadata, tokenizer and float tensors from the source GGUF. "
                                   "A module the target cannot hold is refused before anything is written.")
    x.add_argument("ckpt", help="dgq checkpoint folder")
    x.add_argument("--to", required=True, choices=list(EXPORT_TARGETS), help="target format")
    x.add_argument("--out", required=True, help="output folder (written atomically); gguf targets: a .gguf file or "
                                               "a folder that gets model.gguf")
    x.add_argument("--source-gguf", default=None,
                   help="gguf targets: the GGUF the model came from (a path or an alias; default: the checkpoint's "
                        "alias; a checkpoint of a Hugging Face model needs it)")
    x.add_argument("--force", action="store_true", help="replace --out if it is an earlier dgq output")
    x.add_argument("--no-verify", action="store_true", help="skip the source checkpoint's checksums")
    x.add_argument("--max-shard-size", default="2GB",
                   help="largest weights file of the output; the shard being written is held in memory (default 2GB)")

    g = sub.add_parser("generate", help="generate text (streamed) from a prompt",
                       description="Greedy generation, streamed token by token.")
    _add_model(g)
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=POSITIVE, default=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    _add_kv(g)
    _add_runtime(g)
    _add_placement(g)
    return ap


def cmd_quantize(a) -> None:
    _quiet_transformers()
    out = check_output_dir(a.out, a.force)  # before minutes of calibration
    if a.smooth and a.no_smooth:
        raise DGQError("--smooth and --no-smooth contradict each other")
    smooth = True if a.smooth else (False if a.no_smooth else None)
    cfg = methods.resolve(DGQConfig(method=a.method, group_size=a.group_size, act=a.act, weights_only=a.weights_only,
                                    s_int_rounding=a.s_int_rounding, seed=a.seed, smooth=smooth,
                                    search=not a.no_search, phase2=not a.phase1_only, search_tokens=a.search_tokens,
                                    w_bits=a.w_bits, alpha=a.alpha, act_order=a.act_order, kv=a.kv,
                                    rotate=a.rotate, rotate_residual=a.rotate_residual))
    parse_size(a.max_shard_size)
    t0 = time.perf_counter()
    wants_calib = methods.get(cfg.method).needs_calibration(cfg)
    # block by block from disk, one decoder block in memory at a time; a GGUF (or an alias) is converted once, one
    # tensor at a time, into a cached float32 folder
    folder = model_folder(a.model)
    check_model_folder(folder)  # architecture, custom code, weights: refused before the tokenizer is read
    tok = load_tokenizer(folder)
    calib = calibration_windows(a.calib, tok, a.nsamples, a.calib_seqlen, a.seed) if wants_calib else None
    qcfg = quantize_to(str(folder), out, cfg, calib=calib, device=a.device, dtype=a.dtype,
                       max_shard_size=a.max_shard_size, overwrite=a.force, act_budget=a.act_budget,
                       act_dir=a.act_dir)
    if qcfg.get("group_size_auto") and qcfg["format"] != "w8a8":
        print(f"group size {qcfg['group_size']} (chosen: 128 if it divides every quantized layer, else 64, else "
              f"the largest size below 128 that does; --group-size sets it)")
    log = qcfg.get("calibration")
    if log:
        worst = max(log["blocks"], key=lambda b: b["block_output_rel_error"])
        print(f"calibrated {len(log['blocks'])} blocks on {log['windows']} x {log['seqlen']} tokens in "
              f"{log['seconds']} s; worst block output error {worst['block_output_rel_error']:.4f} "
              f"(block {worst['block']})")
    print(f"saved {out} ({time.perf_counter() - t0:.1f} s)")


def cmd_eval(a) -> None:
    _quiet_transformers()
    tasks = None
    if a.tasks is not None:  # check the task list before loading the model
        tasks = check_tasks(a.tasks)
    out = check_output_file(a.json) if a.json is not None else None  # before the whole evaluation
    model, tok = load_model(a.model, dtype=a.dtype, device=a.device, verify=not a.no_verify,
                            cache_weights=not a.no_weight_cache)
    apply_kv(model, tok, a)
    r = {}
    if tasks is None or a.text is not None:
        text = a.text or "squad-wiki"
        r = perplexity(model, tok, text, seqlen=a.seqlen, max_tokens=a.max_tokens or None, decode=a.decode)
        kv = "" if r["kv"] == "none" else f", KV {r['kv']}"
        how = ", second halves decoded" if a.decode else ""
        print(f"{a.model}: ppl {r['ppl']:.4f} on {r['windows']} x {a.seqlen} tokens of {text}{kv}{how} "
              f"({r['elapsed_s']} s)")
    r["model"] = a.model
    q = getattr(model, "dgq_config", None)
    r["quantization"] = None if q is None else {k: q[k] for k in ("w_bits", "a_bits", "group_size", "act")}
    r["kv"] = (getattr(model, "dgq_kv", None) or {"mode": "none"})["mode"]
    if tasks:
        r["zeroshot"] = evaluate_tasks(model, tok, tasks, limit=a.limit, batch_size=a.batch_size)
        print(f"{a.model}: zero-shot ({r['zeroshot']['elapsed_s']} s)\n{format_table(r['zeroshot'])}")
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(r, indent=2) + "\n")


def cmd_compare(a) -> None:
    _quiet_transformers()
    compare(a.model, methods=a.methods, calib=a.calib, text=a.text, out=a.out, group_size=a.group_size, act=a.act,
            nsamples=a.nsamples, calib_seqlen=a.calib_seqlen, seqlen=a.seqlen,
            max_tokens=a.max_tokens or None, seed=a.seed, keep_checkpoints=a.keep_checkpoints, force=a.force,
            dtype=a.dtype, device=a.device, resume=a.resume)
    print(f"wrote {Path(a.out) / 'results.json'}, results.md, ppl_vs_bits.png")


def cmd_export(a) -> None:
    _quiet_transformers()
    t0 = time.perf_counter()
    out = export(a.ckpt, to=a.to, out=a.out, force=a.force, verify=not a.no_verify, max_shard_size=a.max_shard_size,
                 source_gguf=a.source_gguf)
    print(f"exported {a.ckpt} as {a.to} to {out} ({time.perf_counter() - t0:.1f} s)")


def cmd_generate(a) -> None:
    _quiet_transformers()
    if not a.prompt.strip():
        raise DGQError("the prompt is empty")
    model, tok = load_model(a.model, dtype=a.dtype, device=a.device, verify=not a.no_verify,
                            cache_weights=not a.no_weight_cache)
    apply_kv(model, tok, a)
    if a.chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": a.prompt}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = a.prompt
    enc = tok(text, return_tensors="pt").to(next(model.parameters()).device)
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=a.max_new_tokens, do_sample=False,
                       streamer=TextStreamer(tok, skip_prompt=False), pad_token_id=tok.eos_token_id)


def main(argv=None) -> int:
    try:
        a = build_parser().parse_args(argv)
    except SystemExit as e:  # --help (0) or an argument error (2, already printed on one line)
        return e.code if isinstance(e.code, int) else 2
    try:
        {"quantize": cmd_quantize, "eval": cmd_eval, "compare": cmd_compare, "export": cmd_export,
         "generate": cmd_generate}[a.cmd](a)
    except DGQError as e:
        print(f"dgq: error: {one_line(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dgq: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
