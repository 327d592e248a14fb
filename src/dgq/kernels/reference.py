"""The reference A8W4 kernel: plain torch, any device. It defines the semantics every fast kernel must match.

int8 activations x int8 expanded weights -> exact int32 accumulators -> ``s_x[m] * s_ch[n]`` epilogue (+bias).
The product is done in float64, exact for |sum| < 2**53 (int8 x int8 over K < 2**38 terms).
"""

from __future__ import annotations

import torch

from ..formats.act import epilogue


def int32_accumulate(x8: torch.Tensor, w8: torch.Tensor) -> torch.Tensor:
    """Exact ``x8 @ w8.T`` as int32 (``x8 [M, K]``, ``w8 [N, K]`` int8)."""
    return (x8.double() @ w8.double().T).to(torch.int32)


class ReferenceKernel:
    name = "reference"
    formats = ("dgq", "w8a8")
    act_modes = ("dynamic", "static")

    def refuse(self, layer, x: torch.Tensor) -> str | None:
        return None  # runs everywhere, slowly

    def gemm(self, layer, x8: torch.Tensor, s_x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        w8 = layer.int8_weight()
        acc = int32_accumulate(x8, w8)
        return epilogue(acc, s_x, layer.channel_scale, layer.bias, dtype)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        x8, s_x = layer.quantize_input(x)
        return self.gemm(layer, x8, s_x, x.dtype)
