"""Shared pieces of the benchmark scripts: provenance for their JSON (the package's own, so `dgq compare` records
the same fields), the process's memory as Linux reports it, and the real-layer benchmarks' arguments and block walk."""

import torch

from dgq.arch import arch_for_config, get_blocks
from dgq.calib import capture_block_inputs, run_block
from dgq.data import calibration_windows
from dgq.provenance import machine_info  # noqa: F401


def proc_status_mb(field: str) -> float:
    """A ``/proc/self/status`` memory field in MB: ``VmRSS`` (now) or ``VmHWM`` (peak); NaN where there is none."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    return float("nan")


def add_layer_args(ap) -> None:
    """The arguments of the real-layer benchmarks (``layer_errors.py``, ``heldout_errors.py``)."""
    ap.add_argument("--model", required=True)
    ap.add_argument("--blocks", required=True, help="comma-separated block indices")
    ap.add_argument("--group-size", type=int, required=True)
    ap.add_argument("--calib", default="../shared/data/wikitext-2/valid.txt")
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--out", required=True)


def float_blocks(model, tok, blocks: list[int], calib_path: str, windows: int, seqlen: int):
    """Yield ``(i, block, hidden, kwargs)`` for each chosen block of ``model`` with its float inputs on ``windows``
    calibration windows of ``seqlen`` tokens: every block before it runs in float (no quantization error carried).
    Grad mode stays off while the caller's loop body runs."""
    arch = arch_for_config(model.config)
    hidden, kwargs = capture_block_inputs(model, arch, calibration_windows(calib_path, tok, windows, seqlen))
    layers = get_blocks(model, arch)
    with torch.no_grad():
        for i in range(max(blocks) + 1):
            if i in blocks:
                yield i, layers[i], hidden, kwargs[i]
            hidden = run_block(layers[i], hidden, kwargs[i], "cpu")
