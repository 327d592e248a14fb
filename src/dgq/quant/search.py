"""DGQ's two-phase grid search for the dual-grained scales (docs/method.md §3), vectorised over channels and
groups, as pure functions of the weight and the calibration statistics ``H = XᵀX / T``.

Phase 1 (fine grain): per (channel, group), shrink the group's [min, max] by r over ``grid1`` ratios and keep the
(s_group, z) with the lowest partial output error ``d_gᵀ H_g d_g`` (``d_g`` = the group's weight error).
Phase 2 (coarse grain): per channel, ``s_ch = r·max|W_row|/127`` over ``grid2`` ratios, ``s_int = round|ceil(
s_group/s_ch)`` (both rounding modes are candidates), clip, requantize with the phase-1 zeros inside the int8-safe
code range — the format that is executed — and keep the s_ch (and rounding) with the lowest full output error
``dᵀ H d``.
"""

from __future__ import annotations

import torch

from ..formats.dgq import DGQWeight, quantize_codes
from ..formats.packing import CODE_MAX, INT8_MAX, pack_uint4
from .rtn import group_minmax, rtn_quantize

EPS = 1e-10
CHUNK_ELEMENTS = 1 << 24  # dgq_search splits larger weights into row chunks of about this many elements


def default_grid1(n: int = 20) -> torch.Tensor:
    """The release's phase-1 ratios ``1.02 − 0.22·(i+1)/n`` (1.009 … 0.80 for n = 20)."""
    return torch.tensor([1.02 - 0.22 * (i + 1) / n for i in range(n)], device="cpu")  # host-side: read as floats


def default_grid2(n: int = 80) -> torch.Tensor:
    """The release's phase-2 ratios ``1.02 − 0.82·(i+1)/n`` (1.01 … 0.20 for n = 80)."""
    return torch.tensor([1.02 - 0.82 * (i + 1) / n for i in range(n)], device="cpu")


def hessian(x: torch.Tensor) -> torch.Tensor:
    """``XᵀX / T`` in float32 for calibration inputs ``x [T, K]``."""
    xf = x.float()
    return xf.T @ xf / max(1, xf.shape[0])


def group_blocks(h: torch.Tensor, g: int) -> torch.Tensor:
    """The diagonal ``[G, g, g]`` blocks of ``h [K, K]``."""
    k = h.shape[0]
    idx = torch.arange(k, device=h.device).view(k // g, g)
    return h[idx[:, :, None], idx[:, None, :]]


def phase1(w: torch.Tensor, h: torch.Tensor, g: int, grid: torch.Tensor | None = None):
    """Best per-(channel, group) ``(s_group, z)`` by partial output error. Returns float tensors ``[N, G]``."""
    grid = default_grid1() if grid is None else grid
    n, k = w.shape
    wg = w.float().view(n, k // g, g)
    hg = group_blocks(h, g)
    wmin, wmax = group_minmax(w, g)
    best = torch.full((n, k // g), float("inf"), device=w.device)
    best_s = torch.zeros(n, k // g, device=w.device)
    best_z = torch.zeros(n, k // g, device=w.device)
    for r in grid.tolist():
        lo, hi = r * wmin, r * wmax
        s = ((hi - lo) / CODE_MAX).clamp_min(EPS)
        z = torch.round(-lo / s).clamp(0, CODE_MAX)
        q = torch.clamp(torch.round(wg / s[..., None]) + z[..., None], 0, CODE_MAX)
        d = wg - s[..., None] * (q - z[..., None])
        dt = d.transpose(0, 1)  # [G, N, g]: one batched matmul per group block of H
        err = (torch.bmm(dt, hg) * dt).sum(-1).T.contiguous()
        better = err < best
        best = torch.where(better, err, best)
        best_s = torch.where(better, s, best_s)
        best_z = torch.where(better, z, best_z)
    return best_s.contiguous(), best_z.contiguous()


def _requantize(w, absmax, s_group, z, g, r, rounding):
    """Candidate clip ratios ``r [N]`` -> ``(w_hat, s_int)`` in the executed int8-safe format."""
    n, k = w.shape
    s_ch = r * absmax / INT8_MAX
    ratio = s_group / s_ch[:, None]
    s_int = (torch.ceil(ratio) if rounding == "ceil" else torch.round(ratio)).clamp(1, INT8_MAX)
    step = s_ch[:, None] * s_int
    lim = (r * absmax)[:, None]
    wc = torch.maximum(torch.minimum(w, lim), -lim).view(n, k // g, g)
    m = torch.floor(INT8_MAX / s_int)
    lo, hi = (z - m).clamp_min(0), (z + m).clamp_max(CODE_MAX)
    q = torch.round(wc / step[..., None]) + z[..., None]
    q = torch.maximum(torch.minimum(q, hi[..., None]), lo[..., None])
    return (step[..., None] * (q - z[..., None])).reshape(n, k), s_int


def phase2(w: torch.Tensor, h: torch.Tensor, s_group: torch.Tensor, z: torch.Tensor, g: int,
           grid: torch.Tensor | None = None, roundings: tuple[str, ...] = ("round", "ceil"), refine: int = 0):
    """Best per-channel ``(s_ch, s_int)`` by full output error over the ratios ``grid`` (and, with ``refine`` > 0,
    ``refine`` finer ratios around each channel's best, spaced by a fraction of the grid step).

    Returns ``(s_ch [N], s_int [N, G], errors [N], clip ratio r [N])``."""
    grid = default_grid2() if grid is None else grid
    wf = w.float()
    n = w.shape[0]
    absmax = wf.abs().amax(1).clamp_min(EPS)
    best = torch.full((n,), float("inf"), device=w.device)
    best_sint = torch.ones_like(s_group)
    best_r = torch.ones(n, device=w.device)

    def consider(r: torch.Tensor):
        nonlocal best, best_sint, best_r
        for rounding in roundings:
            w_hat, s_int = _requantize(wf, absmax, s_group, z, g, r, rounding)
            d = wf - w_hat
            err = ((d @ h) * d).sum(1)
            better = err < best
            best = torch.where(better, err, best)
            best_sint = torch.where(better[:, None], s_int, best_sint)
            best_r = torch.where(better, r, best_r)

    for r in grid.tolist():
        consider(torch.full((n,), r, device=w.device))
    if refine > 0 and len(grid) > 1:
        step = float((grid[0] - grid[-1]).abs()) / (len(grid) - 1)
        center = best_r.clone()
        for j in range(1, refine + 1):
            off = step * j / (refine + 1)
            for sign in (-1.0, 1.0):
                consider((center + sign * off).clamp(0.05, 1.0))
    return best_r * absmax / INT8_MAX, best_sint, best, best_r


def output_error(w: torch.Tensor, w_hat: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per-channel ``mean_t (x·(w − ŵ))²`` = ``dᵀ H d``."""
    d = w.float() - w_hat.float()
    return ((d @ h) * d).sum(1)


def dgq_search(w: torch.Tensor, h: torch.Tensor, g: int, phase2_enabled: bool = True,
               grid1: torch.Tensor | None = None, grid2: torch.Tensor | None = None,
               roundings: tuple[str, ...] = ("round", "ceil"), refine: int = 0) -> DGQWeight:
    """Both phases; with ``phase2_enabled=False`` the coarse scale is the data-free ``max|W_row|/127`` and
    ``s_int = round(s_group / s_ch)`` (phase 1 only).

    Every choice is per output channel, so a weight of more than :data:`CHUNK_ELEMENTS` elements is searched in row
    chunks: the search's float32 temporaries (~6 copies of the weight) then stay bounded by the chunk (a 7B
    model's 11008 x 4096 linears: ~1.1 GB -> ~0.3 GB). Smaller weights run in one piece, as always."""
    n, k = w.shape
    rows = max(1, CHUNK_ELEMENTS // k)
    if n * k <= CHUNK_ELEMENTS or n <= rows:
        return _search(w, h, g, phase2_enabled, grid1, grid2, roundings, refine)
    parts = [_search(w[i:i + rows], h, g, phase2_enabled, grid1, grid2, roundings, refine) for i in range(0, n, rows)]
    return DGQWeight(group_size=g, **{f: torch.cat([getattr(p, f) for p in parts]).contiguous()
                                      for f in ("qweight", "zeros", "scales", "channel_scale")})


def _search(w, h, g, phase2_enabled, grid1, grid2, roundings, refine) -> DGQWeight:
    s_group, z = phase1(w, h, g, grid1)
    if phase2_enabled:
        s_ch, s_int, _, r = phase2(w, h, s_group, z, g, grid2, roundings, refine)
    else:
        s_ch, s_int, _, r = phase2(w, h, s_group, z, g, torch.ones(1, device="cpu"), ("round",))  # a host grid
    zeros = z.to(torch.int8)
    s_int8 = s_int.to(torch.int8)
    lim = (r * w.float().abs().amax(1))[:, None]
    codes = quantize_codes(torch.maximum(torch.minimum(w.float(), lim), -lim), s_ch, s_int8, zeros, g)
    best = DGQWeight(pack_uint4(codes), zeros, s_int8, s_ch.float().contiguous(), g)
    return keep_best_per_channel(w, h, [best] + [rtn_quantize(w, g, rounding=m) for m in ("round", "ceil")])


def keep_best_per_channel(w: torch.Tensor, h: torch.Tensor, candidates: list[DGQWeight]) -> DGQWeight:
    """Per output channel, the candidate with the lowest full output error (all of a channel's tensors are per
    channel, so mixing channels is valid). Guarantees the search is never worse than data-free RTN."""
    errs = torch.stack([output_error(w, c.dequantize(), h) for c in candidates])  # [C, N]
    pick = errs.argmin(0)
    out = candidates[0]
    fields = {}
    for name in ("qweight", "zeros", "scales", "channel_scale"):
        stacked = torch.stack([getattr(c, name) for c in candidates])
        idx = pick.view(1, -1, *([1] * (stacked.ndim - 2))).expand(1, *stacked.shape[1:])
        fields[name] = stacked.gather(0, idx)[0].contiguous()
    return DGQWeight(group_size=out.group_size, **fields)
