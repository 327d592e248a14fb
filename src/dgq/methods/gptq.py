"""``gptq`` (Frantar et al., 2022): standard W4A16 (asymmetric min/max group parameters, float16 scales) with
Hessian error compensation over every calibration token, as published (plain Hessian, act-order off by default)."""

import torch

from ..formats import W4A16Linear
from ..formats.w4a16 import W4Weight
from ..quant.gptq import gptq_quantize
from ..quant.peers import QMAX4, w4_pack, w4_params
from .base import Method, float_weight_and_bias, register


def gptq_w4_weight(w: torch.Tensor, h: torch.Tensor, g: int, config) -> W4Weight:
    """Standard GPTQ W4 codes and group parameters for ``w`` under ``h``."""

    def find(wg):
        scale, zero = w4_params(wg)
        return scale, zero, torch.zeros_like(zero), torch.full_like(zero, QMAX4)

    codes, grid = gptq_quantize(w, h, g, find=find, block_size=config.block_size, damp=config.damp,
                                act_order=config.act_order)
    return w4_pack(codes, grid.step, grid.zero, g)


class GPTQ(Method):
    name = "gptq"
    summary = "W4A16 with GPTQ's Hessian error compensation (--act-order)"
    rank = 30
    formats = ("w4a16",)
    full_hessian = True

    def make_layers(self, lin, name, group_size, stats, config):
        w, bias = float_weight_and_bias(lin)
        h = stats.token_hessian() if config.token_weighted else stats.hessian()
        return [W4A16Linear.from_weight(gptq_w4_weight(w, h, group_size, config), bias, name=name)]


register(GPTQ())
