"""GGUF -> Hugging Face folder, streamed against whole: peak RSS and time of converting an alias's GGUF

- ``stream``: :func:`dgq.gguf_folder.convert` (what ``alias_folder`` and ``dgq quantize FILE.gguf`` run now): one
  tensor dequantized at a time, written in shards of 500 MB;
- ``whole``: transformers' loader, ``from_pretrained(gguf_file=..., dtype=float32)`` then ``save_pretrained`` and
  the tokenizer's (what ``alias_folder`` ran before: the whole float32 model in memory),

each in its own process (peak RSS = its VmHWM; ``baseline_rss_mb``: its RSS after importing dgq, torch and
transformers, before the conversion), one thread, ``DGQ_CACHE`` in a temporary folder (the alias's GGUF is assembled
there first, not timed: both runs read it from the page cache). Then the two folders are compared tensor by tensor
(bitwise) in a third process.

    flock /tmp/runs/cpu.lock python benchmarks/gguf_stream.py [--model qwen2.5-coder-0.5b] \
        [--out benchmarks/results/gguf_stream.json] [--tmp /tmp]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from _common import machine_info, proc_status_mb  # noqa: E402

THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}


def folder_stats(folder: Path) -> dict:
    files = sorted(folder.glob("*.safetensors"))
    return {"weight_files": len(files), "weight_bytes": sum(f.stat().st_size for f in files)}


def step(mode: str, gguf: Path, out: Path) -> dict:
    import torch

    import dgq  # noqa: F401 - the imports both paths pay, before the baseline is read

    torch.set_num_threads(1)
    baseline = proc_status_mb("VmRSS")
    t0 = time.perf_counter()
    if mode == "stream":
        from dgq.gguf_folder import convert

        convert(gguf, out, progress=False)
    else:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
        model.hf_quantizer, model.is_quantized = None, False  # as dgq did: the model is float32 after loading
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(out)
        AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(out)
    seconds = time.perf_counter() - t0
    return {"seconds": round(seconds, 1), "peak_rss_mb": round(proc_status_mb("VmHWM")),
            "baseline_rss_mb": round(baseline), **folder_stats(out)}


def compare(a: Path, b: Path) -> dict:
    """Tensor by tensor (one pair in memory at a time): the same names, dtypes and bits; the same config.json."""
    import torch
    from safetensors import safe_open

    def where(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            with safe_open(f, framework="pt") as st:
                out.update({n: f for n in st.keys()})
        return out

    wa, wb = where(a), where(b)
    differ = []
    for name in sorted(set(wa) & set(wb)):
        with safe_open(wa[name], framework="pt") as sa, safe_open(wb[name], framework="pt") as sb:
            x, y = sa.get_tensor(name), sb.get_tensor(name)
            if x.dtype != y.dtype or not torch.equal(x, y):
                differ.append(name)
    return {"tensors": len(wa), "same_names": set(wa) == set(wb), "differing_tensors": differ,
            "bitwise_equal": set(wa) == set(wb) and not differ,
            "same_config_json": json.loads((a / "config.json").read_text())
            == json.loads((b / "config.json").read_text())}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("what", nargs="?", default="run", choices=["run", "_step", "_compare"])
    ap.add_argument("--model", default="qwen2.5-coder-0.5b")
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/gguf_stream.json"))
    ap.add_argument("--tmp", default=None, help="where the temporary DGQ_CACHE goes (needs ~2 x float32 model)")
    ap.add_argument("--mode")
    ap.add_argument("--gguf", type=Path)
    ap.add_argument("--dir", type=Path, nargs="*")
    a = ap.parse_args()
    if a.what == "_step":
        print(json.dumps(step(a.mode, a.gguf, a.dir[0])))
        return
    if a.what == "_compare":
        print(json.dumps(compare(*a.dir)))
        return
    tmp = Path(tempfile.mkdtemp(prefix="dgq-gguf-bench-", dir=a.tmp))
    env = {**os.environ, **THREADS, "DGQ_CACHE": str(tmp / "cache")}
    try:
        os.environ["DGQ_CACHE"] = env["DGQ_CACHE"]
        from dgq.models import ALIASES, alias_gguf

        gguf = alias_gguf(a.model) if a.model in ALIASES else Path(a.model)
        res = {"model": a.model, "gguf_bytes": gguf.stat().st_size, "threads": 1, "machine": machine_info()}
        for mode in ("stream", "whole"):
            r = subprocess.run([sys.executable, __file__, "_step", "--mode", mode, "--gguf", str(gguf), "--dir",
                                str(tmp / mode)], capture_output=True, text=True, env=env)
            if r.returncode:
                sys.stderr.write(r.stderr[-3000:])
                raise SystemExit(f"{mode} failed")
            res[mode] = json.loads(r.stdout.strip().splitlines()[-1])
            print(mode, res[mode], flush=True)
        r = subprocess.run([sys.executable, __file__, "_compare", "--dir", str(tmp / "stream"), str(tmp / "whole")],
                           capture_output=True, text=True, env=env, check=True)
        res["compare"] = json.loads(r.stdout.strip().splitlines()[-1])
        res["peak_rss_ratio_whole_over_stream"] = round(res["whole"]["peak_rss_mb"] / res["stream"]["peak_rss_mb"], 2)
        print("compare", res["compare"], flush=True)
        a.out.parent.mkdir(parents=True, exist_ok=True)
        a.out.write_text(json.dumps(res, indent=2) + "\n")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
