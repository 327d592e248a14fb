"""The ``dgq`` command: a thin layer over the Python API."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .errors import DGQError


def _add_model(p):
    p.add_argument("model", help="HF folder, .gguf file, dgq checkpoint, or alias (smollm2-135m)")


def _add_calib(p):
    p.add_argument("--calib", default="squad-wiki",
                   help="calibration text: a file, lambada or squad-wiki (default: squad-wiki; used by static "
                        "activation scales)")
    p.add_argument("--nsamples", type=int, default=32, help="calibration windows (default 32)")
    p.add_argument("--calib-seqlen", type=int, default=1024, help="tokens per calibration window (default 1024)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="dgq", description="DGQ A8W4 quantization: quantize, evaluate, generate.")
    sub = ap.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model into a dgq checkpoint",
                       description="Quantize MODEL into the DGQ A8W4 format and save it to --out.")
    _add_model(q)
    q.add_argument("--out", required=True, help="output folder (written atomically)")
    q.add_argument("--method", default="rtn", choices=["rtn"], help="scale method (default rtn)")
    q.add_argument("--group-size", type=int, default=128, help="group size along K; -1 = per-channel (default 128)")
    q.add_argument("--act", default="dynamic", choices=["dynamic", "static"],
                   help="activation quantization: per-token dynamic (default) or static per-tensor")
    q.add_argument("--weights-only", action="store_true", help="A16W4: keep float activations")
    q.add_argument("--s-int-rounding", default="round", choices=["round", "ceil"],
                   help="rounding of s_group/s_ch to the integer group scale (rtn; default round)")
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--force", action="store_true", help="replace --out if it exists")
    _add_calib(q)

    e = sub.add_parser("eval", help="perplexity of a model or checkpoint on a text",
                       description="Perplexity on non-overlapping windows of a text.")
    _add_model(e)
    e.add_argument("--text", default="squad-wiki", help="a text file, lambada or squad-wiki (default squad-wiki)")
    e.add_argument("--seqlen", type=int, default=1024)
    e.add_argument("--max-tokens", type=int, default=32768, help="score the first N tokens (0 = all)")
    e.add_argument("--json", help="write the result as JSON here")

    g = sub.add_parser("generate", help="generate text (streamed) from a prompt",
                       description="Greedy generation, streamed token by token.")
    _add_model(g)
    g.add_argument("prompt")
    g.add_argument("--max-new-tokens", type=int, default=64)
    g.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template")
    return ap


def cmd_quantize(a) -> None:
    from . import DGQConfig, load_model, quantize, save
    from .data import calibration_windows

    out = Path(a.out)
    if out.exists() and not a.force:
        raise DGQError(f"output {out} already exists; choose another folder or pass --force")
    cfg = DGQConfig(method=a.method, group_size=a.group_size, act=a.act, weights_only=a.weights_only,
                    s_int_rounding=a.s_int_rounding, seed=a.seed)
    cfg.validate()
    t0 = time.perf_counter()
    model, tok = load_model(a.model)
    from .api import validate_model

    validate_model(model, cfg)
    calib = None
    if cfg.act_mode == "static":
        calib = calibration_windows(a.calib, tok, a.nsamples, a.calib_seqlen, a.seed)
    quantize(model, cfg, calib=calib)
    save(model, out, tokenizer=tok, overwrite=a.force)
    print(f"saved {out} ({time.perf_counter() - t0:.1f} s)")


def cmd_eval(a) -> None:
    from . import load_model, perplexity

    model, tok = load_model(a.model)
    r = perplexity(model, tok, a.text, seqlen=a.seqlen, max_tokens=a.max_tokens or None)
    r["model"] = a.model
    q = getattr(model, "dgq_config", None)
    r["quantization"] = None if q is None else {k: q[k] for k in ("w_bits", "a_bits", "group_size", "act")}
    print(f"{a.model}: ppl {r['ppl']:.4f} on {r['windows']} x {a.seqlen} tokens of {a.text} ({r['elapsed_s']} s)")
    if a.json:
        Path(a.json).write_text(json.dumps(r, indent=2) + "\n")


def cmd_generate(a) -> None:
    import torch
    from transformers import TextStreamer

    from . import load_model

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
        {"quantize": cmd_quantize, "eval": cmd_eval, "generate": cmd_generate}[a.cmd](a)
    except DGQError as e:
        print(f"dgq: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("dgq: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
