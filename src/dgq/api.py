"""The Python API: ``dgq.quantize(model, DGQConfig(...), calib=None)`` swaps every decoder linear for a quantized
module in place (torchao's ``quantize_(model, config)`` shape).

Quantization is two steps, gpt-fast style: the method (:mod:`dgq.methods`) makes the quantized tensors of each
linear (a pure function of the weight, and of calibration statistics where it uses them), then the module is
swapped. Everything is validated before the first module is touched, so a bad input leaves the model unchanged.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from . import kernels, kvcache, methods
from .arch import arch_for_config, quantizable_linears, set_submodule
from .calib import ActivationStore, calibrate, make_layers, static_act_stats
from .checkpoint import build_quantization_config
from .config import DGQConfig
from .errors import DGQError, check_finite
from .formats import QuantLinear
from .rotation import rotate_residual_globals

log = logging.getLogger("dgq")


@dataclass
class Target:
    """A linear to quantize and its group size (resolved once, here)."""

    module: nn.Linear
    group_size: int


AUTO_GROUP_SIZES = (128, 64)  # tried in order when the group size is not given (the GPU kernel runs 64/128/256)


def auto_group_size(ks: list[int]) -> int:
    """128 if it divides every input size in ``ks``, else 64, else the largest size below 128 that divides all."""
    common = math.gcd(*ks)
    for g in AUTO_GROUP_SIZES:
        if common % g == 0:
            return g
    return max(d for d in range(1, min(common, 128) + 1) if common % d == 0)


def plan(model: nn.Module, config: DGQConfig) -> tuple[DGQConfig, dict[str, Target]]:
    """Check every target before changing anything (type, finite weights) and fix the group size (chosen when the
    resolved ``config`` leaves it None). Returns the config with its group size and the targets."""
    linears = quantizable_linears(model)
    unknown = [n for n in config.ignore if n not in linears]
    if unknown:
        raise DGQError(f"ignore names {unknown[0]!r}, which is not a quantizable linear of this model "
                       f"(e.g. {next(iter(linears))})")
    mods = {n: m for n, m in linears.items() if n not in config.ignore}
    if not mods:
        raise DGQError("nothing to quantize: every quantizable linear is in ignore")
    for name, mod in mods.items():
        if isinstance(mod, QuantLinear):
            raise DGQError(f"{name} is already quantized; load the original model to quantize again")
        if not isinstance(mod, nn.Linear):
            raise DGQError(f"{name} is a {type(mod).__name__}, expected nn.Linear")
    ks = [m.in_features for m in mods.values()]
    if config.group_size is None:
        config = replace(config, group_size=auto_group_size(ks))
    elif config.layer_class.grouped and config.group_size != -1 and any(k % config.group_size for k in ks):
        name, k = next((n, m.in_features) for n, m in mods.items() if m.in_features % config.group_size)
        common = math.gcd(*ks)
        legal = ", ".join(str(d) for d in range(8, common + 1) if common % d == 0) or str(common)
        raise DGQError(f"group size {config.group_size} does not divide the input size {k} of {name}; sizes that "
                       f"divide every quantized layer: {legal} (or -1 for per-channel)")
    targets = {}
    for name, mod in mods.items():
        g = config.layer_class.resolve_group_size(mod.in_features, config.group_size, name)
        if not mod.weight.is_meta:  # streaming: checked when the block's weights are loaded (dgq.stream)
            check_finite(mod.weight.detach(), f"weight of {name}")
            if mod.bias is not None:
                check_finite(mod.bias.detach(), f"bias of {name}")
        targets[name] = Target(mod, g)
    return config, targets


def validate_model(model: nn.Module, config: DGQConfig) -> dict[str, Target]:
    """The targets of :func:`plan` (raises on anything that would stop quantization)."""
    return plan(model, config)[1]


def check_calibration(method, config: DGQConfig, calib) -> None:
    if method.needs_calibration(config) and calib is None:
        what = (f"method {config.method}" if method.calibrated else
                "static activation scales" if config.act_mode == "static" else f"the {config.kv} KV cache")
        raise DGQError(f"{what} needs calibration data: pass calib token windows (CLI: --calib)")


def kv_check(model_config, config: DGQConfig):
    """Refuse a KV mode the model's attention cannot use (before any work); the observer static scales need."""
    if config.kv in kvcache.CALIBRATED:
        return kvcache.KVObserver(model_config, config.kv)  # refuses what cannot use the cache
    why = kvcache.unsupported(model_config) if config.kv != "none" else None
    if why:
        raise DGQError(f"--kv {config.kv}: {why}")
    return None


def kv_entry(model_config, config: DGQConfig, observer) -> dict:
    """The ``kv_cache`` entry of the quantization_config (none: no entry, as before the KV cache existed)."""
    if config.kv == "none":
        return {}
    entry = {"mode": config.kv, "layout": kvcache.layout(model_config)}
    if observer is not None:
        s = observer.scales()
        entry.update({k: s[k] for k in (("k_scale", "v_scale") if config.kv == "int8-static" else ("k_smooth",))})
    return {"kv_cache": entry}


def activation_store(act_budget: float | None, act_dir=None) -> ActivationStore:
    """The calibration activations' store for a budget in GB (None: always in memory)."""
    if act_budget is not None and not act_budget > 0:
        raise DGQError(f"--act-budget must be a positive number of GB, got {act_budget}")
    return ActivationStore(None if act_budget is None else int(act_budget * 1e9), act_dir)


def quantize(model: nn.Module, config: DGQConfig | None = None, calib: torch.Tensor | None = None,
             progress: bool = True, act_budget: float | None = None, act_dir=None) -> nn.Module:
    """Quantize ``model`` in place and return it. ``calib`` ([n, seqlen] token ids) is needed by every method but
    ``rtn`` and by static activation scales. ``act_budget`` (GB): when the calibration activations (three tensors
    of windows x seqlen x hidden) exceed it, they are memory-mapped from temporary files under ``act_dir``
    (default: the system's temporary folder); the result is the same."""
    config = methods.resolve(config or DGQConfig())
    method = methods.get(config.method)
    auto = config.group_size is None
    config, targets = plan(model, config)
    check_calibration(method, config, calib)
    observer = kv_check(model.config, config)
    calibration = None
    if method.calibrated:
        if config.rotate_residual:
            rotate_residual_globals(model, arch_for_config(model.config), config.seed)
        calibration = calibrate(model, arch_for_config(model.config), targets, calib, config, method,
                                progress=progress, kv_observer=observer, store=activation_store(act_budget, act_dir))
    else:
        stats = static_act_stats(model, calib, list(targets), progress) if config.act_mode == "static" else {}
        for name, t in tqdm(targets.items(), desc="quantize", disable=not progress, leave=False):
            set_submodule(model, name, make_layers(method, t.module, name, t.group_size, stats.get(name), config)[0])
        if observer is not None:  # one forward of the quantized model per window
            kvcache.observe(model, calib, observer)
    model.dgq_config = build_quantization_config(model, config)
    model.dgq_config.update(kv_entry(model.config, config, observer))
    if config.kv != "none":
        kvcache.enable(model, config.kv, model.dgq_config["kv_cache"])
    model.dgq_config["group_size_auto"] = auto
    if calibration is not None:
        model.dgq_config["calibration"] = {"windows": int(calib.shape[0]), "seqlen": int(calib.shape[1]),
                                           **calibration}
    for reason in kernels.slow_paths(q for q in model.modules() if isinstance(q, QuantLinear)):
        log.warning("dgq: %s", reason)
    return model


def use_kv_cache(model: nn.Module, mode: str, calib: torch.Tensor | None = None) -> nn.Module:
    """Run ``model`` (float or quantized) on an int8 KV cache from now on, or on a float one (``none``).
    ``int8-static`` / ``int8-smooth`` keep the scales or factors the model already has (a checkpoint quantized with
    that ``kv``) or calibrate them on ``calib`` token windows, one forward each. Returns the model."""
    kvcache.check_mode(mode)
    have = getattr(model, "dgq_kv", None) or {"mode": "none"}
    if mode in kvcache.CALIBRATED and have["mode"] != mode:
        if calib is None:
            raise DGQError(f"the {mode} KV cache needs calibration data: pass calib token windows (CLI: --calib)")
        observer = kvcache.KVObserver(model.config, mode)  # refuses what cannot use the cache
        kvcache.enable(model, "none")
        try:
            scales = kvcache.observe(model, calib, observer).scales()
        except BaseException:
            kvcache.enable(model, have["mode"], have)
            raise
        return kvcache.enable(model, mode, scales)
    if mode in kvcache.CALIBRATED:
        return model
    return kvcache.enable(model, mode)
