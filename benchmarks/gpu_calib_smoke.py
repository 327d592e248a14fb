"""Calibration on a GPU against the same calibration on the CPU, on tiny random models (a Llama with GQA and a Qwen2
with q/k/v biases), for every registered method: the in-memory path (``dgq.quantize`` on a model placed on the
device) and the streamed path (``dgq.stream.quantize_to --device``). Both checkpoints are then run on the CPU on the
same tokens; the report gives the fraction of 4-bit codes that agree and the relative error between the two
quantized models' logits, next to the error of each against the float model (what the quantization itself costs).
GPU and CPU float32 arithmetic round differently, so a few codes at a rounding boundary may flip; a GPU path that
computed something else would show errors of the size of the quantization error.

    python benchmarks/gpu_calib_smoke.py [--json OUT.json]
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine_info  # noqa: E402

COMMON = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=3, num_attention_heads=8,
              num_key_value_heads=2, vocab_size=512, max_position_embeddings=256)


def _codes(model) -> dict[str, torch.Tensor]:
    """The integer weights: 4-bit packed codes (``qweight``) or W8A8's int8 ``weight``."""
    return {n: b.detach().cpu() for n, b in model.named_buffers()
            if n.endswith("qweight") or (n.endswith(".weight") and b.dtype == torch.int8)}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


def one(kind: str, method: str, folder: Path, work: Path, calib: torch.Tensor, dev: str) -> dict:
    import dgq
    from dgq import checkpoint, stream

    cfg = dgq.DGQConfig(method=method, group_size=64)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.randint(0, COMMON["vocab_size"], (2, 64), generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = base(ids).logits
    out = {"model": kind, "method": method}
    logits = {}
    for where in ("cpu", dev):
        m = copy.deepcopy(base).to(where)
        t0 = time.perf_counter()
        dgq.quantize(m, cfg, calib=calib, progress=False)
        out[f"memory_{where.split(':')[0]}_s"] = round(time.perf_counter() - t0, 2)
        path = checkpoint.save(m, work / f"{kind}-{method}-mem-{where}", overwrite=True)
        back = checkpoint.load(path)
        with torch.no_grad():
            logits[f"mem-{where}"] = back(ids).logits
        logits[f"codes-mem-{where}"] = _codes(back)
        if where == "cpu":  # the same checkpoint run on the device (its kernels) against the CPU run
            on_dev = checkpoint.load(path, device=dev)
            with torch.no_grad():
                out["load_gpu_vs_cpu_rel"] = round(_rel(on_dev(ids.to(dev)).logits.float().cpu(), logits["mem-cpu"]), 6)
            del on_dev
        t0 = time.perf_counter()
        stream.quantize_to(str(folder), work / f"{kind}-{method}-str-{where}", cfg, calib=calib, device=where,
                           dtype="float32", overwrite=True, progress=False)
        out[f"stream_{where.split(':')[0]}_s"] = round(time.perf_counter() - t0, 2)
        back = checkpoint.load(work / f"{kind}-{method}-str-{where}")
        with torch.no_grad():
            logits[f"str-{where}"] = back(ids).logits
        logits[f"codes-str-{where}"] = _codes(back)
    for path in ("mem", "str"):
        c, g = logits[f"codes-{path}-cpu"], logits[f"codes-{path}-{dev}"]
        same = sum(int((c[n] == g[n]).sum()) for n in c)
        total = sum(c[n].numel() for n in c)
        out[f"{path}_codes_equal"] = round(same / total, 5) if total else None
        out[f"{path}_gpu_vs_cpu_rel"] = round(_rel(logits[f"{path}-{dev}"], logits[f"{path}-cpu"]), 6)
        out[f"{path}_cpu_vs_fp_rel"] = round(_rel(logits[f"{path}-cpu"], ref), 6)
    # the streamed and in-memory paths on the GPU compute the same thing
    out["gpu_stream_vs_memory_rel"] = round(_rel(logits[f"str-{dev}"], logits[f"mem-{dev}"]), 6)
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--methods", default=None, help="comma list (default: every registered method)")
    a = ap.parse_args()
    from dgq import methods as registry

    names = a.methods.split(",") if a.methods else registry.names()
    rows, t_all = [], time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        calib = torch.randint(0, COMMON["vocab_size"], (8, 128), generator=torch.Generator().manual_seed(0))
        for kind, cls, extra in (("llama", LlamaConfig, {}), ("qwen2", Qwen2Config, {"tie_word_embeddings": True})):
            torch.manual_seed(0)
            model = AutoModelForCausalLM.from_config(cls(**COMMON, **extra))
            folder = tmp / kind
            model.save_pretrained(folder)
            for method in names:
                try:
                    r = one(kind, method, folder, tmp, calib, a.device)
                except Exception as e:  # noqa: BLE001 - report every failure, go on with the next method
                    traceback.print_exc()
                    r = {"model": kind, "method": method, "error": f"{type(e).__name__}: {e}"[:400]}
                rows.append(r)
                print(json.dumps(r), flush=True)
    result = {"machine": machine_info(), "seconds": round(time.perf_counter() - t_all, 1), "rows": rows}
    if a.json:
        a.json.write_text(json.dumps(result, indent=1) + "\n")
    bad = [r for r in rows if "error" in r]
    print(f"{len(rows) - len(bad)} of {len(rows)} rows ran; errors: {[(r['model'], r['method']) for r in bad]}")


if __name__ == "__main__":
    main()
