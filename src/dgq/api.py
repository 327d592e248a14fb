"""The Python API: ``dgq.quantize(model, DGQConfig(...), calib=None)`` swaps every decoder linear for a
``DGQLinear`` in place (torchao's ``quantize_(model, config)`` shape).

Quantization is two steps, gpt-fast style: make the quantized tensors for each linear (a pure function of the
weight, and of calibration statistics where the method uses them), then swap the module. Everything is validated
before the first module is touched, so a bad input leaves the model unchanged.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from . import __version__
from . import format as fmt
from .arch import arch_for_config, block_linears, get_blocks
from .errors import DGQError
from .nn import DGQLinear
from .quant.rtn import rtn_quantize

METHODS = ("rtn", "dgq")
# From the ablation matrix (README, benchmarks/results/quality.json): smoothing is vital for static per-tensor
# scales and hurts per-token ones (their outliers are already handled per token; the fold only moves them into the
# 4-bit weights).
DEFAULT_SMOOTH = {"static": True, "dynamic": False, "none": False}


@dataclass
class DGQConfig:
    """What to quantize and how.

    method: ``rtn`` (data-free DGQ scales) or ``dgq`` (block-by-block calibration: percentile smoothing and the
        two-phase scale search on calibration activations; needs ``calib``).
    group_size: along K; must divide every quantized layer's input size (-1 = one group per row).
    act: ``dynamic`` (per-token absmax, default) or ``static`` (per-tensor, from calibration data).
    weights_only: keep float activations (A16W4) in the same storage format.
    s_int_rounding: how rtn rounds ``s_group / s_ch`` (``round`` as in the paper/release, or ``ceil``).
    ignore: full module names not to quantize.
    smooth / search / phase2: the parts of ``dgq`` (``--no-smooth``, ``--no-search``, ``--phase1-only``).
    search_tokens: calibration tokens sub-sampled for the search objectives (spread over all windows).
    grid1 / grid2: grid sizes of search phases 1 and 2 (phase 2 spans 1.0 -> 0.2 as in the release); refine: finer
        phase-2 ratios tried on each side of every channel's best (2·refine more candidates), so 16 + 8 ratios cover
        the release's 80-point resolution at a third of the cost.
    """

    method: str = "rtn"
    group_size: int = 128
    act: str = "dynamic"
    weights_only: bool = False
    s_int_rounding: str = "round"
    seed: int = 0
    ignore: tuple[str, ...] = field(default_factory=tuple)
    smooth: bool | str | None = None  # True, False, "selective"; None: the mode's default (see resolved())
    search: bool = True
    phase2: bool = True
    search_tokens: int = 4096
    grid1: int = 20
    grid2: int = 16
    refine: int = 4

    def validate(self) -> None:
        if self.method not in METHODS:
            raise DGQError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.act not in ("dynamic", "static"):
            raise DGQError(f"unknown activation mode {self.act!r}; choose dynamic or static")
        if self.s_int_rounding not in ("round", "ceil"):
            raise DGQError(f"s_int_rounding must be round or ceil, got {self.s_int_rounding!r}")
        if self.smooth not in (None, True, False, "selective"):
            raise DGQError(f"smooth must be true, false or 'selective', got {self.smooth!r}")
        if self.group_size == 0 or self.group_size < -1:
            raise DGQError(f"group size must be positive or -1 (per-channel), got {self.group_size}")

    def resolved(self) -> DGQConfig:
        """Fill the defaults that depend on other fields: smoothing is on for static activations (vital there) and
        off for dynamic ones and weight-only (see README's ablation table)."""
        from dataclasses import replace

        smooth = self.smooth
        if smooth is None:
            smooth = DEFAULT_SMOOTH[self.act_mode]
        return replace(self, smooth=smooth)

    @property
    def act_mode(self) -> str:
        return "none" if self.weights_only else self.act


def quantizable_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """Full name -> module of every linear the architecture table says to quantize."""
    arch = arch_for_config(model.config)
    out = {}
    for i, block in enumerate(get_blocks(model, arch)):
        for rel, mod in block_linears(block, arch).items():
            out[f"{arch.blocks}.{i}.{rel}"] = mod
    return out


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, new)


def validate_model(model: nn.Module, config: DGQConfig) -> dict[str, nn.Linear]:
    """Check every target before changing anything: type, group size, finite weights."""
    config.validate()
    targets = {n: m for n, m in quantizable_linears(model).items() if n not in config.ignore}
    for name, mod in targets.items():
        if isinstance(mod, DGQLinear):
            raise DGQError(f"{name} is already quantized; load the original model to quantize again")
        if not isinstance(mod, nn.Linear):
            raise DGQError(f"{name} is a {type(mod).__name__}, expected nn.Linear")
        fmt.resolve_group_size(mod.in_features, config.group_size, name)
        fmt.check_finite(mod.weight.detach(), f"weight of {name}")
        if mod.bias is not None:
            fmt.check_finite(mod.bias.detach(), f"bias of {name}")
    return targets


def quantize_linear(mod: nn.Linear, name: str, config: DGQConfig, act_scale: float | None = None) -> DGQLinear:
    """Make the quantized tensors for one linear (pure) and wrap them in a DGQLinear."""
    g = fmt.resolve_group_size(mod.in_features, config.group_size, name)
    qw = rtn_quantize(mod.weight.detach(), g, rounding=config.s_int_rounding)
    bias = None if mod.bias is None else mod.bias.detach().clone()
    return DGQLinear.from_tensors(qw.qweight, qw.zeros, qw.scales, qw.channel_scale, g, bias=bias,
                                  act_mode=config.act_mode, act_scale=act_scale, name=name)


def quantize(model: nn.Module, config: DGQConfig | None = None, calib: torch.Tensor | None = None,
             progress: bool = True) -> nn.Module:
    """Quantize ``model`` in place and return it. ``calib`` ([n, seqlen] token ids) is needed for static scales."""
    config = (config or DGQConfig()).resolved()
    targets = validate_model(model, config)
    if config.method == "dgq":
        if calib is None:
            raise DGQError("method dgq needs calibration data: pass calib token windows (CLI: --calib)")
        return _quantize_dgq(model, config, targets, calib, progress)
    act_scales: dict[str, float] = {}
    if config.act_mode == "static":
        if calib is None:
            raise DGQError("static activation scales need calibration data: pass calib (CLI: --calib)")
        from .calib import static_act_scales

        act_scales = static_act_scales(model, calib, list(targets))
    for name, mod in tqdm(targets.items(), desc="quantize", disable=not progress, leave=False):
        _set_module(model, name, quantize_linear(mod, name, config, act_scales.get(name)))
    model.dgq_config = build_quantization_config(model, config)
    return model


def _quantize_dgq(model, config: DGQConfig, targets: dict, calib: torch.Tensor, progress: bool):
    from .calib import calibrate
    from .quant.search import default_grid1, default_grid2, dgq_search

    arch = arch_for_config(model.config)
    grid1, grid2 = default_grid1(config.grid1), default_grid2(config.grid2)

    def make_layer(lin: nn.Linear, name: str, stats) -> DGQLinear:
        g = fmt.resolve_group_size(lin.in_features, config.group_size, name)
        w = lin.weight.detach().float().cpu()
        if config.search:
            qw = dgq_search(w, stats.hessian(), g, phase2_enabled=config.phase2, grid1=grid1, grid2=grid2,
                            refine=config.refine)
        else:
            qw = rtn_quantize(w, g, rounding=config.s_int_rounding)
        bias = None if lin.bias is None else lin.bias.detach().cpu().clone()
        act_scale = stats.static_scale() if config.act_mode == "static" else None
        return DGQLinear.from_tensors(qw.qweight, qw.zeros, qw.scales, qw.channel_scale, g, bias=bias,
                                      act_mode=config.act_mode, act_scale=act_scale, name=name)

    log = calibrate(model, arch, targets, calib, config, make_layer, progress=progress)
    model.dgq_config = build_quantization_config(model, config)
    model.dgq_config["calibration"] = {"windows": int(calib.shape[0]), "seqlen": int(calib.shape[1]), **log}
    return model


def build_quantization_config(model: nn.Module, config: DGQConfig) -> dict:
    modules = {
        name: {"in_features": m.in_features, "out_features": m.out_features, "group_size": m.group_size,
               "act_mode": m.act_mode, "bias": m.bias is not None}
        for name, m in model.named_modules() if isinstance(m, DGQLinear)
    }
    return {
        "quant_method": "dgq",
        "format_version": fmt.FORMAT_VERSION,
        "dgq_version": __version__,
        "w_bits": 4,
        "a_bits": 16 if config.weights_only else 8,
        "group_size": config.group_size,
        "act": config.act_mode,
        "nibble_order": fmt.NIBBLE_ORDER,
        "recipe": asdict(config),
        "modules": modules,
    }
