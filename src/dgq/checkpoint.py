"""Checkpoints: a folder with ``config.json`` (the model config plus ``quantization_config``), ``model.safetensors``
(every parameter and buffer, the packed DGQ tensors included) and the tokenizer files. Saves are atomic: everything
is written to a temporary folder beside the target, then renamed. Loading never unpickles.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from . import format as fmt
from .errors import DGQError
from .nn import FORMATS, DGQLinear, W4A16Linear

WEIGHTS = "model.safetensors"


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
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        cfg = model.config.to_dict()
        cfg["quantization_config"] = qcfg
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
        gen = getattr(model, "generation_config", None)
        if gen is not None:
            gen.save_pretrained(tmp)
        # one metadata key: safetensors orders a multi-key metadata map differently from run to run, which
        # would make identical checkpoints differ in their header bytes
        save_file(_state(model), tmp / WEIGHTS, metadata={"format": f"dgq-{fmt.FORMAT_VERSION}"})
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        if out.exists():
            old = out.with_name(f".{out.name}.old-{os.getpid()}")
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def read_quantization_config(path: Path) -> tuple[dict, dict]:
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
    if v > fmt.FORMAT_VERSION:
        raise DGQError(f"{path} uses dgq format version {v}, newer than this dgq reads ({fmt.FORMAT_VERSION}); "
                       f"upgrade dgq")
    if not isinstance(q.get("modules"), dict):
        raise DGQError(f"{path}: quantization_config lists no quantized modules")
    return cfg, q


def load(path: str | os.PathLike, device: str = "cpu", fuse: bool = True) -> nn.Module:
    """Load a dgq checkpoint as a runnable transformers model with ``DGQLinear`` modules.

    ``fuse``: run the linears that share an input (q/k/v, gate/up) as one GEMM each (:func:`dgq.fuse_siblings`;
    same outputs, fewer launches, no extra memory).
    """
    from transformers import AutoConfig, AutoModelForCausalLM

    path = Path(path).expanduser()
    if not path.is_dir():
        raise DGQError(f"checkpoint not found: {path}")
    cfg, q = read_quantization_config(path)
    try:
        config = AutoConfig.for_model(**cfg)
    except (ValueError, KeyError) as e:
        raise DGQError(f"{path}: cannot build the model config ({str(e).splitlines()[0]})") from None
    from .arch import arch_for_config

    arch_for_config(config)
    weights = path / WEIGHTS
    if not weights.is_file():
        raise DGQError(f"{path} has no {WEIGHTS}")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
        for name, spec in q["modules"].items():
            try:
                parent, _, child = name.rpartition(".")
                old = model.get_submodule(name)
            except AttributeError:
                raise DGQError(f"{path}: quantized module {name} does not exist in a {config.model_type} model") \
                    from None
            if not isinstance(old, nn.Linear):
                raise DGQError(f"{path}: quantized module {name} is not a linear in this architecture")
            kind = spec.get("format", "dgq")  # written since the peer formats; older checkpoints are all dgq
            if kind not in FORMATS:
                raise DGQError(f"{path}: module {name} has format {kind!r}, which this dgq does not know "
                               f"({', '.join(FORMATS)}); upgrade dgq")
            try:
                new = FORMATS[kind](spec["in_features"], spec["out_features"], spec["group_size"],
                                    bias=spec["bias"], act_mode=spec["act_mode"],
                                    bias_dtype=old.bias.dtype if old.bias is not None else torch.float32)
            except (KeyError, TypeError, ValueError, DGQError) as e:
                raise DGQError(f"{path}: bad quantization_config entry for {name} ({e})") from None
            new.name = name
            setattr(model.get_submodule(parent), child, new)
    model.to_empty(device="cpu")
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()  # to_empty unties shared parameters
    expected = _state_shapes(model)
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
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    for name, m in model.named_modules():
        if isinstance(m, DGQLinear):
            _check_format(m, path, name)
        elif isinstance(m, W4A16Linear) and int(m.zeros.max()) > fmt.CODE_MAX:
            raise DGQError(f"{path}: {name} has zero points outside 0..15; corrupt checkpoint")
    model.dgq_config = q
    model = model.to(device).eval()
    if fuse:
        from .fuse import fuse_siblings

        fuse_siblings(model)
    return model


def _state_shapes(model: nn.Module) -> dict[str, torch.Tensor]:
    state = dict(model.named_parameters())
    state.update(dict(model.named_buffers()))
    return state


def _check_format(m: DGQLinear, path: Path, name: str) -> None:
    if int(m.scales.min()) < 1 or int(m.zeros.min()) < 0 or int(m.zeros.max()) > fmt.CODE_MAX:
        raise DGQError(f"{path}: {name} has integer scales < 1 or zero points outside 0..15; corrupt checkpoint")
    lo, hi = fmt.safe_code_bounds(m.zeros, m.scales)
    q = fmt.unpack_uint4(m.qweight).view(m.out_features, -1, m.group_size).to(torch.int32)
    if bool((q < lo[..., None]).any() | (q > hi[..., None]).any()):
        raise DGQError(f"{path}: {name} has codes outside the int8-safe range; corrupt checkpoint")
