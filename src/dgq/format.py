"""The DGQ A8W4 storage format (dgq-method.md §1) as pure functions of tensors.

Per linear layer with weight ``W[N, K]`` and group size ``g`` (``G = K // g`` groups per row):

=============  ==============  =======  ==================================================
tensor         shape           dtype    meaning
=============  ==============  =======  ==================================================
``qweight``    ``[N, K // 2]`` uint8    4-bit codes 0..15, two per byte, **low nibble first**:
                                        ``code[n, 2i] = byte & 0xF``, ``code[n, 2i+1] = byte >> 4``
``zeros``      ``[N, G]``      int8     per-group zero point, 0..15
``scales``     ``[N, G]``      int8     per-group **integer** scale ``s_int`` >= 1
``channel_scale`` ``[N]``      float32  per-output-channel float scale ``s_ch``
=============  ==============  =======  ==================================================

``W_hat[n, k] = s_ch[n] * s_int[n, k // g] * (q[n, k] - z[n, k // g])`` and the int8 intermediate
``w8 = s_int * (q - z)`` always fits int8 because codes are clamped to the int8-safe range
``[max(0, z - m), min(15, z + m)]`` with ``m = floor(127 / s_int)``.
"""

from __future__ import annotations

import torch

from .errors import DGQError

CODE_MAX = 15
INT8_MAX = 127
FORMAT_VERSION = 1
NIBBLE_ORDER = "low-first"


def legal_group_sizes(k: int) -> list[int]:
    """Group sizes a layer with ``k`` inputs can take (divisors of k; k must be even for packing)."""
    return [d for d in range(1, k + 1) if k % d == 0]


def resolve_group_size(k: int, group_size: int, name: str = "layer") -> int:
    """Return the effective group size (``-1`` or ``0`` = one group per row) or raise naming the layer."""
    if k % 2:
        raise DGQError(f"{name}: input size {k} is odd; 4-bit codes pack two per byte so K must be even")
    g = k if group_size in (-1, 0) else group_size
    if g < 1 or k % g:
        legal = ", ".join(str(d) for d in legal_group_sizes(k) if d >= 8) or str(k)
        raise DGQError(
            f"{name}: group size {group_size} does not divide its input size {k}; legal group sizes: {legal} "
            f"(or -1 for per-channel)"
        )
    return g


def pack_uint4(codes: torch.Tensor) -> torch.Tensor:
    """Pack ``[N, K]`` codes in 0..15 into ``[N, K // 2]`` uint8, low nibble = even column."""
    if codes.shape[-1] % 2:
        raise DGQError(f"cannot pack {codes.shape[-1]} codes per row: the count must be even")
    c = codes.to(torch.uint8)
    return (c[..., 0::2] & 0xF) | ((c[..., 1::2] & 0xF) << 4)


def unpack_uint4(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_uint4`: ``[N, K // 2]`` uint8 -> ``[N, K]`` uint8 codes."""
    lo = packed & 0xF
    hi = packed >> 4
    return torch.stack((lo, hi), dim=-1).flatten(-2)


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


def dequantize(
    qweight: torch.Tensor,
    zeros: torch.Tensor,
    scales: torch.Tensor,
    channel_scale: torch.Tensor,
    group_size: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """``W_hat = s_ch[:, None] * w8`` in ``dtype`` (computed in float32)."""
    w8 = expand_int8(qweight, zeros, scales, group_size)
    return (w8.float() * channel_scale.float()[:, None]).to(dtype)


def check_finite(t: torch.Tensor, what: str) -> None:
    """Raise a one-line error if ``t`` holds NaN or Inf."""
    if not torch.isfinite(t).all():
        bad = int((~torch.isfinite(t)).sum())
        raise DGQError(f"{what} contains {bad} NaN/Inf value(s); refusing to quantize it")
