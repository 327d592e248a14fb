"""Percentile-clipping smoothing (docs/method.md §4) as pure functions of tensors.

Only the top ~0.5% outlier input channels are scaled down to a baseline (the ⌊0.005·C + 1.5⌋-th largest per-channel
absmax); no alpha, no weight term. Folding is exact: the source (a norm, or a linear whose output feeds the
consumers through an op that is linear/positively homogeneous in it) is divided by ``f`` and the consumers' input
columns are multiplied by ``f``.
"""

from __future__ import annotations

import math

import torch


def baseline(absmax: torch.Tensor) -> torch.Tensor:
    """The ⌊0.005·C + 1.5⌋-th largest value of the per-channel absmax (≈ the 99.5th percentile)."""
    c = absmax.numel()
    k = min(c, max(1, math.floor(0.005 * c + 1.5)))
    return torch.topk(absmax.float(), k).values[-1]


def smoothing_factors(absmax: torch.Tensor) -> torch.Tensor:
    """``f_j = absmax_j / baseline`` where ``absmax_j > baseline``, else 1."""
    b = baseline(absmax)
    a = absmax.float()
    return torch.where(a > b, a / b.clamp_min(1e-12), torch.ones_like(a))


def fold_norm_weight(weight: torch.Tensor, f: torch.Tensor, offset: float = 0.0) -> torch.Tensor:
    """New norm weight so that ``offset + w_new = (offset + w) / f`` (``offset=1`` for Gemma's ``x·(1+w)``)."""
    return ((offset + weight.float()) / f - offset).to(weight.dtype)


def scale_input_columns(weight: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Consumer linear ``W[:, j] * f_j``."""
    return (weight.float() * f[None, :]).to(weight.dtype)


def scale_output_rows(t: torch.Tensor, f: torch.Tensor) -> torch.Tensor:
    """Source linear rows (weight ``[N, K]`` or bias ``[N]``) divided by ``f``."""
    return (t.float() / (f[:, None] if t.ndim == 2 else f)).to(t.dtype)


def smoothquant_factors(act_absmax: torch.Tensor, weights: list[torch.Tensor], alpha: float = 0.5) -> torch.Tensor:
    """SmoothQuant's ``s_j = max|X_j|^α / max_i|W_ij|^(1-α)`` (max over all consumers' rows), clamped at 1e-5."""
    wmax = torch.stack([w.float().abs().amax(0) for w in weights]).amax(0).clamp_min(1e-5)
    return (act_absmax.float().clamp_min(1e-5).pow(alpha) / wmax.pow(1 - alpha)).clamp_min(1e-5)
