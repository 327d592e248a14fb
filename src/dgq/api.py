"""The Python API: ``dgq.quantize(model, DGQConfig(...), calib=None)`` swaps every decoder linear for a quantized
module in place (torchao's ``quantize_(model, config)`` shape).

Quantization is two steps, gpt-fast style: the method (:mod:`dgq.methods`) makes the quantized tensors of each
linear (a pure function of the weight, and of calibration statistics where it uses them), then the module is
swapped. Everything is validated before the first module is touched, so a bad input leaves the model unchanged.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch import nn
from tqdm.auto import tqdm

from . import kernels, methods
from .arch import arch_for_config, quantizable_linears, set_submodule
from .calib import calibrate, static_act_stats
from .checkpoint import build_quantization_config
from .config import DGQConfig
from .errors import DGQError, check_finite
from .formats import QuantLinear

log = logging.getLogger("dgq")


@dataclass
class Target:
    """A linear to quantize and its group size (resolved once, here)."""

    module: nn.Linear
    group_size: int


def validate_model(model: nn.Module, config: DGQConfig) -> dict[str, Target]:
    """Check every target before changing anything (type, group size, finite weights); ``config`` resolved."""
    linears = quantizable_linears(model)
    unknown = [n for n in config.ignore if n not in linears]
    if unknown:
        raise DGQError(f"ignore names {unknown[0]!r}, which is not a quantizable linear of this model "
                       f"(e.g. {next(iter(linears))})")
    targets = {}
    for name, mod in linears.items():
        if name in config.ignore:
            continue
        if isinstance(mod, QuantLinear):
            raise DGQError(f"{name} is already quantized; load the original model to quantize again")
        if not isinstance(mod, nn.Linear):
            raise DGQError(f"{name} is a {type(mod).__name__}, expected nn.Linear")
        g = config.layer_class.resolve_group_size(mod.in_features, config.group_size, name)
        check_finite(mod.weight.detach(), f"weight of {name}")
        if mod.bias is not None:
            check_finite(mod.bias.detach(), f"bias of {name}")
        targets[name] = Target(mod, g)
    return targets


def quantize(model: nn.Module, config: DGQConfig | None = None, calib: torch.Tensor | None = None,
             progress: bool = True) -> nn.Module:
    """Quantize ``model`` in place and return it. ``calib`` ([n, seqlen] token ids) is needed by every method but
    ``rtn`` and by static activation scales."""
    config = methods.resolve(config or DGQConfig())
    method = methods.get(config.method)
    targets = validate_model(model, config)
    if method.needs_calibration(config) and calib is None:
        what = f"method {config.method}" if method.calibrated else "static activation scales"
        raise DGQError(f"{what} needs calibration data: pass calib token windows (CLI: --calib)")
    calibration = None
    if method.calibrated:
        calibration = calibrate(model, arch_for_config(model.config), targets, calib, config, method,
                                progress=progress)
    else:
        stats = static_act_stats(model, calib, list(targets), progress) if config.act_mode == "static" else {}
        for name, t in tqdm(targets.items(), desc="quantize", disable=not progress, leave=False):
            set_submodule(model, name, method.make_layers(t.module, name, t.group_size, stats.get(name), config)[0])
    model.dgq_config = build_quantization_config(model, config)
    if calibration is not None:
        model.dgq_config["calibration"] = {"windows": int(calib.shape[0]), "seqlen": int(calib.shape[1]),
                                           **calibration}
    for reason in kernels.slow_paths(q for q in model.modules() if isinstance(q, QuantLinear)):
        log.warning("dgq: %s", reason)
    return model
