"""The DGQ A8W4 format (docs/method.md §1, §2): container, int8-exact expansion, invariants, and its linear module.

Per linear layer with weight ``W[N, K]`` and group size ``g`` (``G = K // g`` groups per row):

=================  ==============  =======  ==================================================
tensor             shape           dtype    meaning
=================  ==============  =======  ==================================================
``qweight``        ``[N, K // 2]`` uint8    4-bit codes 0..15, two per byte, **low nibble first**:
                                            ``code[n, 2i] = byte & 0xF``, ``code[n, 2i+1] = byte >> 4``
``zeros``          ``[N, G]``      int8     per-group zero point, 0..15
``scales``         ``[N, G]``      int8     per-group **integer** scale ``s_int`` >= 1
``channel_scale``  ``[N]``         float32  per-output-channel float scale ``s_ch`` > 0
=================  ==============  =======  ==================================================

``W_hat[n, k] = s_ch[n] * s_int[n, k // g] * (q[n, k] - z[n, k // g])`` and the int8 intermediate
``w8 = s_int * (q - z)`` always fits int8 because codes are clamped to the int8-safe range
``[max(0, z - m), min(15, z + m)]`` with ``m = floor(127 / s_int)``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import DGQError
from .base import QuantLinear
from .packing import (
    CODE_MAX,
    INT8_MAX,
    Packed4,
    check_positive_finite,
    check_tensor,
    unpack_uint4,
)

NAME = "dgq"


def safe_code_bounds(zeros: torch.Tensor, scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group code range ``[lo, hi]`` with ``|s_int * (q - z)| <= 127`` (uses floor, never round)."""
    z = zeros.to(torch.int32)
    m = torch.div(INT8_MAX, scales.to(torch.int32).clamp_min(1), rounding_mode="floor")
    return (z - m).clamp_min(0), (z + m).clamp_max(CODE_MAX)


def quantize_codes(
    w: torch.Tensor, channel_scale: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int
) -> torch.Tensor:
    """Round ``W`` to codes on the grid ``s_ch * s_int`` with zero ``z``, clamped to the int8-safe range.

    Returns ``[N, K]`` uint8 codes. ``w`` is not modified.
    """
    n, k = w.shape
    g = group_size
    step = channel_scale.float()[:, None] * scales.float()  # [N, G]
    wg = w.float().reshape(n, k // g, g)
    q = torch.round(wg / step[..., None]) + zeros.float()[..., None]
    lo, hi = safe_code_bounds(zeros, scales)
    q = torch.maximum(torch.minimum(q, hi[..., None].float()), lo[..., None].float())
    return q.reshape(n, k).to(torch.uint8)


def expand_int8(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """The exact int8 weight ``w8 = s_int * (q - z)`` as ``[N, K]`` int8."""
    q = unpack_uint4(qweight).to(torch.int16)
    n, k = q.shape
    g = group_size
    w8 = (q.view(n, k // g, g) - zeros.to(torch.int16)[..., None]) * scales.to(torch.int16)[..., None]
    return w8.view(n, k).to(torch.int8)


def dequantize(qweight: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, channel_scale: torch.Tensor,
               group_size: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """``W_hat = s_ch[:, None] * w8`` in ``dtype`` (computed in float32)."""
    w8 = expand_int8(qweight, zeros, scales, group_size)
    return (w8.float() * channel_scale.float()[:, None]).to(dtype)


@dataclass
class DGQWeight(Packed4):
    """One linear's weight in the DGQ format (the tensors of the table above)."""

    qweight: torch.Tensor  # uint8 [N, K/2]
    zeros: torch.Tensor  # int8 [N, G]
    scales: torch.Tensor  # int8 [N, G]
    channel_scale: torch.Tensor  # float32 [N]
    group_size: int

    def tensors(self) -> dict[str, torch.Tensor]:
        return {"qweight": self.qweight, "zeros": self.zeros, "scales": self.scales,
                "channel_scale": self.channel_scale}

    def int8(self) -> torch.Tensor:
        """The exact int8 weight ``s_int * (q - z)`` ``[N, K]``."""
        return expand_int8(self.qweight, self.zeros, self.scales, self.group_size)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.qweight, self.zeros, self.scales, self.channel_scale, self.group_size, dtype)

    def check(self, where: str = "DGQ weight") -> None:
        """Shapes and dtypes; ``s_int`` >= 1, zeros in 0..15, codes in the int8-safe range, ``s_ch`` finite > 0."""
        n, k, g = self.check_layout(where)
        for name, shape, dtype in (("zeros", (n, k // g), torch.int8), ("scales", (n, k // g), torch.int8),
                                   ("channel_scale", (n,), torch.float32)):
            check_tensor(getattr(self, name), name, shape, dtype, where)
        if int(self.scales.min()) < 1 or int(self.zeros.min()) < 0 or int(self.zeros.max()) > CODE_MAX:
            raise DGQError(f"{where}: integer scales < 1 or zero points outside 0..15; corrupt weights")
        lo, hi = safe_code_bounds(self.zeros, self.scales)
        q = unpack_uint4(self.qweight).view(n, -1, g).to(torch.int32)
        if bool((q < lo[..., None]).any() | (q > hi[..., None]).any()):
            raise DGQError(f"{where}: codes outside the int8-safe range; corrupt weights")
        check_positive_finite(self.channel_scale, "channel_scale", where)


class DGQLinear(QuantLinear):
    """y = x W_hat^T + b with W in the DGQ format and (unless ``act_mode='none'``) int8 activations.

    Buffers (all saved): ``qweight`` uint8 [N, K/2], ``zeros`` int8 [N, G], ``scales`` int8 [N, G],
    ``channel_scale`` float32 [N], ``act_scale`` float32 [] (static mode; 0 otherwise), ``bias`` (optional).
    """

    format = NAME
    w_bits = 4
    act_modes = ("dynamic", "static", "none")

    def register_buffers(self, device) -> None:
        n, k, g = self.out_features, self.in_features, self.group_size
        self.register_buffer("qweight", torch.zeros(n, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("zeros", torch.zeros(n, k // g, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(n, k // g, dtype=torch.int8, device=device))
        self.register_buffer("channel_scale", torch.ones(n, dtype=torch.float32, device=device))

    def container(self) -> DGQWeight:
        return DGQWeight(self.qweight, self.zeros, self.scales, self.channel_scale, self.group_size)

    def int8_weight(self) -> torch.Tensor:
        """The exact int8 weight ``s_int * (q - z)`` ``[N, K]`` (what the int8 kernels multiply)."""
        return self.container().int8()
