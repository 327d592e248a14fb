"""CPU fast path: ``torch._int_mm`` (oneDNN int8 GEMM) on the expanded int8 weight.

The int8 weight ``w8 = s_int * (q - z)`` is expanded once per layer on first use and kept (non-persistent) in the
layer's kernel cache: the CPU has no in-register expansion, so this trades 1 byte/weight of RAM for speed. The saved
checkpoint stays 4-bit. Bitwise equal to the reference (exact int32, same epilogue function).
"""

from __future__ import annotations

import torch

from ..formats.act import epilogue


class CpuIntMMKernel:
    name = "cpu-int-mm"
    formats = ("dgq", "w8a8")
    act_modes = ("dynamic", "static")

    def refuse(self, layer, x: torch.Tensor) -> str | None:
        if x.device.type != "cpu":
            return f"input is on {x.device.type}, this kernel runs on the CPU only"
        if not hasattr(torch, "_int_mm"):
            return "this torch has no torch._int_mm"
        return None

    def weight_t(self, layer) -> torch.Tensor:
        w8t = layer.kernel_cache.get("cpu_w8t")
        if w8t is None:
            w8t = layer.int8_weight().t()
            layer.kernel_cache["cpu_w8t"] = w8t
        return w8t

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        x8, s_x = layer.quantize_input(x)
        acc = torch._int_mm(x8, self.weight_t(layer))
        return epilogue(acc, s_x, layer.channel_scale, layer.bias, x.dtype)
