"""One dispatch for every quantized linear's forward: the first kernel that does not refuse the input runs it,
and each of the others can say why it refused.

A kernel is an object with ``name``, ``formats`` (the storage formats it runs), ``act_modes`` (the activation
modes it runs: ``dynamic``/``static`` int8 activations, or ``none`` for float activations),
``refuse(layer, x) -> str | None`` (further, input-dependent reasons; None: it can run) and
``forward(layer, x2d) -> y2d``. Preference order: Triton (CUDA) -> CPU ``torch._int_mm`` -> reference -> (float
activations) weight-only. ``DGQ_KERNEL=<name>`` forces one kernel; a forced kernel that refuses the layer is an
error naming the reason, never a silent change of semantics (e.g. int8 activations for a weight-only layer).
"""

from __future__ import annotations

import os

import torch

from ..errors import DGQError
from .cpu import CpuIntMMKernel
from .reference import ReferenceKernel
from .triton import TritonKernel


class WeightOnlyKernel:
    """A16W4: float activations; the dequantized weight is cached per device/dtype."""

    name = "weight-only"
    formats = ("dgq", "w4a16")
    act_modes = ("none",)

    def refuse(self, layer, x: torch.Tensor) -> str | None:
        return None

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        key = ("w_hat", x.dtype, x.device)
        w = layer.kernel_cache.get(key)
        if w is None:
            w = layer.dequantized_weight(x.dtype)
            if layer.cache_weights:
                layer.kernel_cache[key] = w
        b = None if layer.bias is None else layer.bias.to(x.dtype)
        return torch.nn.functional.linear(x, w, b)


KERNELS: list = [TritonKernel(), CpuIntMMKernel(), ReferenceKernel(), WeightOnlyKernel()]


def register(kernel, first: bool = False) -> None:
    """Add a kernel to the dispatch (``first=True`` puts it ahead of the others)."""
    if any(k.name == kernel.name for k in KERNELS):
        return
    KERNELS.insert(0 if first else len(KERNELS), kernel)


def by_name(name: str):
    for k in KERNELS:
        if k.name == name:
            return k
    raise DGQError(f"unknown kernel {name!r}; known: {', '.join(k.name for k in KERNELS)}")


def refusal(k, layer, x: torch.Tensor) -> str | None:
    """Why kernel ``k`` cannot run ``layer`` on ``x`` (None: it can)."""
    if layer.format not in k.formats:
        return f"does not run {layer.format} layers (runs: {', '.join(k.formats)})"
    if layer.act_mode not in k.act_modes:
        modes = {"none": "float activations (weight-only)", "dynamic": "dynamic int8 activations",
                 "static": "static int8 activations"}
        return f"layer has {modes[layer.act_mode]}; this kernel runs {', '.join(k.act_modes)}"
    return k.refuse(layer, x)


def select(layer, x: torch.Tensor):
    """The kernel that will run ``layer`` on ``x`` (2-D), honouring ``DGQ_KERNEL``."""
    forced = os.environ.get("DGQ_KERNEL")
    if forced:
        k = by_name(forced)
        why = refusal(k, layer, x)
        if why is not None:
            raise DGQError(f"DGQ_KERNEL={forced} cannot run {layer.describe()}: {why}")
        return k
    for k in KERNELS:
        if refusal(k, layer, x) is None:
            return k
    raise DGQError(f"no kernel can run {layer.describe()}: " + explain(layer, x))  # pragma: no cover


def explain(layer, x: torch.Tensor) -> str:
    """One line per kernel: whether it accepts ``x`` for ``layer`` and, if not, why."""
    lines = []
    for k in KERNELS:
        why = refusal(k, layer, x)
        lines.append(f"{k.name}: {'ok' if why is None else 'refuses - ' + why}")
    return "; ".join(lines)


def slow_paths(layers) -> list[str]:
    """Why some of these quantized layers would have no fast kernel on a GPU (distinct reasons, with counts):
    said at quantize time, since a model is usually quantized on one machine and served on another. (On the CPU
    every layer has one: ``cpu-int-mm`` and ``weight-only`` take any shape.)"""
    reasons: dict[str, int] = {}
    for layer in layers:
        fast = [k for k in KERNELS if getattr(k, "limits", None) and layer.format in k.formats
                and layer.act_mode in k.act_modes]
        if not fast:
            continue
        why = [k.limits(layer.in_features, layer.group_size) for k in fast]
        if all(w is not None for w in why):
            reasons[why[0]] = reasons.get(why[0], 0) + 1
    return [f"{n} quantized layer(s) have no fast GPU kernel ({why}); on CUDA they run on the slow reference "
            f"kernel" for why, n in reasons.items()]
