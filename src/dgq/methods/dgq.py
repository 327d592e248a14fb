"""``dgq``: DGQ A8W4 (docs/method.md): percentile-clipping smoothing (§4; on for static activations, off for
dynamic ones by default, from the ablation in benchmarks/README.md) and the two-phase scale search (§3), block by
block, keeping per channel whichever of search and RTN has the lower output error."""

import torch

from ..formats import DGQLinear
from ..formats.dgq import DGQWeight
from ..quant.rtn import rtn_quantize
from ..quant.search import default_grid1, default_grid2, dgq_search
from ..quant.smooth import smoothing_factors
from .base import Method, register


def dgq_weight(w: torch.Tensor, h: torch.Tensor, g: int, config) -> DGQWeight:
    """DGQ's scales for ``w`` under the objective ``h`` (the two-phase search, or RTN with ``search=False``)."""
    if not config.search:
        return rtn_quantize(w, g, rounding=config.s_int_rounding)
    return dgq_search(w, h, g, phase2_enabled=config.phase2, grid1=default_grid1(config.grid1),
                      grid2=default_grid2(config.grid2), refine=config.refine)


def dgq_layer(qw: DGQWeight, lin, name: str, stats, config) -> DGQLinear:
    bias = None if lin.bias is None else lin.bias.detach().clone()
    act_scale = stats.static_scale() if config.act_mode == "static" else None
    return DGQLinear.from_weight(qw, bias, config.act_mode, act_scale, name)


class DGQ(Method):
    name = "dgq"
    summary = "calibrated DGQ A8W4: percentile smoothing + two-phase scale search, block by block"
    rank = 50
    smooth_by_act = {"static": True, "dynamic": False, "none": False}

    def smoothing(self, spec, block, stats, config, group_size):
        return smoothing_factors(stats[spec.dsts[0]].absmax()), {}

    def make_layers(self, lin, name, group_size, stats, config):
        w = lin.weight.detach().float()
        h = stats.token_hessian() if config.token_weighted else stats.hessian()
        return [dgq_layer(dgq_weight(w, h, group_size, config), lin, name, stats, config)]


register(DGQ())
