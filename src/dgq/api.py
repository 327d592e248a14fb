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
from .nn import DGQLinear, QuantLinear, W4A16Linear, W8A8Linear
from .quant.peers import w4_rtn, w8_rtn
from .quant.rtn import rtn_quantize

METHODS = ("rtn", "smoothquant", "gptq", "awq", "dgq", "dgq-gptq")
# the storage format each method writes: DGQ A8W4 (integer group scales), the standard W4A16 of GPTQ/AWQ (float16
# group scales), or per-channel int8 W8A8
WEIGHT_FORMATS = ("dgq", "w4a16", "w8a8")
CALIBRATED = ("smoothquant", "gptq", "awq", "dgq", "dgq-gptq")
# From the ablation matrix (README, benchmarks/results/quality.json): smoothing is vital for static per-tensor
# scales and hurts per-token ones (their outliers are already handled per token; the fold only moves them into the
# 4-bit weights).
DEFAULT_SMOOTH = {"static": True, "dynamic": False, "none": False}


@dataclass
class DGQConfig:
    """What to quantize and how.

    method: ``rtn`` (data-free), ``smoothquant`` (W8A8, α-smoothing folded into the norms), ``gptq`` (W4A16, Hessian
        error compensation), ``awq`` (W4A16, activation-aware scales and clipping), ``dgq`` (DGQ A8W4: percentile
        smoothing and the two-phase scale search, block by block) or ``dgq-gptq`` (DGQ's grid, then GPTQ picks the
        codes). All but ``rtn`` need ``calib``.
    w_bits: weight bits; 8 selects W8A8 (per-channel symmetric int8 weights) for ``rtn`` and is ``smoothquant``'s.
    weight_format: the storage format (``dgq``, ``w4a16``, ``w8a8``); None = the method's: rtn → dgq (A8W4) or
        w4a16 (with ``weights_only``) or w8a8 (``w_bits=8``); smoothquant → w8a8; gptq, awq → w4a16; dgq → dgq.
    alpha: SmoothQuant's migration strength. act_order / damp / block_size: GPTQ's knobs (act-order uses static
        groups; None = the method's default: on for dgq-gptq, which it improves (README), off for gptq, as
        published). awq_grid: AWQ's α grid (and clip grid) size. token_weighted: fit GPTQ to the mean
        per-token relative error (every calibration token scaled to unit norm in the Hessian) instead of the plain
        squared error, which a few massive-activation tokens dominate; None = on for dgq-gptq (its GPTQ step), off for
        gptq (the published Hessian) and dgq (its search: 24.60 vs 24.18 ppl with it, README).
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
    w_bits: int = 4
    weight_format: str | None = None
    alpha: float = 0.5
    act_order: bool | None = None
    damp: float = 0.01
    block_size: int = 128
    awq_grid: int = 20
    token_weighted: bool | None = None

    def validate(self) -> None:
        if self.method not in METHODS:
            raise DGQError(f"unknown method {self.method!r}; choose one of: {', '.join(METHODS)}")
        if self.w_bits not in (4, 8):
            raise DGQError(f"w_bits must be 4 or 8, got {self.w_bits}")
        if self.w_bits == 8 and self.method not in ("rtn", "smoothquant"):
            raise DGQError(f"method {self.method} quantizes weights to 4 bits; 8-bit weights are rtn or smoothquant")
        if self.weight_format not in (None, *WEIGHT_FORMATS):
            raise DGQError(f"unknown weight format {self.weight_format!r}; choose one of: {', '.join(WEIGHT_FORMATS)}")
        wf = self.storage_format
        if wf == "w8a8" and self.weights_only:
            raise DGQError("W8A8 quantizes activations; weights_only is not available for 8-bit weights")
        if self.method == "smoothquant" and wf != "w8a8":
            raise DGQError("smoothquant writes W8A8 (8-bit weights, int8 activations)")
        if self.method in ("dgq", "dgq-gptq") and wf != "dgq":
            raise DGQError(f"{self.method} writes the DGQ format")
        if self.method in ("gptq", "awq") and wf == "w8a8":
            raise DGQError(f"{self.method} writes 4-bit weights")
        if not 0.0 <= self.alpha <= 1.0:
            raise DGQError(f"smoothquant alpha must lie in [0, 1], got {self.alpha}")
        for knob in ("act_order", "token_weighted"):
            if getattr(self, knob) not in (None, True, False):
                raise DGQError(f"{knob} must be true, false or unset, got {getattr(self, knob)!r}")
        if not 0.0 < self.damp < 1.0:
            raise DGQError(f"GPTQ damp must lie in (0, 1), got {self.damp}")
        if self.block_size < 1 or self.awq_grid < 1:
            raise DGQError("block_size and awq_grid must be positive")
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
            if self.method in ("smoothquant", "awq"):
                smooth = True  # their own per-channel scales, folded like DGQ's smoothing
            elif self.method in ("rtn", "gptq"):
                smooth = False
            else:
                smooth = DEFAULT_SMOOTH[self.act_mode]
        ours = self.method == "dgq-gptq"  # gptq keeps the published defaults
        act_order = self.act_order if self.act_order is not None else ours
        token_weighted = self.token_weighted if self.token_weighted is not None else ours
        return replace(self, smooth=smooth, act_order=act_order, token_weighted=token_weighted)

    @property
    def storage_format(self) -> str:
        if self.weight_format is not None:
            return self.weight_format
        if self.method == "smoothquant" or (self.method == "rtn" and self.w_bits == 8):
            return "w8a8"
        if self.method in ("gptq", "awq") or (self.method == "rtn" and self.weights_only):
            return "w4a16"
        return "dgq"

    @property
    def act_mode(self) -> str:
        return "none" if self.weights_only or self.storage_format == "w4a16" else self.act

    @property
    def bits(self) -> tuple[int, int]:
        """(weight bits, activation bits) as written."""
        return (8 if self.storage_format == "w8a8" else 4), (16 if self.act_mode == "none" else 8)


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
        if isinstance(mod, QuantLinear):
            raise DGQError(f"{name} is already quantized; load the original model to quantize again")
        if not isinstance(mod, nn.Linear):
            raise DGQError(f"{name} is a {type(mod).__name__}, expected nn.Linear")
        if config.storage_format != "w8a8":  # W8A8 is per channel: no groups
            fmt.resolve_group_size(mod.in_features, config.group_size, name)
        fmt.check_finite(mod.weight.detach(), f"weight of {name}")
        if mod.bias is not None:
            fmt.check_finite(mod.bias.detach(), f"bias of {name}")
    return targets


def quantize_linear(mod: nn.Linear, name: str, config: DGQConfig, act_scale: float | None = None) -> nn.Module:
    """Make the data-free (rtn) quantized tensors for one linear (pure) and wrap them in its format's module."""
    w = mod.weight.detach()
    bias = None if mod.bias is None else mod.bias.detach().clone()
    wf = config.storage_format
    if wf == "w8a8":
        return W8A8Linear.from_weight(w8_rtn(w), bias, act_mode=config.act_mode, act_scale=act_scale, name=name)
    g = fmt.resolve_group_size(mod.in_features, config.group_size, name)
    if wf == "w4a16":
        return W4A16Linear.from_weight(w4_rtn(w, g), bias, name=name)
    qw = rtn_quantize(w, g, rounding=config.s_int_rounding)
    return DGQLinear.from_tensors(qw.qweight, qw.zeros, qw.scales, qw.channel_scale, g, bias=bias,
                                  act_mode=config.act_mode, act_scale=act_scale, name=name)


def quantize(model: nn.Module, config: DGQConfig | None = None, calib: torch.Tensor | None = None,
             progress: bool = True) -> nn.Module:
    """Quantize ``model`` in place and return it. ``calib`` ([n, seqlen] token ids) is needed by every method but
    ``rtn`` and by static activation scales."""
    config = (config or DGQConfig()).resolved()
    targets = validate_model(model, config)
    if config.method in CALIBRATED:
        if calib is None:
            raise DGQError(f"method {config.method} needs calibration data: pass calib token windows (CLI: --calib)")
        return _quantize_calibrated(model, config, targets, calib, progress)
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


def _dgq_weight(w: torch.Tensor, h: torch.Tensor, g: int, config: DGQConfig):
    from .quant.search import default_grid1, default_grid2, dgq_search

    if not config.search:
        return rtn_quantize(w, g, rounding=config.s_int_rounding)
    return dgq_search(w, h, g, phase2_enabled=config.phase2, grid1=default_grid1(config.grid1),
                      grid2=default_grid2(config.grid2), refine=config.refine)


def dgq_gptq_weight(w: torch.Tensor, h: torch.Tensor, g: int, config: DGQConfig, h_fit: torch.Tensor | None = None):
    """DGQ's grid (``s_ch``, ``s_int``, ``z``) from the search on ``h``, then GPTQ codes on that fixed grid inside
    the int8-safe range, fitted under ``h_fit`` (default ``h``; calibration passes the token-weighted Hessian);
    per channel, the better of GPTQ's and the search's codes by ``dᵀ h_fit d``.

    Returns ``(dgq-gptq weight, plain DGQ-search weight)``: calibration keeps, per block, whichever of the two
    gives the lower mean per-token relative block output error."""
    from .quant.gptq import Grid, gptq_quantize
    from .quant.rtn import QuantizedWeight
    from .quant.search import keep_best_per_channel

    qw = _dgq_weight(w, h, g, config)
    lo, hi = fmt.safe_code_bounds(qw.zeros, qw.scales)
    grid = Grid(qw.channel_scale[:, None] * qw.scales.float(), qw.zeros.float(), lo.float(), hi.float())
    h_fit = h if h_fit is None else h_fit
    codes, _ = gptq_quantize(w, h_fit, g, static=grid, block_size=config.block_size, damp=config.damp,
                             act_order=config.act_order)
    gq = QuantizedWeight(fmt.pack_uint4(codes), qw.zeros, qw.scales, qw.channel_scale, g)
    return keep_best_per_channel(w, h_fit, [gq, qw]), qw


def gptq_w4_weight(w: torch.Tensor, h: torch.Tensor, g: int, config: DGQConfig):
    """Standard GPTQ W4 (asymmetric min/max group parameters, float16 scales)."""
    from .quant.gptq import gptq_quantize
    from .quant.peers import QMAX4, w4_pack, w4_params

    def find(wg):
        scale, zero = w4_params(wg)
        return scale, zero, torch.zeros_like(zero), torch.full_like(zero, QMAX4)

    codes, grid = gptq_quantize(w, h, g, find=find, block_size=config.block_size, damp=config.damp,
                                act_order=config.act_order)
    return w4_pack(codes, grid.step, grid.zero, g)


AWQ_NO_CLIP = ("q_proj", "k_proj", "qkv_proj")  # AWQ does not clip the query/key projections


def _quantize_calibrated(model, config: DGQConfig, targets: dict, calib: torch.Tensor, progress: bool):
    from .calib import calibrate
    from .quant.awq import awq_clip

    arch = arch_for_config(model.config)

    def make_layer(lin: nn.Linear, name: str, stats) -> nn.Module:
        w = lin.weight.detach().float().cpu()
        bias = None if lin.bias is None else lin.bias.detach().cpu().clone()
        if config.method == "smoothquant":
            act_scale = None
            if config.act_mode == "static":
                act_scale = max(stats.absmax().amax().item() / fmt.INT8_MAX, 1e-8)
            return W8A8Linear.from_weight(w8_rtn(w), bias, act_mode=config.act_mode, act_scale=act_scale, name=name)
        g = fmt.resolve_group_size(lin.in_features, config.group_size, name)
        if config.method == "awq":
            if name.rsplit(".", 1)[-1] not in AWQ_NO_CLIP:
                w = awq_clip(w, stats.hessian(), g, grid=config.awq_grid)
            return W4A16Linear.from_weight(w4_rtn(w, g), bias, name=name)
        # the objective GPTQ (and, when asked, DGQ's search) minimises: plain or token-weighted output error
        h_fit = stats.token_hessian() if config.token_weighted else stats.hessian()
        if config.method == "gptq":
            return W4A16Linear.from_weight(gptq_w4_weight(w, h_fit, g, config), bias, name=name)
        act_scale = stats.static_scale() if config.act_mode == "static" else None

        def wrap(qw):
            return DGQLinear.from_tensors(qw.qweight, qw.zeros, qw.scales, qw.channel_scale, g, bias=bias,
                                          act_mode=config.act_mode, act_scale=act_scale, name=name)

        if config.method == "dgq-gptq":  # alternatives: calibration keeps the better one per block
            return tuple(wrap(q) for q in dgq_gptq_weight(w, stats.hessian(), g, config, h_fit))
        return wrap(_dgq_weight(w, h_fit, g, config))

    log = calibrate(model, arch, targets, calib, config, make_layer, progress=progress)
    model.dgq_config = build_quantization_config(model, config)
    model.dgq_config["calibration"] = {"windows": int(calib.shape[0]), "seqlen": int(calib.shape[1]), **log}
    return model


def build_quantization_config(model: nn.Module, config: DGQConfig) -> dict:
    modules = {
        name: {"format": m.format, "in_features": m.in_features, "out_features": m.out_features,
               "group_size": m.group_size, "act_mode": m.act_mode, "bias": m.bias is not None}
        for name, m in model.named_modules() if isinstance(m, QuantLinear)
    }
    w_bits, a_bits = config.bits
    return {
        "quant_method": "dgq",
        "format_version": fmt.FORMAT_VERSION,
        "dgq_version": __version__,
        "method": config.method,
        "weight_format": config.storage_format,
        "w_bits": w_bits,
        "a_bits": a_bits,
        "group_size": -1 if config.storage_format == "w8a8" else config.group_size,
        "act": config.act_mode,
        "nibble_order": fmt.NIBBLE_ORDER,
        "recipe": asdict(config),
        "modules": modules,
    }
