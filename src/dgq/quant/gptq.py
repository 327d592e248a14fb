"""GPTQ (Frantar et al., 2022) as a pure function of the weight and ``H = XᵀX / T``: columns are quantized one at
a time and each one's error is spread over the not-yet-quantized columns through the Cholesky factor of ``H⁻¹``
(1% dampening, column blocks of 128 with lazy batch updates, optional act-order).

The grid is pluggable, so the same routine serves two formats:

- standard W4 (``gptq``): group parameters are found at each group's first column from the weights as updated by
  the previous column blocks (the reference implementation's behaviour), or once up front (``static``, required
  with act-order);
- DGQ (``dgq-gptq``): the dual-grained grid chosen by DGQ's search is fixed (step ``s_ch·s_int``, zero ``z``) and
  codes are clamped to the int8-safe range, so the result is executed by the same A8W4 kernels.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..errors import DGQError


@dataclass
class Grid:
    """Per (row, group): ``w_hat = step * (q - zero)`` with codes ``q`` clamped to ``[lo, hi]`` (all ``[N, G]``)."""

    step: torch.Tensor
    zero: torch.Tensor
    lo: torch.Tensor
    hi: torch.Tensor

    @classmethod
    def empty(cls, n: int, groups: int, device=None) -> Grid:
        return cls(*(torch.zeros(n, groups, device=device) for _ in range(4)))

    def set(self, grp: int, step, zero, lo, hi) -> None:
        self.step[:, grp], self.zero[:, grp], self.lo[:, grp], self.hi[:, grp] = step, zero, lo, hi


# find(w_group [N, g]) -> (step [N], zero [N], lo [N], hi [N])
FindFn = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]


def inverse_hessian_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + λI)⁻¹`` with ``λ = damp · mean(diag H)``; raises a clear error if ``H`` is
    not positive definite even after dampening."""
    k = h.shape[0]
    hd = h.double().clone()  # float64: the inverse of an ill-conditioned H (outlier channels) in float32 is noise
    hd += damp * torch.diag(hd).mean().clamp_min(1e-12) * torch.eye(k, dtype=hd.dtype, device=hd.device)
    lower, info = torch.linalg.cholesky_ex(hd)
    if int(info) != 0:
        raise DGQError(f"GPTQ: the calibration Hessian is not positive definite after {damp:.0%} dampening; "
                       f"use more calibration data or a larger damp")
    hinv = torch.cholesky_inverse(lower)
    return torch.linalg.cholesky(hinv, upper=True).float()


@torch.no_grad()
def gptq_quantize(w: torch.Tensor, h: torch.Tensor, group_size: int, find: FindFn | None = None,
                  static: Grid | None = None, block_size: int = 128, damp: float = 0.01,
                  act_order: bool = False) -> tuple[torch.Tensor, Grid]:
    """GPTQ codes for ``w [N, K]`` (float tensor of integer codes, original column order) and the grid used.

    Exactly one of ``find`` (group parameters found during the pass) or ``static`` (fixed grid) is needed; with
    ``act_order`` and ``find`` the groups are made static from the original weights first.
    """
    n, k = w.shape
    g = group_size
    if (find is None) == (static is None):
        raise ValueError("give exactly one of find or static")
    W = w.float().clone()
    H = h.float().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    if static is None and act_order:
        static = Grid.empty(n, k // g, w.device)
        for grp in range(k // g):
            static.set(grp, *find(W[:, grp * g:(grp + 1) * g]))
    grid = static if static is not None else Grid.empty(n, k // g, w.device)
    perm = torch.argsort(torch.diag(H), descending=True) if act_order else torch.arange(k, device=w.device)
    W, H = W[:, perm], H[perm][:, perm]
    hinv = inverse_hessian_factor(H, damp)
    codes = torch.zeros(n, k, device=w.device)
    cols = perm.tolist()
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = W[:, i1:i2].clone()
        err1 = torch.zeros(n, i2 - i1, device=w.device)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = cols[i1 + i]
            grp = col // g
            if static is None and col % g == 0:  # no act-order here, so col == i1 + i
                grid.set(grp, *find(W[:, col:col + g]))
            step, zero = grid.step[:, grp], grid.zero[:, grp]
            wc = w1[:, i]
            q = torch.minimum(torch.maximum(torch.round(wc / step) + zero, grid.lo[:, grp]), grid.hi[:, grp])
            codes[:, col] = q
            e = (wc - step * (q - zero)) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        W[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    return codes, grid
