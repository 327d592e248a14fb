"""``awq`` (Lin et al., 2023): W4A16 with activation-aware per-input-channel scales (an α grid on the consumers'
output error, folded exactly: norm → q,k,v; norm → gate,up; up → down), then a per-group clip search (not for the
query/key projections)."""

from ..formats import W4A16Linear
from ..quant.awq import awq_clip, awq_scales
from ..quant.peers import w4_rtn
from .base import Method, float_weight_and_bias, register

NO_CLIP = ("q_proj", "k_proj", "qkv_proj")  # AWQ does not clip the query/key projections


class AWQ(Method):
    name = "awq"
    summary = "W4A16 with AWQ's activation-aware scales and clipping"
    rank = 40
    formats = ("w4a16",)
    smooth_by_act = {"static": True, "dynamic": True, "none": True}

    def smoothing(self, spec, block, stats, config, group_size):
        weights = [block.get_submodule(d).weight.detach().float() for d in spec.dsts]
        st = stats[spec.dsts[0]]
        f, info = awq_scales(st.x().abs().mean(0), st.hessian(), weights, group_size, grid=config.awq_grid)
        return f, {"alpha": info["alpha"]}

    def make_layers(self, lin, name, group_size, stats, config):
        w, bias = float_weight_and_bias(lin)
        if name.rsplit(".", 1)[-1] not in NO_CLIP:
            w = awq_clip(w, stats.hessian(), group_size, grid=config.awq_grid)
        return [W4A16Linear.from_weight(w4_rtn(w, group_size), bias, name=name)]


register(AWQ())
