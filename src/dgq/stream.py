"""Quantize a model bigger than memory: the skeleton lives on the ``meta`` device, and each decoder block's
weights are read from disk (safetensors, one tensor at a time), put on the chosen device in the chosen dtype,
calibrated and quantized, written to the output checkpoint's current shard and released before the next block —
the reference GPTQ script's ``layers[i].to(dev)``, llm-compressor's sequential onloading. The source is a Hugging
Face folder; a ``.gguf`` file or an alias is first converted, once and one tensor at a time (never the whole model
in memory), into a cached float32 folder (:func:`dgq.models.model_folder`, :mod:`dgq.gguf_folder`), which is then
read like any other.

Peak host memory (the CPU case; on a GPU the block and the activations live on the device instead):
    the embeddings in the chosen dtype until block 0's inputs are captured (the non-block tensors are written
    first; lm_head and the final norm are released before calibrating, the embeddings after capturing)
  + one block in the chosen dtype, plus the quantizer's float32 temporaries for its largest linear (a few copies)
  + the calibration activations: windows x seqlen x hidden x 4 bytes, about three copies (the block's inputs, its
    float outputs and its quantized outputs; dgq methods only; memory-mapped from disk beyond ``act_budget``) and
    the sampled statistics
  + the output shard being assembled (at most ``max_shard_size``)
  + the Python/torch baseline (~0.5 GB).
``benchmarks/big_model.py`` measures it on a Llama-2-7B-shaped model. Blocks are processed in order, so with the
same inputs the result is bitwise the in-memory path's (``dgq.quantize`` then ``dgq.save``).
"""

from __future__ import annotations

import ctypes
import json
import logging
import sys
import time
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from safetensors import safe_open
from torch import nn
from tqdm.auto import tqdm
from transformers import AutoConfig, AutoModelForCausalLM

from . import kernels, methods
from .api import activation_store, check_calibration, kv_check, kv_entry, plan
from .arch import arch_for_config, get_blocks, set_submodule
from .calib import calibrate, capture_block_inputs, collect_stats, make_layers, run_block
from .checkpoint import DEFAULT_STREAM_SHARD, DGQError, module_entry, quantization_config_of, state_of, writing
from .config import DGQConfig
from .errors import check_finite
from .formats import QuantLinear
from .fsutil import check_disk
from .models import check_model_folder, load_tokenizer, model_folder, resolve_device, resolve_dtype
from .rotation import rotate_residual_globals

log = logging.getLogger("dgq")


def has_tokenizer(path: Path) -> bool:
    """Whether the folder ships tokenizer files (a weights-only folder is quantized without one)."""
    return any((path / f).exists() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model"))


class FolderSource:
    """The tensors of a Hugging Face model folder, read one at a time from its safetensors files."""

    def __init__(self, path: Path):
        self.path = path
        self.files = check_model_folder(path)  # custom code, pickles, other quantizations, sizes: refused here
        self.where: dict[str, Path] = {}
        for f in self.files:
            with safe_open(f, framework="pt") as st:
                self.where.update({n: f for n in st.keys()})
        raw = json.loads((path / "config.json").read_text())
        self.config_dtype = raw.get("dtype") or raw.get("torch_dtype")

    def get(self, name: str) -> torch.Tensor:
        f = self.where.get(name)
        if f is None:
            raise DGQError(f"{self.path}: tensor {name} is missing from the weights")
        with safe_open(f, framework="pt") as st:
            return st.get_tensor(name)


def release_free_memory() -> None:
    """Give freed heap memory back to the OS (glibc keeps it otherwise: on a 7B model, ~200 MB more resident
    memory per finished block, all of it free); a no-op where there is no glibc."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


try:
    _LIBC = ctypes.CDLL("libc.so.6") if sys.platform.startswith("linux") else None
except OSError:  # pragma: no cover - musl and others
    _LIBC = None


def device_free_bytes(device: torch.device) -> int:
    return torch.cuda.mem_get_info(device)[0]


class BlockIO:
    """Loads block ``i`` from the source before its turn and writes and releases it after (see
    :func:`dgq.calib.calibrate`)."""

    def __init__(self, model: nn.Module, source: FolderSource, writer, device: torch.device, dtype: torch.dtype,
                 targets: dict | None = None):
        self.model, self.source, self.writer, self.device, self.dtype = model, source, writer, device, dtype
        self.targets = targets or {}  # the float linears the plan holds: released with their block
        self.arch = arch_for_config(model.config)
        self.blocks = get_blocks(model, self.arch)
        self.modules: dict[str, dict] = {}  # quantized module entries, in block order
        self.peak_block_bytes = 0

    def prefix(self, i: int) -> str:
        return f"{self.arch.blocks}.{i}."

    def release_rest(self, keep_embeddings: bool) -> None:
        """Put the non-block parameters (already written) on the meta device: ``lm_head`` and the final norm before
        calibration starts (capturing stops at the last block), the embeddings too once block 0's inputs are
        captured. Tied weights are released under both names."""
        blocks_prefix = self.arch.blocks + "."
        embed = {id(self.model.get_input_embeddings().weight)}
        for name, p in list(self.model.named_parameters(remove_duplicate=False)):
            if not name.startswith(blocks_prefix) and not p.is_meta and not (keep_embeddings and id(p) in embed):
                set_module_tensor_to_device(self.model, name, "meta")

    def load(self, i: int) -> None:
        if i > 0:
            self.release_rest(keep_embeddings=False)
        prefix = self.prefix(i)
        if self.device.type == "cuda":
            itemsize = torch.empty((), dtype=self.dtype).element_size()
            need = sum(t.numel() for t in self.blocks[i].parameters()) * itemsize
            free = device_free_bytes(self.device)
            if need > free:
                raise DGQError(f"block {i} needs {need / 2**30:.2f} GiB on {self.device} but only {free / 2**30:.2f} "
                               f"GiB are free; use --device cpu (or a smaller --dtype)")
        nbytes = 0
        for name, t in [*self.blocks[i].named_parameters(), *self.blocks[i].named_buffers()]:
            full = prefix + name
            value = self.source.get(full)
            if tuple(value.shape) != tuple(t.shape):
                raise DGQError(f"{self.source.path}: tensor {full} has shape {tuple(value.shape)}, the config "
                               f"expects {tuple(t.shape)}")
            if value.is_floating_point():
                check_finite(value, f"{full}")
                value = value.to(self.dtype)
            set_module_tensor_to_device(self.model, full, self.device, value=value)
            nbytes += value.numel() * value.element_size()
        self.peak_block_bytes = max(self.peak_block_bytes, nbytes)

    def done(self, i: int) -> None:
        prefix = self.prefix(i)
        block = self.blocks[i]
        for name, m in block.named_modules():
            if isinstance(m, QuantLinear):
                self.modules[prefix + name] = module_entry(m)
        self.writer.add(state_of(block, prefix))
        block.to("meta")  # release the block's memory, and that of the float linears it no longer holds
        for name, t in self.targets.items():
            if name.startswith(prefix):
                t.module.to("meta")
        release_free_memory()


def skeleton(source: FolderSource, dtype: torch.dtype, device: torch.device) -> nn.Module:
    """The model with every decoder block on the meta device and the rest (embeddings, final norm, lm_head)
    loaded from the source on ``device``; buffers computed at construction (rotary tables) stay real."""
    try:
        config = AutoConfig.from_pretrained(source.path, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - transformers raises many types for bad config values
        raise DGQError(f"cannot read the model config in {source.path}: {type(e).__name__}: {e}") from None
    arch = arch_for_config(config)
    try:
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(config, dtype=dtype, trust_remote_code=False)
    except Exception as e:  # noqa: BLE001 - bad sizes or options surface as many exception types
        raise DGQError(f"cannot build the model of {source.path}: {type(e).__name__}: {e}") from None
    blocks_prefix = arch.blocks + "."
    expected = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    expected |= {n for n, _ in model.named_buffers() if n in source.where}
    missing = sorted(n for n in expected if n not in source.where
                     and not (n == "lm_head.weight" and getattr(config, "tie_word_embeddings", False)))
    unexpected = sorted(n for n in source.where if n not in expected)
    if missing or unexpected:
        kind, names = ("missing keys", missing) if missing else ("unexpected keys", unexpected)
        raise DGQError(f"{source.path}: the weights do not match the config ({kind}: {names[0]}"
                       + (f" and {len(names) - 1} more" if len(names) > 1 else "") + ")")
    tied = getattr(config, "tie_word_embeddings", False)
    for name, _ in list(model.named_parameters()):
        if not name.startswith(blocks_prefix):
            if tied and name == "lm_head.weight" and name not in source.where:
                continue  # the skeleton is not tied yet; tie_weights below shares the embeddings
            value = source.get(name)
            check_finite(value, name)
            set_module_tensor_to_device(model, name, device, value=value.to(dtype))
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    for name, b in list(model.named_buffers()):
        if not name.startswith(blocks_prefix):
            set_module_tensor_to_device(model, name, device, value=b)
    return model.eval()


def quantize_to(model_ref: str, out, config: DGQConfig | None = None, calib: torch.Tensor | None = None,
                device="cpu", dtype="auto", max_shard_size=DEFAULT_STREAM_SHARD, overwrite: bool = False,
                progress: bool = True, act_budget: float | None = None, act_dir=None) -> dict:
    """Quantize the Hugging Face folder (or alias) ``model_ref`` block by block into the checkpoint ``out``,
    holding one decoder block at a time (see the module docstring). Returns the written quantization_config.
    ``act_budget`` / ``act_dir``: as for :func:`dgq.quantize` (calibration activations memory-mapped from disk
    beyond a budget in GB)."""
    dev = resolve_device(device)
    source = FolderSource(model_folder(model_ref))
    dt = resolve_dtype(dtype, source.config_dtype)
    config = methods.resolve(config or DGQConfig())
    method = methods.get(config.method)
    auto = config.group_size is None
    store = activation_store(act_budget, act_dir)
    model = skeleton(source, dt, dev)
    config, targets = plan(model, config)
    check_calibration(method, config, calib)
    observer = kv_check(model.config, config)
    arch = arch_for_config(model.config)
    if method.calibrated and config.rotate_residual:  # blocks are rotated at their turn (calibrate)
        rotate_residual_globals(model, arch, config.seed)
    check_disk(out, estimate_bytes(model, targets, config, dt))
    t0 = time.perf_counter()
    with torch.no_grad(), writing(out, overwrite, max_shard_size) as writer:
        io = BlockIO(model, source, writer, dev, dt, targets)
        writer.add(state_of(model, exclude=arch.blocks + "."))  # embeddings, final norm, lm_head
        writer.flush()  # a shard of their own: the writer lets go of them
        io.release_rest(keep_embeddings=True)
        release_free_memory()
        calibration = None
        if method.calibrated:
            calibration = calibrate(model, arch, targets, calib, config, method, progress=progress, blocks_io=io,
                                    device=dev, kv_observer=observer, store=store)
        else:
            _data_free(model, arch, targets, calib, config, method, io, dev, progress, observer)
        qcfg = quantization_config_of(config, io.modules)
        qcfg.update(kv_entry(model.config, config, observer))
        qcfg["group_size_auto"] = auto
        qcfg["streamed"] = {"device": str(dev), "dtype": str(dt).replace("torch.", ""),
                            "seconds": round(time.perf_counter() - t0, 2),
                            "largest_block_bytes": io.peak_block_bytes}
        if calibration is not None:
            qcfg["calibration"] = {"windows": int(calib.shape[0]), "seqlen": int(calib.shape[1]), **calibration}
        tok = load_tokenizer(source.path) if has_tokenizer(source.path) else None
        result = writer.finish(model.config.to_dict(), qcfg, getattr(model, "generation_config", None), tok)
    slow = kernels.slow_paths(_LayerInfo(e) for e in io.modules.values())
    for reason in slow:
        log.warning("dgq: %s", reason)
    return result


def estimate_bytes(model: nn.Module, targets: dict, config, dtype: torch.dtype) -> int:
    """Bytes of the checkpoint ``quantize_to`` will write: each target in its format (from an empty module of the
    same shape, on the meta device), every other tensor in ``dtype``."""
    quantized = 0
    for t in targets.values():
        with torch.device("meta"):
            m = config.layer_class(t.module.in_features, t.module.out_features, t.group_size,
                                   bias=t.module.bias is not None, act_mode=config.act_mode)
        quantized += sum(b.numel() * b.element_size() for b in m.buffers())
    skip = {id(p) for t in targets.values() for p in t.module.parameters()}
    rest = sum(p.numel() for p in model.parameters() if id(p) not in skip) * torch.empty((), dtype=dtype).element_size()
    return quantized + rest


class _LayerInfo:
    """A module entry seen as a layer by :func:`dgq.kernels.slow_paths`."""

    def __init__(self, e: dict):
        self.format, self.act_mode = e["format"], e["act_mode"]
        self.in_features, self.group_size = e["in_features"], e["group_size"]


def _data_free(model, arch, targets, calib, config, method, io: BlockIO, dev, progress, observer=None) -> None:
    """Data-free methods, block by block: static activation scales (if asked) from the float model's block
    inputs, then each linear quantized on its own; static KV scales (if asked) from each quantized block run on
    the quantized model's block inputs (what one forward of the quantized model gives)."""
    blocks = get_blocks(model, arch)
    hidden = kwargs = q_hidden = None
    if config.act_mode == "static" or observer is not None:
        io.load(0)
        hidden, kwargs = capture_block_inputs(model, arch, calib, dev, loaded=1)
        q_hidden = hidden
        if config.act_mode != "static":
            hidden = None
    for i in tqdm(range(len(blocks)), desc="quantize", disable=not progress):
        if i > 0 or q_hidden is None:
            io.load(i)
        prefix = io.prefix(i)
        names = [n[len(prefix):] for n in targets if n.startswith(prefix)]
        stats = {}
        if hidden is not None:  # the float pass gives the next block's inputs too
            stats, hidden = collect_stats(blocks[i], names, hidden, kwargs[i], 1, config.seed, i, dev)
        for n in names:
            t = targets[prefix + n]
            layer = make_layers(method, t.module, prefix + n, t.group_size, stats.get(n), config)[0]
            set_submodule(blocks[i], n, layer)
        if observer is not None:
            q_hidden = run_block(blocks[i], q_hidden, kwargs[i], dev, observer)
        io.done(i)
