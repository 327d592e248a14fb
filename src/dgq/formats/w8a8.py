"""Per-output-channel symmetric int8 weights (SmoothQuant / RTN W8A8): ``W_hat = scale[n] * w8`` with ``w8`` int8
in -127..127 and float32 ``scale [N]``; int8 activations (per-token dynamic or static per-tensor). Runs on the same
int8 GEMM kernels and epilogue as DGQ: its int8 weight is stored instead of expanded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DGQError
from .base import QuantLinear
from .packing import INT8_MAX, check_positive_finite, check_tensor

NAME = "w8a8"


@dataclass
class W8Weight:
    """Per-output-channel symmetric int8: ``W_hat = scale[n] * w8``, w8 in -127..127."""

    weight: torch.Tensor  # int8 [N, K]
    scale: torch.Tensor  # float32 [N]

    @property
    def shape(self) -> tuple[int, int]:
        return tuple(self.weight.shape)

    @property
    def group_size(self) -> int:  # one group per row
        return self.weight.shape[1]

    @property
    def device(self) -> torch.device:
        return self.weight.device

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"weight": self.weight, "channel_scale": self.scale}

    def int8(self) -> torch.Tensor:
        return self.weight

    def dequantize(self, dtype=torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.scale[:, None]).to(dtype)

    def check(self, where: str = "W8A8 weight") -> None:
        """dtypes and shapes; no -128 (symmetric range); scales finite and > 0."""
        n, _ = self.shape
        check_tensor(self.scale, "channel_scale", (n,), torch.float32, where)
        if self.weight.dtype != torch.int8:
            raise DGQError(f"{where}: weight is {self.weight.dtype}, expected torch.int8")
        if int(self.weight.min()) < -INT8_MAX:
            raise DGQError(f"{where}: int8 weight holds -128, outside the symmetric range; corrupt weights")
        check_positive_finite(self.scale, "channel_scale", where)


class W8A8Linear(QuantLinear):
    """The W8A8 format's module: buffers ``weight`` int8 [N, K], ``channel_scale`` float32 [N], ``act_scale``."""

    format = NAME
    w_bits = 8
    grouped = False
    act_modes = ("dynamic", "static")

    @staticmethod
    def resolve_group_size(in_features: int, group_size: int, name: str = "layer") -> int:
        return in_features  # per channel: no groups

    def register_buffers(self, device) -> None:
        n, k = self.out_features, self.in_features
        self.register_buffer("weight", torch.zeros(n, k, dtype=torch.int8, device=device))
        self.register_buffer("channel_scale", torch.ones(n, dtype=torch.float32, device=device))

    def container(self) -> W8Weight:
        return W8Weight(self.weight, self.channel_scale)

    def int8_weight(self) -> torch.Tensor:
        return self.weight
