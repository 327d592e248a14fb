"""AWQ (Lin et al., 2023) as pure functions of the weights and calibration statistics: an activation-aware
per-input-channel scale ``s = mean|x|^α`` (normalised, α over a grid) chosen by the consumers' quantized output
error, then a per-group clipping search. Errors are measured as ``dᵀ H d`` with ``H = XᵀX / T`` on the linears'
outputs (the reference measures the parent module's output; this is the linear, closed-form version).
"""

from __future__ import annotations

import torch

from .peers import w4_fake
from .search import group_blocks


def awq_scales(x_mean_abs: torch.Tensor, h: torch.Tensor, weights: list[torch.Tensor], group_size: int,
               grid: int = 20) -> tuple[torch.Tensor, dict]:
    """Best ``s [K]`` for the consumers ``weights`` (each ``[N_i, K]``) of one input with statistics
    ``mean|x|`` and ``H``. ``s = 1`` (α = 0) is a candidate, so the result is never worse than no scaling."""
    xm = x_mean_abs.float()
    best_err, best_s, best_alpha = float("inf"), torch.ones_like(xm), 0.0
    errs = []
    for i in range(grid):
        alpha = i / grid
        s = xm.pow(alpha).clamp_min(1e-4)
        s = s / (s.max() * s.min()).sqrt()
        err = 0.0
        for w in weights:
            d = w.float() - w4_fake(w.float() * s[None, :], group_size) / s[None, :]
            err += ((d @ h) * d).sum().item()
        errs.append(err)
        if err < best_err:
            best_err, best_s, best_alpha = err, s, alpha
    return best_s, {"alpha": best_alpha, "error": best_err, "error_alpha0": errs[0]}


def awq_clip(w: torch.Tensor, h: torch.Tensor, group_size: int, grid: int = 20, max_shrink: float = 0.5):
    """Per (row, group) symmetric clip ``±r·max|w_group|`` (r from 1 down to ``1 - max_shrink``) minimising the
    group's partial output error ``d_gᵀ H_g d_g``; returns the clipped weight."""
    n, k = w.shape
    g = group_size
    wg = w.float().view(n, k // g, g)
    hg = group_blocks(h.float(), g)
    org_max = wg.abs().amax(-1, keepdim=True)
    best = torch.full((n, k // g), float("inf"), device=w.device)
    best_max = org_max.clone()
    for i in range(int(max_shrink * grid)):
        mx = org_max * (1 - i / grid)
        wc = torch.maximum(torch.minimum(wg, mx), -mx)
        d = wg - w4_fake(wc.view(n, k), g).view(n, k // g, g)
        dt = d.transpose(0, 1)
        err = (torch.bmm(dt, hg) * dt).sum(-1).T
        better = err < best
        best = torch.where(better, err, best)
        best_max = torch.where(better[..., None], mx, best_max)
    return torch.maximum(torch.minimum(wg, best_max), -best_max).view(n, k)
