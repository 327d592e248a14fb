"""What a quantization method is: one object in a registry, saying which storage formats it writes, whether it
needs calibration data and which statistics, its smoothing step and how it turns one float linear (and its
calibration statistics) into candidate quantized modules. The orchestration (``dgq.api``, ``dgq.calib``) asks the
method; it never compares method names.

A method module in this package defines a :class:`Method` subclass and registers an instance with
:func:`register`; every module here is imported when the package is, so adding a method is adding one file.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from ..config import DGQConfig
from ..errors import DGQError
from ..formats import FORMATS, QuantLinear


class Method:
    name = ""
    summary = ""  # one line, for the CLI's help
    rank = 100  # listing order (CLI choices, dgq compare's default rows)
    formats: tuple[str, ...] = ("dgq",)  # the storage formats it can write; the first is its default
    calibrated = True  # calibrated block by block: needs calibration windows
    full_hessian = False  # statistics: Σ xᵀx over every calibration token (else over the sampled tokens)
    smooth_by_act = {"static": False, "dynamic": False, "none": False}  # default smoothing per activation mode
    rows: dict[str, dict] | None = None  # dgq compare's rows for this method: row name -> config fields

    # -- configuration ------------------------------------------------------------------------------------------
    def default_format(self, config: DGQConfig) -> str:
        return self.formats[0]

    def defaults(self, config: DGQConfig) -> dict:
        """Values for the knobs left unset (None) in ``config``."""
        return {"act_order": False, "token_weighted": False, "rtn_grid": False, "rotate": "off",
                "rotate_residual": False}

    def check(self, config: DGQConfig) -> None:
        """Method-specific checks of a resolved config (raise DGQError)."""

    def needs_calibration(self, config: DGQConfig) -> bool:
        return self.calibrated or config.act_mode == "static" or config.kv in ("int8-static", "int8-smooth")

    def compare_rows(self) -> dict[str, dict]:
        return self.rows or {self.name: {}}

    # -- calibration --------------------------------------------------------------------------------------------
    def wants_token_hessian(self, config: DGQConfig) -> bool:
        return self.full_hessian and bool(config.token_weighted)

    def smoothing(self, spec, block: nn.Module, stats: dict, config: DGQConfig, group_size: int
                  ) -> tuple[torch.Tensor | None, dict]:
        """Per-input-channel factors to fold at the arch table's mapping ``spec`` (None: do not fold) and what to
        log about them. ``stats`` maps the block's linear names to their input statistics."""
        return None, {}

    def make_layers(self, lin: nn.Linear, name: str, group_size: int, stats, config: DGQConfig
                    ) -> list[QuantLinear]:
        """Candidate quantized modules for one linear (calibration keeps, per block, the candidate index whose
        block output error is lowest; one candidate is the usual case). ``stats`` is None for data-free runs."""
        raise NotImplementedError


def float_weight_and_bias(lin: nn.Linear) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The linear's weight as float32 and a copy of its bias, on the linear's device (the quantizers run where the
    block was onloaded: statistics, search, smoothing and GPTQ are device-agnostic tensor code)."""
    return lin.weight.detach().float(), None if lin.bias is None else lin.bias.detach().clone()


REGISTRY: dict[str, Method] = {}


def register(method: Method) -> Method:
    if method.name in REGISTRY:
        raise ValueError(f"method {method.name!r} is registered twice")
    REGISTRY[method.name] = method
    return method


def names() -> list[str]:
    return [m.name for m in sorted(REGISTRY.values(), key=lambda m: (m.rank, m.name))]


def get(name: str) -> Method:
    m = REGISTRY.get(name)
    if m is None:
        raise DGQError(f"unknown method {name!r}; choose one of: {', '.join(names())}")
    return m


def resolve(config: DGQConfig) -> DGQConfig:
    """``config`` checked against its method, with every default that depends on the method filled in (format,
    weight bits, smoothing, the method's knobs). Idempotent."""
    config.check_fields()
    m = get(config.method)
    fmt = config.format or m.default_format(config)
    if fmt not in m.formats:
        raise DGQError(f"method {m.name} writes the {' or '.join(m.formats)} format, not {fmt}")
    cls = FORMATS[fmt]
    if config.w_bits not in (None, cls.w_bits):
        raise DGQError(f"method {m.name} writes {fmt} ({cls.w_bits}-bit weights); w_bits={config.w_bits} is not "
                       f"available for it")
    if config.weights_only and "none" not in cls.act_modes:
        raise DGQError(f"the {fmt} format quantizes activations; weights_only is not available for it")
    r = replace(config, format=fmt, w_bits=cls.w_bits)
    if r.smooth is None:
        r = replace(r, smooth=m.smooth_by_act[r.act_mode])
    r = replace(r, **{k: v for k, v in m.defaults(r).items() if getattr(r, k) is None})
    if (r.rotate != "off" or r.rotate_residual) and not m.calibrated:
        raise DGQError(f"rotate and rotate_residual need a calibrated method; {m.name} is data-free")
    m.check(r)
    return r
