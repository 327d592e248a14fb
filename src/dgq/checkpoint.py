"""Checkpoints: a folder with ``config.json`` (the model config plus ``quantization_config``), the weights (every
parameter and buffer, the packed tensors included) as ``model.safetensors`` or, past ``max_shard_size``, as shards
``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json`` (the Hugging Face convention), and the
tokenizer files. Saves are atomic (a temporary folder beside the target, then a rename) and can be written tensor by
tensor (:class:`CheckpointWriter`, for models quantized block by block). Loading reads one shard at a time, never
unpickles and never runs code from the folder.

Integrity (format version 2): safetensors has no checksum, so ``quantization_config.checksums`` records the SHA-256
of every weights file and of ``config.json`` itself (its content without the checksums). ``load`` verifies them by
default (``verify=False`` / ``--no-verify`` skips the hashing, for speed): a flipped bit anywhere, an added or
removed tensor, or an edit of config.json is an error, not a model that runs. Whatever ``verify`` says, every tensor
is checked by name, shape and dtype (unknown ones refused), every float tensor must be finite, and every quantized
module's format invariants must hold.

config.json also carries :data:`HF_GUARD` (see there): transformers without ``import dgq`` refuses the folder;
with it, :mod:`dgq.hf` loads it through ``from_pretrained``; ``load`` leaves it out of the model config.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections import defaultdict
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from . import kvcache
from ._version import __version__
from .arch import arch_for_config, set_submodule
from .errors import DGQError
from .formats import FORMATS, QuantLinear
from .formats.packing import NIBBLE_ORDER
from .fsutil import atomic_folder, check_output_dir
from .fuse import fuse_siblings
from .qconfig import FORMAT_VERSION, check_header

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
DEFAULT_MAX_SHARD = 5 * 10**9  # bytes per shard (transformers' default "5GB")
DEFAULT_STREAM_SHARD = "500MB"  # writing while reading: the shard being assembled is held in memory, keep it small
# What stops plain transformers (no `import dgq`) from loading a checkpoint with random quantized layers: config.json
# names this message as the attention implementation, which transformers refuses when it builds the model
# ("Specified `attn_implementation="dgq checkpoint: ..."` is not supported"). transformers 5.x reads the key
# `attn_implementation`, 4.57 the attribute behind it (`_attn_implementation_internal`); each ignores the other's key.
# dgq's quantizer (dgq.hf) resets them before the model is built; dgq.load drops them (:func:`without_guard`).
HF_GUARD = "dgq checkpoint: run `import dgq` before from_pretrained (pip install dgq), or load it with dgq.load"
HF_GUARD_KEYS = ("attn_implementation", "_attn_implementation_internal")
# The first guard, in checkpoints written before these (dgq 0.x up to this change): a weights file name transformers
# refuses. 4.57 refuses it even after `import dgq` (it reads it before any quantizer hook), so it is no longer written.
HF_LEGACY_GUARD_KEY = "transformers_weights"
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)\s*$", re.IGNORECASE)


def parse_size(size) -> int:
    """``5GB``, ``500MB``, ``2GiB`` or a number of bytes."""
    if isinstance(size, int) and not isinstance(size, bool):
        n = size
    else:
        m = _SIZE.match(str(size))
        if not m:
            raise DGQError(f"cannot read the size {size!r}; write it like 5GB, 500MB or 2GiB")
        unit = m.group(2).lower().rstrip("b")
        base = 1024 if unit.endswith("i") else 1000
        n = int(float(m.group(1)) * (base ** ("kmgt".index(unit[0]) + 1) if unit else 1))
    if n < 1:
        raise DGQError(f"the shard size must be positive, got {size!r}")
    return n


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            h.update(chunk)
    return h.hexdigest()


def config_sha256(cfg: dict) -> str:
    """Digest of a checkpoint's config.json content, less the checksums entry (which holds this digest)."""
    c = dict(cfg)
    q = c.get("quantization_config")
    if isinstance(q, dict):
        c["quantization_config"] = {k: v for k, v in q.items() if k != "checksums"}
    return hashlib.sha256(json.dumps(c, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def build_quantization_config(model: nn.Module, config) -> dict:
    """The ``quantization_config`` of a model quantized with the resolved ``config``: the recipe and every
    quantized module with its format, sizes, group size and activation mode."""
    return quantization_config_of(config, {name: m for name, m in model.named_modules() if isinstance(m, QuantLinear)})


def module_entry(m: QuantLinear) -> dict:
    return {"format": m.format, "in_features": m.in_features, "out_features": m.out_features,
            "group_size": m.group_size, "act_mode": m.act_mode, "bias": m.bias is not None}


def quantization_config_of(config, modules: dict) -> dict:
    """``modules``: full name -> quantized module or its :func:`module_entry`."""
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
        "modules": {n: m if isinstance(m, dict) else module_entry(m) for n, m in modules.items()},
    }


# -- save --------------------------------------------------------------------------------------------------------
def state_of(module: nn.Module, prefix: str = "", exclude: str | None = None) -> dict[str, torch.Tensor]:
    """Parameters (tied ones once) and all buffers, non-persistent ones too (e.g. rotary tables), on the CPU
    (names starting with ``exclude`` left out)."""
    state = {prefix + n: p.detach() for n, p in module.named_parameters()}
    state.update({prefix + n: b.detach() for n, b in module.named_buffers()})
    return {n: _own(t.contiguous().cpu()) for n, t in state.items() if exclude is None or not n.startswith(exclude)}


def _own(t: torch.Tensor) -> torch.Tensor:
    """``t`` with storage of its own: fused siblings' buffers are slices of one tensor (dgq.fuse), and
    safetensors refuses tensors that share memory."""
    return t if t.untyped_storage().nbytes() == t.numel() * t.element_size() else t.clone()


class CheckpointWriter:
    """Writes a checkpoint into a temporary folder as tensors come (``add``), in shards of at most
    ``max_shard_size`` bytes, then ``finish`` writes config.json with the checksums, the generation config and the
    tokenizer. Use :func:`writing`, which renames the folder into place only when everything is written."""

    def __init__(self, folder: Path, max_shard_size=DEFAULT_MAX_SHARD):
        self.folder = folder
        self.max_bytes = parse_size(max_shard_size)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[list[str]] = []  # tensor names per written shard
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, t in tensors.items():
            if name in self.pending or any(name in s for s in self.shards):
                raise ValueError(f"tensor {name} written twice")
            t = _own(t.detach().contiguous().cpu())
            size = t.numel() * t.element_size()
            if self.pending and self.pending_bytes + size > self.max_bytes:
                self._flush()
            self.pending[name] = t
            self.pending_bytes += size
            self.total += size

    def flush(self) -> None:
        """End the current shard now (the writer holds its tensors until then)."""
        if self.pending:
            self._flush()

    def _flush(self) -> None:
        save_file(self.pending, self.folder / f".shard-{len(self.shards) + 1:05d}", metadata={"format": "pt"})
        self.shards.append(sorted(self.pending))
        self.pending, self.pending_bytes = {}, 0

    def finish_weights(self) -> list[str]:
        """Write what is pending, name the shards (``model.safetensors`` or ``model-0000i-of-0000n.safetensors``
        with the index) and return the file names. :meth:`finish` calls it; a writer of another format (dgq.export)
        writes its own config.json after it."""
        if self.pending or not self.shards:
            self._flush()
        n = len(self.shards)
        names = [WEIGHTS] if n == 1 else [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
        for i, name in enumerate(names, 1):
            os.replace(self.folder / f".shard-{i:05d}", self.folder / name)
        if n > 1:
            weight_map = {t: name for name, shard in zip(names, self.shards, strict=True) for t in shard}
            index = {"metadata": {"total_size": self.total}, "weight_map": dict(sorted(weight_map.items()))}
            (self.folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
        return names

    def finish(self, model_config: dict, qcfg: dict, generation_config=None, tokenizer=None) -> dict:
        """Name the shards, write the index (several shards) and config.json; returns the quantization_config
        written (with its checksums)."""
        names = self.finish_weights()
        cfg = write_config(self.folder, model_config, qcfg, names)
        if generation_config is not None:
            generation_config.save_pretrained(self.folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(self.folder)
        return cfg["quantization_config"]


def write_config(folder: Path, model_config: dict, qcfg: dict, weights: list[str]) -> dict:
    """Write ``folder/config.json``: the model config, the guard that stops plain transformers (:data:`HF_GUARD`)
    and the quantization_config with the checksums of itself and of the ``weights`` files; returns what it wrote."""
    cfg = without_guard(model_config)
    cfg.update(dict.fromkeys(HF_GUARD_KEYS, HF_GUARD))
    cfg["quantization_config"] = {k: v for k, v in qcfg.items() if k != "checksums"}
    cfg["quantization_config"]["format_version"] = FORMAT_VERSION
    cfg = json.loads(json.dumps(cfg))  # the digest is of what load reads back (tuples become lists...)
    sums = {"config.json": f"sha256:{config_sha256(cfg)}"}
    sums.update({name: f"sha256:{file_sha256(folder / name)}" for name in weights})
    cfg["quantization_config"]["checksums"] = sums
    (folder / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    return cfg


def is_guard(value) -> bool:
    return isinstance(value, str) and value.startswith("dgq checkpoint")


def without_guard(cfg: dict) -> dict:
    """config.json's content without the guard (:data:`HF_GUARD` under its keys, the legacy one included)."""
    return {k: v for k, v in cfg.items() if not (k in (*HF_GUARD_KEYS, HF_LEGACY_GUARD_KEY) and is_guard(v))}


@contextmanager
def writing(path, overwrite: bool = False, max_shard_size=DEFAULT_MAX_SHARD):
    """A :class:`CheckpointWriter` into a temporary folder that becomes ``path`` when the block ends (after
    ``finish``); an error or interruption leaves nothing at ``path``. The output is checked first."""
    out = check_output_dir(path, overwrite)
    with atomic_folder(out, replace=True) as tmp:
        w = CheckpointWriter(tmp, max_shard_size)
        yield w
        if not (tmp / "config.json").is_file():
            raise RuntimeError("CheckpointWriter.finish was not called")


def save(model: nn.Module, path: str | os.PathLike, tokenizer=None, overwrite: bool = False,
         max_shard_size=DEFAULT_MAX_SHARD) -> Path:
    """Write a quantized model (and its tokenizer) to ``path`` atomically."""
    qcfg = getattr(model, "dgq_config", None)
    if qcfg is None:
        raise DGQError("this model is not quantized by dgq (run dgq.quantize first)")
    with writing(path, overwrite, max_shard_size) as w:
        w.add(state_of(model))
        model.dgq_config = w.finish(model.config.to_dict(), qcfg, getattr(model, "generation_config", None),
                                    tokenizer)
    return Path(path).expanduser()


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
    check_header(q, str(path))
    return cfg, q


def weight_files(path: Path) -> dict[str, str] | None:
    """Tensor name -> file for a sharded checkpoint (from its index), None for a single ``model.safetensors``."""
    index = path / INDEX
    if not index.is_file():
        return None
    try:
        doc = json.loads(index.read_text())
        wm = doc["weight_map"]
        if not isinstance(wm, dict) or not all(isinstance(f, str) and "/" not in f and f.endswith(".safetensors")
                                              for f in wm.values()):
            raise ValueError("bad weight_map")
    except (OSError, ValueError, KeyError, TypeError, UnicodeDecodeError):
        raise DGQError(f"{path}: {INDEX} is unreadable or not a safetensors index") from None
    return wm


def verify_checksums(path: Path, cfg: dict, q: dict) -> None:
    """config.json and every weights file are what was saved (checksums; see the module docstring)."""
    if q["format_version"] < 2:
        return  # written before checksums existed
    sums = q.get("checksums")
    if not isinstance(sums, dict) or not all(isinstance(v, str) and v.startswith("sha256:") for v in sums.values()):
        raise DGQError(f"{path}: quantization_config has no checksums; the checkpoint is incomplete (load with "
                       f"verify=False / --no-verify to skip the check)")
    if sums.get("config.json") != f"sha256:{config_sha256({**cfg, 'quantization_config': q})}":
        raise DGQError(f"{path}: config.json was modified after the checkpoint was saved (its checksum differs); "
                       f"restore it, or load with verify=False / --no-verify")
    wm = weight_files(path)
    files = sorted(set(wm.values())) if wm is not None else [WEIGHTS]
    for f in files:
        if f not in sums:
            raise DGQError(f"{path}: quantization_config has no checksum of {f}; the checkpoint is incomplete")
        if not (path / f).is_file():
            raise DGQError(f"{path}: {f} is missing")
        if file_sha256(path / f) != sums[f].split(":", 1)[1]:
            raise DGQError(f"{path}: {f} does not match the checksum recorded at save; the file is corrupt or was "
                           f"modified")


def tensor_index(path: Path) -> dict[str, tuple[str, tuple[int, ...], str]]:
    """Name -> (file, shape, dtype) of every tensor of the checkpoint, from the files' headers only."""
    wm = weight_files(path)
    files = sorted(set(wm.values())) if wm is not None else [WEIGHTS]
    out: dict[str, tuple[str, tuple[int, ...], str]] = {}
    for fname in files:
        f_path = path / fname
        if not f_path.is_file():
            raise DGQError(f"{path} has no {fname}")
        try:
            with safe_open(f_path, framework="pt") as f:
                for n in f.keys():
                    sl = f.get_slice(n)
                    out[n] = (fname, tuple(sl.get_shape()), sl.get_dtype())
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for truncated files
            raise DGQError(f"{path}: {fname} is unreadable ({type(e).__name__}: {_first_line(e)})") from None
        if wm is not None and any(wm.get(n) != fname for n, (file, _, _) in out.items() if file == fname):
            raise DGQError(f"{path}: {fname} holds tensors its index places elsewhere")
    if wm is not None and set(wm) != set(out):
        raise DGQError(f"{path}: {INDEX} and the shards list different tensors")
    return out


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
        raise DGQError(f"{path}: config.json says {n_layers} layers but the weights hold {len(layers)}")
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
        config = AutoConfig.for_model(**without_guard(cfg))
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
    if not isinstance(kind, str) or kind not in FORMATS:
        raise DGQError(f"{path}: module {name} has format {kind!r}, which this dgq does not know "
                       f"({', '.join(FORMATS)}); upgrade dgq")
    types = {"in_features": int, "out_features": int, "group_size": int, "bias": bool, "act_mode": str}
    for key, typ in types.items():
        v = spec.get(key)
        if not isinstance(v, typ) or (typ is int and (isinstance(v, bool) or v < 1)):
            raise DGQError(f"{path}: bad quantization_config entry for {name} ({key}={v!r})")
    try:
        new = FORMATS[kind](spec["in_features"], spec["out_features"], spec["group_size"], bias=spec["bias"],
                            act_mode=spec["act_mode"],
                            bias_dtype=old.bias.dtype if old.bias is not None else torch.float32)
    except (KeyError, TypeError, ValueError, RuntimeError, DGQError) as e:
        raise DGQError(f"{path}: bad quantization_config entry for {name} ({_first_line(e)})") from None
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


# transformers 5.x keeps a copy of each rotary table (``original_inv_freq``, a non-persistent buffer) that 4.x does
# not have, and checkpoints hold non-persistent buffers: a checkpoint written under either loads under the other
# (the copy is ``inv_freq`` as transformers builds it; a copy the model does not have is not read)
VERSION_BUFFERS = {"original_inv_freq": "inv_freq"}


def version_buffers(model: nn.Module, names) -> tuple[dict, set]:
    """``(fill, ignore)``: the model's version-specific buffers the checkpoint lacks (name -> the checkpoint
    tensor to fill it from) and the checkpoint's version-specific buffers the model lacks."""
    buffers = dict(model.named_buffers(remove_duplicate=False))
    persistent = set(model.state_dict())
    fill, ignore = {}, set()
    for n in buffers:
        head, _, leaf = n.rpartition(".")
        src = f"{head}.{VERSION_BUFFERS.get(leaf)}"
        if leaf in VERSION_BUFFERS and n not in names and n not in persistent and src in names:
            fill[n] = src
    for n in names:
        head, _, leaf = n.rpartition(".")
        if leaf in VERSION_BUFFERS and n not in buffers and f"{head}.{VERSION_BUFFERS[leaf]}" in buffers:
            ignore.add(n)
    return fill, ignore


def read_tensors(path: Path, model: nn.Module, names: dict) -> None:
    """Fill every parameter and buffer of ``model`` from the checkpoint's weights, one file at a time: every
    expected tensor present with its shape and dtype, no unknown tensor, every float tensor finite
    (:data:`VERSION_BUFFERS` aside)."""
    expected = dict(model.named_parameters())
    expected.update(dict(model.named_buffers()))
    fill, ignore = version_buffers(model, names)
    names = {**{n: v for n, v in names.items() if n not in ignore}, **{n: names[src] for n, src in fill.items()}}
    source = {n: fill.get(n, n) for n in expected}
    missing = [n for n in expected if n not in names]
    if missing:
        raise DGQError(f"{path}: tensor {missing[0]} is missing from the weights"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unknown = sorted(set(names) - set(expected))
    if unknown:
        raise DGQError(f"{path}: the weights hold a tensor this model does not have: {unknown[0]}"
                       + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    by_file = defaultdict(list)
    for name in expected:
        by_file[names[name][0]].append(name)
    for fname, tensor_names in sorted(by_file.items()):
        try:
            with safe_open(path / fname, framework="pt") as f:
                for name in tensor_names:
                    target, t = expected[name], f.get_tensor(source[name])
                    if t.shape != target.shape or t.dtype != target.dtype:
                        raise DGQError(f"{path}: tensor {name} has shape {tuple(t.shape)} {t.dtype}, expected "
                                       f"{tuple(target.shape)} {target.dtype}")
                    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                        raise DGQError(f"{path}: tensor {name} holds NaN/Inf; corrupt checkpoint")
                    with torch.no_grad():
                        target.copy_(t)
        except DGQError:
            raise
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for truncated files
            raise DGQError(f"{path}: {fname} is unreadable ({type(e).__name__}: {_first_line(e)})") from None


def load(path: str | os.PathLike, device: str = "cpu", fuse: bool = True, verify: bool = True,
         cache_weights: bool = True) -> nn.Module:
    """Load a dgq checkpoint as a runnable transformers model with quantized modules.

    ``fuse``: run the linears that share an input (q/k/v, gate/up) as one GEMM each (:func:`dgq.fuse_siblings`;
    same outputs, fewer launches, no extra memory). ``verify``: check the checksums recorded at save (see the
    module docstring; the structural checks always run). ``cache_weights``: let the kernels keep expanded weights
    between calls (faster; on the CPU 1-4 bytes per weight, see :mod:`dgq.kernels.cpu`) or expand them per call.
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
    kv = q.get("kv_cache")
    if kv is not None:
        kvcache.check_layout(kv, config, str(path))
    model = skeleton(path, config, q["modules"])
    read_tensors(path, model, names)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    for name, m in model.named_modules():
        if isinstance(m, QuantLinear):
            m.check(f"{path}: {name}")
            m.cache_weights = cache_weights
    model.dgq_config = q
    model = model.to(device).eval()
    if fuse:
        fuse_siblings(model)
    if kv is not None:
        kvcache.enable(model, kv["mode"], kv)
    return model
