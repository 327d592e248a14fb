"""``dgq-gptq``: DGQ's search fixes the grid (``s_ch``, ``s_int``, ``z``); GPTQ then picks the codes column by
column with Hessian error compensation inside the int8-safe range, fitted under the token-weighted Hessian; per
channel the better of GPTQ's and the search's codes. That and the plain search are offered to calibration, which
keeps per block the one with the lower mean per-token relative block output error. Same format and kernels as
``dgq``.

The residual stream is rotated by default (``rotate_residual``: exact, before calibration; Qwen2.5-Coder-0.5B
30.947 → 29.579, SmolLM2 22.615 → 22.253; benchmarks/README.md).

``rtn_grid`` (off by default) adds GPTQ on the data-free RTN grid as a third per-channel candidate: it lowers the
layers' error but raised SmolLM2's perplexity (23.18 vs 22.62)."""

import torch

from ..formats.dgq import DGQWeight, safe_code_bounds
from ..formats.packing import pack_uint4
from ..quant.gptq import Grid, gptq_quantize
from ..quant.rtn import rtn_quantize
from ..quant.search import keep_best_per_channel
from .base import register
from .dgq import DGQ, dgq_layer, dgq_weight


def gptq_on_grid(qw: DGQWeight, w: torch.Tensor, h_fit: torch.Tensor, config) -> DGQWeight:
    """GPTQ's codes for ``w`` on ``qw``'s fixed DGQ grid (step ``s_ch·s_int``, zero ``z``, int8-safe code range)."""
    lo, hi = safe_code_bounds(qw.zeros, qw.scales)
    grid = Grid(qw.channel_scale[:, None] * qw.scales.float(), qw.zeros.float(), lo.float(), hi.float())
    codes, _ = gptq_quantize(w, h_fit, qw.group_size, static=grid, block_size=config.block_size, damp=config.damp,
                             act_order=config.act_order)
    return DGQWeight(pack_uint4(codes), qw.zeros, qw.scales, qw.channel_scale, qw.group_size)


def dgq_gptq_weight(w: torch.Tensor, h: torch.Tensor, g: int, config, h_fit: torch.Tensor | None = None,
                    qw: DGQWeight | None = None) -> list[DGQWeight]:
    """``[dgq-gptq weight, plain DGQ-search weight]``: DGQ's grid from the search on ``h`` (or ``qw``, the search's
    result when already made), then GPTQ codes on it (and, with ``config.rtn_grid``, on the RTN grid) fitted under
    ``h_fit`` (default ``h``); per channel the candidate with the lowest ``dᵀ h_fit d``, the search's own codes
    included."""
    qw = dgq_weight(w, h, g, config) if qw is None else qw
    h_fit = h if h_fit is None else h_fit
    candidates = [gptq_on_grid(qw, w, h_fit, config), qw]
    if config.rtn_grid:
        candidates.append(gptq_on_grid(rtn_quantize(w, g), w, h_fit, config))
    return [keep_best_per_channel(w, h_fit, candidates), qw]


class DGQGPTQ(DGQ):
    name = "dgq-gptq"
    summary = "DGQ's grid with GPTQ error compensation (A8W4; act-order and the token-weighted Hessian on; default)"
    rank = 60
    full_hessian = True

    def defaults(self, config):
        return {**super().defaults(config), "act_order": True, "token_weighted": True, "rotate_residual": True}

    def make_layers(self, lin, name, group_size, stats, config):
        w = lin.weight.detach().float()
        h_fit = stats.token_hessian() if config.token_weighted else stats.hessian()
        return [dgq_layer(qw, lin, name, stats, config)
                for qw in dgq_gptq_weight(w, stats.hessian(), group_size, config, h_fit)]


register(DGQGPTQ())
