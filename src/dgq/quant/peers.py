"""The peer formats' data-free quantizers as pure functions of tensors: the standard asymmetric group-wise 4-bit
format (GPTQ/AWQ/RTN W4A16: float16 group scales, integer zero points; containers in :mod:`dgq.formats.w4a16`) and
per-channel symmetric int8 (W8A8, :mod:`dgq.formats.w8a8`).
"""

from __future__ import annotations

import torch

from ..errors import DGQError
from ..formats.packing import CODE_MAX, INT8_MAX, pack_uint4
from ..formats.w4a16 import W4Weight
from ..formats.w8a8 import W8Weight

QMAX4 = CODE_MAX


def w4_params(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Min/max scale and zero of each row of ``w [..., g]`` (range widened to include 0, as GPTQ's quantizer).

    The scale is rounded to float16 (what is stored), so codes are chosen against the executed grid. Float16
    cannot hold every scale: a group spanning more than 15 * 65504 (weights near 1e6 and beyond) would overflow
    (NaN logits), and one whose scale lies below float16's smallest subnormal (a group spanning less than ~1e-6)
    would become all zero. Both are refused with :class:`DGQError` (the DGQ format keeps float32 channel scales and
    takes both). Scales between the subnormals and the normals (groups spanning ~1e-6 to ~1e-3) are stored as
    float16 subnormals (coarser, but the codes are chosen against them); they were once clamped to the smallest
    normal, which silently zeroed groups of weights below ~3e-5."""
    wmin = w.float().amin(-1).clamp_max(0)
    wmax = w.float().amax(-1).clamp_min(0)
    both0 = (wmin == 0) & (wmax == 0)
    wmin, wmax = torch.where(both0, -1.0, wmin), torch.where(both0, 1.0, wmax)
    exact = (wmax - wmin) / QMAX4
    scale = exact.half().float()
    if not bool(torch.isfinite(scale).all()):
        raise DGQError(f"weights up to {float(torch.maximum(wmax, -wmin).max()):.3g} overflow the float16 group "
                       f"scales of the W4A16 format; use the DGQ format (--method dgq / rtn), whose scales are float32")
    if bool((scale == 0).any()):
        raise DGQError(f"weights as small as {float(exact.min() * QMAX4):.3g} underflow the float16 group scales of "
                       f"the W4A16 format (they would all become 0); use the DGQ format (--method dgq / rtn)")
    zero = torch.round(-wmin / scale).clamp(0, QMAX4)
    return scale, zero


def w4_codes(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Codes of ``w [..., g]`` on the grid (scale, zero) broadcast over the last dim, clamped to 0..15."""
    return torch.clamp(torch.round(w.float() / scale[..., None]) + zero[..., None], 0, QMAX4)


def w4_pack(codes: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> W4Weight:
    n = codes.shape[0]
    return W4Weight(pack_uint4(codes.reshape(n, -1)), scale.half().contiguous(), zero.to(torch.uint8).contiguous(),
                    group_size)


def w4_rtn(w: torch.Tensor, group_size: int) -> W4Weight:
    """Round-to-nearest W4 with min/max group parameters."""
    n, k = w.shape
    wg = w.float().view(n, k // group_size, group_size)
    scale, zero = w4_params(wg)
    return w4_pack(w4_codes(wg, scale, zero), scale, zero, group_size)


def w4_fake(w: torch.Tensor, group_size: int) -> torch.Tensor:
    """``dequantize(w4_rtn(w))`` without packing (for searches)."""
    n, k = w.shape
    wg = w.float().view(n, k // group_size, group_size)
    scale, zero = w4_params(wg)
    return ((w4_codes(wg, scale, zero) - zero[..., None]) * scale[..., None]).view(n, k)


def w8_rtn(w: torch.Tensor) -> W8Weight:
    absmax = w.float().abs().amax(-1)
    scale = absmax / INT8_MAX
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero rows, and denormal rows that underflow
    w8 = torch.round(w.float() / scale[:, None]).clamp(-INT8_MAX, INT8_MAX).to(torch.int8)
    return W8Weight(w8, scale.float().contiguous())
