"""The standard weight-only 4-bit format of GPTQ/AWQ/RTN W4A16: per (row, group) ``W_hat = scale * (q - zero)``
with float16 ``scales [N, G]`` and uint8 ``zeros [N, G]`` (0..15); codes packed as in DGQ (low nibble first).
Activations stay in floating point."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DGQError
from .base import QuantLinear
from .packing import CODE_MAX, Packed4, check_positive_finite, check_tensor, unpack_uint4

NAME = "w4a16"


def dequantize(qweight, scales, zeros, group_size: int, dtype=torch.float32) -> torch.Tensor:
    q = unpack_uint4(qweight).float()
    n, k = q.shape
    w = (q.view(n, k // group_size, group_size) - zeros.float()[..., None]) * scales.float()[..., None]
    return w.view(n, k).to(dtype)


@dataclass
class W4Weight(Packed4):
    """Standard W4 (asymmetric, group-wise): ``W_hat = scale * (q - zero)``, scale float16 ``[N, G]``."""

    qweight: torch.Tensor  # uint8 [N, K/2], low nibble first (the same packing as DGQ)
    scales: torch.Tensor  # float16 [N, G]
    zeros: torch.Tensor  # uint8 [N, G], 0..15
    group_size: int

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "scales": self.scales, "zeros": self.zeros}

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.scales, self.zeros, self.group_size, dtype)

    def check(self, where: str = "W4A16 weight") -> None:
        """Shapes and dtypes; zero points in 0..15; scales finite and > 0."""
        n, k, g = self.check_layout(where)
        check_tensor(self.scales, "scales", (n, k // g), torch.float16, where)
        check_tensor(self.zeros, "zeros", (n, k // g), torch.uint8, where)
        if int(self.zeros.max()) > CODE_MAX:
            raise DGQError(f"{where}: zero points outside 0..15; corrupt weights")
        check_positive_finite(self.scales, "scales", where)


class W4A16Linear(QuantLinear):
    """The W4A16 format's module: float activations, dequantized weight (see the module docstring)."""

    format = NAME
    w_bits = 4
    act_modes = ("none",)

    def register_buffers(self, device) -> None:
        n, k, g = self.out_features, self.in_features, self.group_size
        self.register_buffer("qweight", torch.zeros(n, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(n, k // g, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(n, k // g, dtype=torch.uint8, device=device))

    def container(self) -> W4Weight:
        return W4Weight(self.qweight, self.scales, self.zeros, self.group_size)
