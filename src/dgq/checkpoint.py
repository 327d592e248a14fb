"""Checkpoints: a folder with ``config.json`` (the model config plus ``quantization_config``), ``model.safetensors``
(every parameter and buffer, the packed tensors included) and the tokenizer files. Saves are atomic (a temporary
folder beside the target, then a rename). Loading never unpickles and never runs code from the folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from ._version import __version__
from .arch import arch_for_config, set_submodule
from .errors import DGQError
from .formats import FORMATS, QuantLinear
from .formats.packing import NIBBLE_ORDER
from .fsutil import atomic_folder
from .fuse import fuse_siblings

WEIGHTS = "model.safetensors"
FORMAT_VERSION = 1  # of the checkpoint layout and its quantization_config; load reads up to this version


def build_quantization_config(model: nn.Module, config) -> dict:
    """The ``quantization_config`` of a model quantized with the resolved ``config``: the recipe and every
    quantized module with its format, sizes, group size and activation mode."""
    modules = {
        name: {"format": m.format, "in_features": m.in_features, "out_features": m.out_features,
               "group_size": m.group_size, "act_mode": m.act_mode, "bias": m.bias is not None}
        for name, m in model.named_modules() if isinstance(m, QuantLinear)
    }
    w_bits, a_bits = config.bits
    return {
        "quant_method": "dgq",
        "format_version": FORMAT_VERSION,
        "dgq_version": __version__,
        "method": config.method,
        "format": config.format,
        "w_bits": w_bits,
        "a_bits": a_bits,
        "group_size": -1 if config.format == "w8a8" else config.group_size,
        "act": config.act_mode,
        "nibble_order": NIBBLE_ORDER,
        "recipe": asdict(config),
        "modules": modules,
    }


# -- save --------------------------------------------------------------------------------------------------------
def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters (tied ones once) and all buffers, non-persistent ones too (e.g. rotary tables)."""
    state = {n: p.detach() for n, p in model.named_parameters()}
    state.update({n: b.detach() for n, b in model.named_buffers()})
    return {n: _own(t.contiguous().cpu()) for n, t in state.items()}


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` with storage of its own: fused siblings' buffers are slices of one tensor (dgq.fuse), and
    safetensors refuses tensors that share memory."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


def save(model: nn.Module, path: str | os.PathLike, tokenizer=None, overwrite: bool = False) -> Path:
    """Write a quantized model (and its tokenizer) to ``path`` atomically."""
    qcfg = getattr(model, "dgq_config", None)
    if qcfg is None:
        raise DGQError("this model is not quantized by dgq (run dgq.quantize first)")
    out = Path(path).expanduser()
    if out.exists() and not overwrite:
        raise DGQError(f"output {out} already exists; choose another folder or pass overwrite (CLI: --force)")
    with atomic_folder(out, replace=True) as tmp:
        cfg = model.config.to_dict()
        cfg["quantization_config"] = qcfg
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        # one metadata key: safetensors orders a multi-key metadata map differently from run to run, which
        # would make identical checkpoints differ in their header bytes
        save_file(_state(model), tmp / WEIGHTS, metadata={"format": f"dgq-{FORMAT_VERSION}"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    return out


# -- load: read the config, build the skeleton, read the tensors, check them ------------------------------------
def read_quantization_config(path: Path) -> tuple[dict, dict]:
    """``(model config dict, quantization_config)`` of a checkpoint folder, checked for what load needs."""
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise DGQError(f"{path} has no config.json; not a dgq checkpoint")
    try:
        cfg = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DGQError(f"{cfg_file} is not valid JSON ({e})") from None
    q = cfg.pop("quantization_config", None)
    if not isinstance(q, dict) or q.get("quant_method") != "dgq":
        raise DGQError(f"{path} is not a dgq checkpoint (config.json has no quantization_config of quant_method dgq)")
    v = q.get("format_version")
    if not isinstance(v, int):
        raise DGQError(f"{path}: quantization_config has no integer format_version")
    if v > FORMAT_VERSION:
        raise DGQError(f"{path} uses dgq format version {v}, newer than this dgq reads ({FORMAT_VERSION}); "
                       f"upgrade dgq")
    if not isinstance(q.get("modules"), dict):
        raise DGQError(f"{path}: quantization_config lists no quantized modules")
    return cfg, q


def model_config(path: Path, cfg: dict):
    """The transformers config of the checkpoint (a supported architecture)."""
    try:
        config = AutoConfig.for_model(**cfg)
    except (ValueError, KeyError) as e:
        raise DGQError(f"{path}: cannot build the model config ({str(e).splitlines()[0]})") from None
    arch_for_config(config)
    return config


def quantized_module(path: Path, model: nn.Module, name: str, spec: dict) -> QuantLinear:
    """The (empty) quantized module that replaces the linear ``name`` according to its ``modules`` entry."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise DGQError(f"{path}: quantized module {name} does not exist in a {model.config.model_type} model") \
            from None
    if not isinstance(old, nn.Linear):
        raise DGQError(f"{path}: quantized module {name} is not a linear in this architecture")
    kind = spec.get("format", "dgq") if isinstance(spec, dict) else None  # written since the peer formats
    if kind not in FORMATS:
        raise DGQError(f"{path}: module {name} has format {kind!r}, which this dgq does not know "
                       f"({', '.join(FORMATS)}); upgrade dgq")
    try:
        new = FORMATS[kind](spec["in_features"], spec["out_features"], spec["group_size"], bias=spec["bias"],
                            act_mode=spec["act_mode"],
                            bias_dtype=old.bias.dtype if old.bias is not None else torch.float32)
    except (KeyError, TypeError, ValueError, DGQError) as e:
        raise DGQError(f"{path}: bad quantization_config entry for {name} ({e})") from None
    new.name = name
    return new


def skeleton(path: Path, config, modules: dict) -> nn.Module:
    """The model with its quantized modules in place, every tensor allocated on the CPU but not yet filled."""
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        for name, spec in modules.items():
            set_submodule(model, name, quantized_module(path, model, name, spec))
    model.to_empty(device="cpu")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # to_empty unties shared parameters
    return model


def read_tensors(path: Path, model: nn.Module) -> None:
    """Fill every parameter and buffer of ``model`` from the checkpoint's safetensors file (shape and dtype
    checked per tensor)."""
    weights = path / WEIGHTS
    if not weights.is_file():
        raise DGQError(f"{path} has no {WEIGHTS}")
    expected = dict(model.named_parameters())
    expected.update(dict(model.named_buffers()))
    try:
        with safe_open(weights, framework="pt") as f:
            names = set(f.keys())
            missing = [n for n in expected if n not in names]
            if missing:
                raise DGQError(f"{path}: tensor {missing[0]} is missing from {WEIGHTS}"
                               + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
            for name, target in expected.items():
                t = f.get_tensor(name)
                if t.shape != target.shape or t.dtype != target.dtype:
                    raise DGQError(f"{path}: tensor {name} has shape {tuple(t.shape)} {t.dtype}, expected "
                                   f"{tuple(target.shape)} {target.dtype}")
                with torch.no_grad():
                    target.copy_(t)
    except DGQError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise DGQError(f"{path}: {WEIGHTS} is unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def load(path: str | os.PathLike, device: str = "cpu", fuse: bool = True) -> nn.Module:
    """Load a dgq checkpoint as a runnable transformers model with quantized modules.

    ``fuse``: run the linears that share an input (q/k/v, gate/up) as one GEMM each (:func:`dgq.fuse_siblings`;
    same outputs, fewer launches, no extra memory).
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DGQError(f"checkpoint not found: {path}")
    cfg, q = read_quantization_config(path)
    config = model_config(path, cfg)
    model = skeleton(path, config, q["modules"])
    read_tensors(path, model)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            m.check(f"{path}: {name}")
    model.dgq_config = q
    model = model.to(device).eval()
    if fuse:
        fuse_siblings(model)
    return model
