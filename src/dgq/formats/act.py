"""Symmetric int8 activation quantization (docs/method.md §5). Inputs are never modified."""

from __future__ import annotations

import torch


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic per-token absmax: ``x[M, K]`` -> ``(x8 int8 [M, K], s_x float32 [M])``.

    ``s_x = max|x_row| / 127`` (1.0 for an all-zero row), ``x8 = clamp(round(x / s_x), -127, 127)``, in float32.
    A row holding NaN (Inf) gets ``s_x`` NaN (Inf): the layer's output row is then not finite either, instead of
    silently finite and wrong (NaN would otherwise round to some int8 code).
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1)  # NaN if the row holds one
    s = torch.where(amax == 0, torch.ones_like(amax), amax / 127.0)
    y = xf / s[:, None]  # a new tensor: the in-place steps below never touch the caller's x
    return y.round_().clamp_(-127, 127).to(torch.int8), s


def quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Static per-tensor: ``x8 = clamp(round(x / scale), -127, 127)``; returns ``s_x``, the scale broadcast to
    ``[M]`` (NaN/Inf for rows holding NaN/Inf, as in :func:`quantize_per_token`)."""
    xf = x.float()
    s = scale.float().reshape(())
    x8 = (xf / s).round_().clamp_(-127, 127).to(torch.int8)
    amax = xf.abs().amax(dim=-1)
    return x8, torch.where(torch.isfinite(amax), s, amax).contiguous()


def epilogue(
    acc: torch.Tensor, s_x: torch.Tensor, channel_scale: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
) -> torch.Tensor:
    """``y[m, n] = (acc[m, n] * s_x[m]) * s_ch[n] (+ bias[n])`` in float32, cast to ``dtype``."""
    y = acc.float()  # a new tensor; (acc * s_x) * s_ch, in this order, in place
    y.mul_(s_x.float()[:, None]).mul_(channel_scale.float()[None, :])
    if bias is not None:
        y.add_(bias.float())
    return y.to(dtype)
