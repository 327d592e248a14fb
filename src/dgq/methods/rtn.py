"""``rtn``: data-free round-to-nearest, in any of the three formats (DGQ A8W4 by default; W4A16 with
``weights_only``; W8A8 with ``w_bits=8``). Static activation scales, if asked for, come from one float pass."""

from ..formats import DGQLinear, W4A16Linear, W8A8Linear
from ..quant.peers import w4_rtn, w8_rtn
from ..quant.rtn import rtn_quantize
from .base import Method, register


class RTN(Method):
    name = "rtn"
    summary = "data-free round-to-nearest (A8W4 in the DGQ format; W4A16 with --weights-only; W8A8 with --w-bits 8)"
    rank = 10
    formats = ("dgq", "w4a16", "w8a8")
    calibrated = False
    rows = {"rtn-w4a16": {"weights_only": True}, "rtn-w4a8": {}, "rtn-w8a8": {"w_bits": 8}}

    def default_format(self, config):
        if config.w_bits == 8:
            return "w8a8"
        return "w4a16" if config.weights_only else "dgq"

    def make_layers(self, lin, name, group_size, stats, config):
        w = lin.weight.detach()
        bias = None if lin.bias is None else lin.bias.detach().clone()
        act_scale = stats.static_scale() if config.act_mode == "static" else None
        if config.format == "w8a8":
            return [W8A8Linear.from_weight(w8_rtn(w), bias, config.act_mode, act_scale, name)]
        if config.format == "w4a16":
            return [W4A16Linear.from_weight(w4_rtn(w, group_size), bias, name=name)]
        qw = rtn_quantize(w, group_size, rounding=config.s_int_rounding)
        return [DGQLinear.from_weight(qw, bias, config.act_mode, act_scale, name)]


register(RTN())
