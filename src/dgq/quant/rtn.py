"""Data-free ("rtn") DGQ scales: group min/max -> s_group, s_ch = row absmax / 127, s_int = max(1, round(s_group/s_ch)).

A pure function of the weight; returns the packed format tensors.
"""

from __future__ import annotations

import torch

from ..formats.dgq import DGQWeight, quantize_codes
from ..formats.packing import CODE_MAX, INT8_MAX, pack_uint4


def group_minmax(w: torch.Tensor, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-group min/max of ``w [N, K]``, widened to include 0 (so the zero point lies in 0..15)."""
    n, k = w.shape
    wg = w.float().reshape(n, k // group_size, group_size)
    return wg.amin(-1).clamp_max(0), wg.amax(-1).clamp_min(0)


def pack_from_scales(
    w: torch.Tensor, channel_scale: torch.Tensor, s_int: torch.Tensor, wmin: torch.Tensor, group_size: int
) -> DGQWeight:
    """Zero points from the executed step ``s_ch * s_int`` and the group minimum; codes in the int8-safe range."""
    s_int = torch.nan_to_num(s_int, nan=1.0).clamp(1, INT8_MAX).to(torch.int8)
    step = channel_scale.float()[:, None] * s_int.float()
    zeros = torch.round(-wmin / step).clamp(0, CODE_MAX).to(torch.int8)
    codes = quantize_codes(w, channel_scale, s_int, zeros, group_size)
    return DGQWeight(pack_uint4(codes), zeros, s_int, channel_scale.float().contiguous(), group_size)


def rtn_quantize(w: torch.Tensor, group_size: int, rounding: str = "round") -> DGQWeight:
    """RTN scales for ``w [N, K]`` (``group_size`` must divide K; already resolved)."""
    wmin, wmax = group_minmax(w, group_size)
    s_group = (wmax - wmin) / CODE_MAX
    absmax = w.float().abs().amax(-1)
    s_ch = absmax / INT8_MAX
    s_ch = torch.where(s_ch > 0, s_ch, torch.ones_like(s_ch))  # all-zero rows, and denormal ones whose /127 underflows
    ratio = s_group / s_ch[:, None]
    s_int = torch.ceil(ratio) if rounding == "ceil" else torch.round(ratio)
    return pack_from_scales(w, s_ch, s_int.clamp_min(1), wmin, group_size)
