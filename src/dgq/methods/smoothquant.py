"""``smoothquant`` (Xiao et al., 2023): W8A8 with ``s = max|X|^α / max|W|^(1-α)`` folded into the norms before
q,k,v and gate,up (the original recipe leaves linear → linear inputs unsmoothed)."""

from ..formats import W8A8Linear
from ..formats.packing import INT8_MAX
from ..quant.peers import w8_rtn
from ..quant.smooth import smoothquant_factors
from .base import Method, float_weight_and_bias, register


class SmoothQuant(Method):
    name = "smoothquant"
    summary = "W8A8 with SmoothQuant's α-smoothing folded into the norms (--alpha)"
    rank = 20
    formats = ("w8a8",)
    smooth_by_act = {"static": True, "dynamic": True, "none": True}

    def smoothing(self, spec, block, stats, config, group_size):
        if spec.kind != "norm":
            return None, {}
        weights = [block.get_submodule(d).weight.detach().float() for d in spec.dsts]
        f = smoothquant_factors(stats[spec.dsts[0]].absmax(), weights, config.alpha)
        return f, {"alpha": config.alpha}

    def make_layers(self, lin, name, group_size, stats, config):
        w, bias = float_weight_and_bias(lin)
        act_scale = None
        if config.act_mode == "static":  # SmoothQuant's per-tensor scale: the calibration absmax
            act_scale = max(stats.absmax().amax().item() / INT8_MAX, 1e-8)
        return [W8A8Linear.from_weight(w8_rtn(w), bias, config.act_mode, act_scale, name)]


register(SmoothQuant())
