"""Provenance for results JSON (benchmarks and `dgq compare`): machine, versions, date, command."""

import datetime
import os
import platform
import sys

import torch
import transformers

INT8_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16")


def machine_info() -> dict:
    cpu = platform.processor()
    flags: list[str] = []
    try:
        with open("/proc/cpuinfo") as f:
            lines = f.readlines()
        cpu = next(ln.split(":", 1)[1].strip() for ln in lines if ln.startswith("model name"))
        have = next((ln.split(":", 1)[1].split() for ln in lines if ln.startswith("flags")), [])
        flags = [f for f in INT8_FLAGS if f in have]
    except (OSError, StopIteration):
        pass
    info = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": cpu,
        # what decides CPU speed and float rounding: two "AMD EPYC" machines with and without AVX-512 give
        # different timings and perplexities in the last digits
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "cpu_flags": flags,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "transformers": transformers.__version__,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = torch.version.cuda
    return info
