"""Checkpoints: a folder with ``config.json`` (the model config plus ``quantization_config``), ``model.safetensors``
(every parameter and buffer, the packed tensors included) and the tokenizer files. Saves are atomic (a temporary
folder beside the target, then a rename). Loading never unpickles and never runs code from the folder.

Integrity (format version 2): safetensors has no checksum, so ``quantization_config.checksums`` records the SHA-256
of ``model.safetensors``, and the safetensors header records the SHA-256 of ``config.json`` as written (without
that checksum entry). ``load`` verifies both by default (``verify=False`` / ``--no-verify`` skips the hashing, for
speed): a flipped bit anywhere, an added or removed tensor, or an edit of config.json is an error, not a model that
runs. Whatever ``verify`` says, every tensor is checked by name, shape and dtype (unknown ones refused), every float
tensor must be finite, and every quantized module's format invariants must hold.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

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
from .fsutil import atomic_folder, check_output_dir
from .fuse import fuse_siblings

WEIGHTS = "model.safetensors"
FORMAT_VERSION = 2  # of the checkpoint layout and its quantization_config; load reads 1 (no checksums) and 2
META_KEY = "dgq"  # the one safetensors metadata key (several keys are written in a random order, run to run)


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def config_sha256(cfg: dict) -> str:
    """Digest of a checkpoint's config.json content, less the weights' checksums (written after the weights)."""
    c = dict(cfg)
    q = c.get("quantization_config")
    if isinstance(q, dict):
        c["quantization_config"] = {k: v for k, v in q.items() if k != "checksums"}
    return hashlib.sha256(json.dumps(c, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


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
    out = check_output_dir(path, overwrite)
    with atomic_folder(out, replace=True) as tmp:
        cfg = model.config.to_dict()
        cfg["quantization_config"] = {k: v for k, v in qcfg.items() if k != "checksums"}
        cfg["quantization_config"]["format_version"] = FORMAT_VERSION
        cfg = json.loads(json.dumps(cfg))  # the digest is of what load will read back (tuples, int keys)
        meta = json.dumps({"format_version": FORMAT_VERSION, "config_sha256": config_sha256(cfg)}, sort_keys=True)
        save_file(_state(model), tmp / WEIGHTS, metadata={META_KEY: meta})
        cfg["quantization_config"]["checksums"] = {WEIGHTS: f"sha256:{file_sha256(tmp / WEIGHTS)}"}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
    model.dgq_config = cfg["quantization_config"]
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
    if not isinstance(cfg, dict):
        raise DGQError(f"{cfg_file} is not a JSON object")
    q = cfg.pop("quantization_config", None)
    if not isinstance(q, dict) or q.get("quant_method") != "dgq":
        raise DGQError(f"{path} is not a dgq checkpoint (config.json has no quantization_config of quant_method dgq)")
    v = q.get("format_version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise DGQError(f"{path}: quantization_config.format_version must be a positive integer, got {v!r}")
    if v > FORMAT_VERSION:
        raise DGQError(f"{path} uses dgq format version {v}, newer than this dgq reads ({FORMAT_VERSION}); "
                       f"upgrade dgq")
    if not isinstance(q.get("modules"), dict) or not q["modules"]:
        raise DGQError(f"{path}: quantization_config lists no quantized modules")
    return cfg, q


def verify_checksums(path: Path, cfg: dict, q: dict) -> None:
    """The weights file and config.json are what ``save`` wrote (checksums; see the module docstring)."""
    if q["format_version"] < 2:
        return  # written before checksums existed
    recorded = q.get("checksums")
    want = recorded.get(WEIGHTS) if isinstance(recorded, dict) else None
    if not isinstance(want, str) or not want.startswith("sha256:"):
        raise DGQError(f"{path}: quantization_config has no checksum of {WEIGHTS}; the checkpoint is incomplete "
                       f"(load with verify=False / --no-verify to skip the check)")
    weights = path / WEIGHTS
    if not weights.is_file():
        raise DGQError(f"{path} has no {WEIGHTS}")
    if file_sha256(weights) != want.split(":", 1)[1]:
        raise DGQError(f"{path}: {WEIGHTS} does not match the checksum recorded at save; the file is corrupt or "
                       f"was modified")
    try:
        with safe_open(weights, framework="pt") as f:
            meta = json.loads((f.metadata() or {}).get(META_KEY, "{}"))
    except Exception as e:  # noqa: BLE001 - safetensors' own error types
        raise DGQError(f"{path}: {WEIGHTS} is unreadable ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("config_sha256") != config_sha256({**cfg, "quantization_config": q}):
        raise DGQError(f"{path}: config.json was modified after the checkpoint was saved (its digest in {WEIGHTS} "
                       f"differs); restore it, or load with verify=False / --no-verify")


def tensor_index(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Name -> (shape, dtype) of every tensor in the weights file, from its header only."""
    weights = path / WEIGHTS
    if not weights.is_file():
        raise DGQError(f"{path} has no {WEIGHTS}")
    try:
        with safe_open(weights, framework="pt") as f:
            return {n: (tuple(f.get_slice(n).get_shape()), f.get_slice(n).get_dtype()) for n in f.keys()}
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for truncated or corrupt files
        raise DGQError(f"{path}: {WEIGHTS} is unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def check_sizes(path: Path, cfg: dict, names: dict) -> None:
    """The raw config.json's sizes agree with the tensors the weights hold, before transformers sees them (a
    config claiming 1e9 layers would otherwise make it build per-layer lists and then the layers)."""
    arch = arch_for_config(SimpleNamespace(model_type=cfg.get("model_type")))
    pat = re.compile(rf"^{re.escape(arch.blocks)}\.(\d+)\.")
    layers = {int(m.group(1)) for n in names if (m := pat.match(n))}
    n_layers = cfg.get("num_hidden_layers", cfg.get("n_layer"))
    if not isinstance(n_layers, int) or isinstance(n_layers, bool) or n_layers < 1:
        raise DGQError(f"{path}: config.json num_hidden_layers must be a positive integer, got {n_layers!r}")
    if len(layers) != n_layers or layers != set(range(len(layers))):
        raise DGQError(f"{path}: config.json says {n_layers} layers but {WEIGHTS} holds {len(layers)}")
    for key in ("hidden_size", "vocab_size", "intermediate_size", "num_attention_heads", "num_key_value_heads"):
        v = cfg.get(key)
        if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
            raise DGQError(f"{path}: config.json {key} must be a positive integer, got {v!r}")


def model_config(path: Path, cfg: dict):
    """The transformers config of the checkpoint (a supported architecture; custom code refused)."""
    if "auto_map" in cfg:
        raise DGQError(f"{path}: config.json maps to custom code (auto_map); dgq never runs code from a model folder")
    if not isinstance(cfg.get("model_type"), str):
        raise DGQError(f"{path}: config.json has no model_type")
    try:
        config = AutoConfig.for_model(**cfg)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for bad config values
        raise DGQError(f"{path}: cannot build the model config ({type(e).__name__}: {_first_line(e)})") from None
    arch_for_config(config)
    return config


def _first_line(e: Exception) -> str:
    return (str(e).strip().splitlines() or [""])[0][:300]


def quantized_module(path: Path, model: nn.Module, name: str, spec: dict) -> QuantLinear:
    """The (empty) quantized module that replaces the linear ``name`` according to its ``modules`` entry."""
    try:
        old = model.get_submodule(name)
    except AttributeError:
        raise DGQError(f"{path}: quantized module {name} does not exist in a {model.config.model_type} model") \
            from None
    if not isinstance(old, nn.Linear):
        raise DGQError(f"{path}: quantized module {name} is not a linear in this architecture")
    if not isinstance(spec, dict):
        raise DGQError(f"{path}: bad quantization_config entry for {name} (not an object)")
    kind = spec.get("format", "dgq")  # written since the peer formats; older checkpoints are all dgq
    if kind not in FORMATS:
        raise DGQError(f"{path}: module {name} has format {kind!r}, which this dgq does not know "
                       f"({', '.join(FORMATS)}); upgrade dgq")
    try:
        new = FORMATS[kind](spec["in_features"], spec["out_features"], spec["group_size"], bias=spec["bias"],
                            act_mode=spec["act_mode"],
                            bias_dtype=old.bias.dtype if old.bias is not None else torch.float32)
    except (KeyError, TypeError, ValueError, DGQError) as e:
        raise DGQError(f"{path}: bad quantization_config entry for {name} ({e})") from None
    if (new.in_features, new.out_features) != (old.in_features, old.out_features) or \
            (new.bias is None) != (old.bias is None):
        raise DGQError(f"{path}: quantization_config entry for {name} does not match the model "
                       f"({old.out_features}x{old.in_features}, bias={old.bias is not None})")
    new.name = name
    return new


def skeleton(path: Path, config, modules: dict) -> nn.Module:
    """The model with its quantized modules in place, every tensor allocated on the CPU but not yet filled."""
    with torch.device("meta"):
        try:
            model = AutoModelForCausalLM.from_config(config)
        except Exception as e:  # noqa: BLE001 - bad sizes or options surface as many exception types
            raise DGQError(f"{path}: cannot build the model from config.json ({type(e).__name__}: "
                           f"{_first_line(e)})") from None
        for name, spec in modules.items():
            set_submodule(model, name, quantized_module(path, model, name, spec))
    model.to_empty(device="cpu")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # to_empty unties shared parameters
    return model


def read_tensors(path: Path, model: nn.Module, names: dict) -> None:
    """Fill every parameter and buffer of ``model`` from the checkpoint's safetensors file: every expected tensor
    present with its shape and dtype, no unknown tensor, every float tensor finite."""
    weights = path / WEIGHTS
    expected = dict(model.named_parameters())
    expected.update(dict(model.named_buffers()))
    missing = [n for n in expected if n not in names]
    if missing:
        raise DGQError(f"{path}: tensor {missing[0]} is missing from {WEIGHTS}"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unknown = sorted(set(names) - set(expected))
    if unknown:
        raise DGQError(f"{path}: {WEIGHTS} holds a tensor this model does not have: {unknown[0]}"
                       + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    try:
        with safe_open(weights, framework="pt") as f:
            for name, target in expected.items():
                t = f.get_tensor(name)
                if t.shape != target.shape or t.dtype != target.dtype:
                    raise DGQError(f"{path}: tensor {name} has shape {tuple(t.shape)} {t.dtype}, expected "
                                   f"{tuple(target.shape)} {target.dtype}")
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise DGQError(f"{path}: tensor {name} holds NaN/Inf; corrupt checkpoint")
                with torch.no_grad():
                    target.copy_(t)
    except DGQError:
        raise
    except Exception as e:  # safetensors raises its own error types for truncated or corrupt files
        raise DGQError(f"{path}: {WEIGHTS} is unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from None


def load(path: str | os.PathLike, device: str = "cpu", fuse: bool = True, verify: bool = True) -> nn.Module:
    """Load a dgq checkpoint as a runnable transformers model with quantized modules.

    ``fuse``: run the linears that share an input (q/k/v, gate/up) as one GEMM each (:func:`dgq.fuse_siblings`;
    same outputs, fewer launches, no extra memory). ``verify``: check the checksums recorded at save (see the
    module docstring; the structural checks always run).
    """
    path = Path(path).expanduser()
    if not path.is_dir():
        raise DGQError(f"checkpoint not found: {path}")
    cfg, q = read_quantization_config(path)
    if verify:
        verify_checksums(path, cfg, q)
    names = tensor_index(path)
    check_sizes(path, cfg, names)
    config = model_config(path, cfg)
    model = skeleton(path, config, q["modules"])
    read_tensors(path, model, names)
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
