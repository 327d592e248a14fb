"""One dispatch for every DGQLinear forward: it picks the first kernel that accepts the input and can say why
each of the others refused.

A kernel is an object with ``name``, ``refuse(layer, x) -> str | None`` (None: it can run) and
``forward(layer, x2d) -> y2d``. Preference order: Triton (CUDA) -> CPU ``torch._int_mm`` -> reference.
``DGQ_KERNEL=<name>`` forces one kernel (an error names its refusal). Weight-only (A16W4) layers use the
``weight-only`` kernel (dequantize once, float GEMM).

Kernels declare the layer formats they run (``formats``; default: the DGQ format only): the peer formats of
``dgq compare`` go through the same dispatch — W8A8 on the int8 GEMM kernels, standard W4A16 on ``weight-only``.
"""

from __future__ import annotations

import os

import torch

from ..errors import DGQError
from .cpu import CpuIntMMKernel
from .reference import ReferenceKernel


class WeightOnlyKernel:
    """A16W4: the same storage, float activations; the dequantized weight is cached per device/dtype."""

    name = "weight-only"
    formats = ("dgq", "w4a16")

    def refuse(self, layer, x: torch.Tensor) -> str | None:
        return None if layer.act_mode == "none" else "layer quantizes its activations (A8W4)"

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        key = ("w_hat", x.dtype, x.device)
        w = layer.kernel_cache.get(key)
        if w is None:
            w = layer.dequantized_weight(x.dtype)
            layer.kernel_cache[key] = w
        b = None if layer.bias is None else layer.bias.to(x.dtype)
        return torch.nn.functional.linear(x, w, b)


KERNELS: list = []


def register(kernel, first: bool = False) -> None:
    """Add a kernel to the dispatch (``first=True`` puts it ahead of the others)."""
    if any(k.name == kernel.name for k in KERNELS):
        return
    if first:
        KERNELS.insert(0, kernel)
    else:
        KERNELS.append(kernel)


register(WeightOnlyKernel())
register(CpuIntMMKernel())
register(ReferenceKernel())
try:  # the GPU kernel plugs in here when Triton is importable; on a machine without it dispatch is CPU-only
    from .triton_a8w4 import TritonKernel

    register(TritonKernel(), first=True)
except ImportError:  # pragma: no cover - depends on the environment
    pass


def by_name(name: str):
    for k in KERNELS:
        if k.name == name:
            return k
    raise DGQError(f"unknown kernel {name!r}; known: {', '.join(k.name for k in KERNELS)}")


def _refusal(k, layer, x: torch.Tensor) -> str | None:
    fmts = getattr(k, "formats", ("dgq",))
    if layer.format not in fmts:
        return f"does not run {layer.format} layers (runs: {', '.join(fmts)})"
    return k.refuse(layer, x)


def select(layer, x: torch.Tensor):
    """The kernel that will run ``layer`` on ``x`` (2-D), honouring ``DGQ_KERNEL``."""
    forced = os.environ.get("DGQ_KERNEL")
    if forced:
        k = by_name(forced)
        why = _refusal(k, layer, x)
        if why is not None and not (forced == "reference" and layer.act_mode != "none" and
                                    layer.format in k.formats):
            raise DGQError(f"DGQ_KERNEL={forced} cannot run {layer.describe()}: {why}")
        return k
    for k in KERNELS:
        if layer.act_mode == "none" and k.name != "weight-only":
            continue
        if _refusal(k, layer, x) is None:
            return k
    raise DGQError(f"no kernel can run {layer.describe()}: " + explain(layer, x))  # pragma: no cover


def explain(layer, x: torch.Tensor) -> str:
    """One line per kernel: whether it accepts ``x`` for ``layer`` and, if not, why."""
    lines = []
    for k in KERNELS:
        why = _refusal(k, layer, x)
        lines.append(f"{k.name}: {'ok' if why is None else 'refuses - ' + why}")
    return "; ".join(lines)
