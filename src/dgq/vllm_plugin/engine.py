"""The vLLM side of the plugin: the quantization config ``dgq`` and its linear method (imports vLLM; registered by
:func:`dgq.vllm_plugin.register`).

- :class:`DGQVllmConfig` reads config.json's ``quantization_config`` (``quant_method: "dgq"``), gives each vLLM
  linear listed in its ``modules`` a :class:`DGQLinearMethod` (the others stay float), verifies the checkpoint's
  checksums as ``dgq.load`` does (``DGQ_VLLM_VERIFY=0`` skips the hashing), and drops the tensors a dgq checkpoint
  holds that vLLM's models do not have (the Hugging Face model's non-persistent buffers, e.g. rotary tables).
- :class:`DGQLinearMethod` creates the format's tensors as vLLM parameters (:mod:`vllm.model_executor.parameter`),
  so vLLM's own loaders cut them for tensor parallelism (:mod:`.layout` states how and refuses row splits off group
  boundaries), and runs the layer through dgq's kernel dispatch (:func:`dgq.kernels.select`): the Triton A8W4 kernel
  on CUDA (4-bit weights read directly), on the CPU ``torch._int_mm`` on the int8 weight expanded per call (memory
  stays 4-bit; ``DGQ_VLLM_WEIGHT_CACHE=1`` keeps the expanded weight instead: faster, 1 byte per weight more).
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

import torch
from vllm.model_executor.layers.linear import (
    LinearBase,
    LinearMethodBase,
    UnquantizedLinearMethod,
    register_weight_loader_v2_supported_method,
)
from vllm.model_executor.layers.quantization import register_quantization_config
from vllm.model_executor.layers.quantization.base_config import QuantizationConfig
from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding
from vllm.model_executor.parameter import (
    ChannelQuantScaleParameter,
    GroupQuantScaleParameter,
    ModelWeightParameter,
    PackedvLLMParameter,
    PerTensorScaleParameter,
)

from ..checkpoint import read_quantization_config, verify_checksums
from ..errors import DGQError
from ..formats import FORMATS
from ..kernels import select
from . import layout

log = logging.getLogger(__name__)
NAME = "dgq"
_RUNTIMES: list = []  # this process's quantized layers (the format modules dgq's kernels run), by key


def _run(key: int, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``y = layer(x) (+ bias)`` for the quantized layer ``key`` (2-D ``x``), through dgq's kernel dispatch."""
    rt = _RUNTIMES[key]
    object.__setattr__(rt, "bias", bias)  # vLLM passes the bias per call (row-parallel: rank 0 only)
    return select(rt, x).forward(rt, x)


@torch.library.custom_op("dgq::vllm_linear", mutates_args=())
def vllm_linear(x: torch.Tensor, key: int, bias: torch.Tensor | None) -> torch.Tensor:
    """:func:`_run` as one opaque op for torch.compile: vLLM's compiled mode traces the whole model in one graph,
    and dgq's Python dispatch and kernel caches must stay outside it."""
    return _run(key, x, bias)


@vllm_linear.register_fake
def _(x: torch.Tensor, key: int, bias: torch.Tensor | None) -> torch.Tensor:
    return x.new_empty(x.shape[0], _RUNTIMES[key].out_features)


def _env_flag(name: str, default: bool) -> bool:
    v = os.environ.get(name)
    if v is None or v == "":
        return default
    if v not in ("0", "1"):
        raise DGQError(f"{name}={v!r}; set it to 0 or 1")
    return v == "1"


@register_quantization_config(NAME)
class DGQVllmConfig(QuantizationConfig):
    """vLLM's view of a dgq checkpoint's ``quantization_config``."""

    def __init__(self, q: dict):
        super().__init__()
        self.modules = layout.check_modules(q)
        self.kv = q.get("kv_cache")
        self.drop: set[str] = set()  # checkpoint tensors vLLM's model has no place for (see maybe_update_config)

    def __repr__(self) -> str:
        return f"DGQVllmConfig({len(self.modules)} quantized linears)"

    def get_name(self) -> str:
        return NAME

    def get_supported_act_dtypes(self) -> list[torch.dtype]:
        return [torch.bfloat16, torch.float16, torch.float32]

    @classmethod
    def get_min_capability(cls) -> int:
        return 80  # the Triton kernel's int8 tensor-core dot (dgq.kernels.triton)

    @staticmethod
    def get_config_filenames() -> list[str]:
        return []  # the quantization_config lives in config.json

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> DGQVllmConfig:
        return cls(config)

    def apply_vllm_mapper(self, hf_to_vllm_mapper) -> None:
        self.modules = hf_to_vllm_mapper.apply_dict(self.modules)

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        if isinstance(layer, LinearBase):
            spec = layout.layer_spec(prefix, self.modules, self.packed_modules_mapping)
            return UnquantizedLinearMethod() if spec is None else DGQLinearMethod(spec, prefix)
        if isinstance(layer, VocabParallelEmbedding) and prefix in self.modules:
            raise DGQError(f"{prefix}: a quantized embedding or lm_head is not supported by the vLLM plugin")
        return None

    def maybe_update_config(self, model_name: str, hf_config=None, revision: str | None = None) -> None:
        path = Path(model_name)
        if path.is_dir() and _env_flag("DGQ_VLLM_VERIFY", True):
            cfg, q = read_quantization_config(path)
            try:
                verify_checksums(path, cfg, q)
            except DGQError as e:
                raise DGQError(f"{e} (in vLLM: DGQ_VLLM_VERIFY=0 skips the checksums)") from None
        if isinstance(self.kv, dict) and self.kv.get("mode", "none") != "none":
            log.warning("the checkpoint records dgq's %s KV cache; vLLM runs its own KV cache (float unless "
                        "kv_cache_dtype is set), so results differ slightly from dgq's", self.kv["mode"])
        if hf_config is not None:
            self.drop = non_persistent_buffers(hf_config)

    def get_checkpoint_weight_mapper(self):
        mapper = super().get_checkpoint_weight_mapper()
        if self.drop:
            from vllm.model_executor.models.utils import WeightsMapper

            pattern = re.compile("^(?:" + "|".join(re.escape(n) for n in sorted(self.drop)) + ")$")
            mapper = mapper | WeightsMapper(orig_to_new_regex={pattern: None})
        return mapper


def non_persistent_buffers(hf_config) -> set[str]:
    """Names of the Hugging Face model's non-persistent buffers (rotary tables and the like): ``dgq.save`` writes
    them, vLLM's models have no place for them. Read off the model built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config)
    except Exception as e:  # noqa: BLE001 - any config transformers cannot build: fall back to the known names
        log.debug("cannot build the transformers model on meta (%s); dropping rotary buffers only", e)
        return {"model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"}
    names = set()
    for mod_name, mod in model.named_modules():
        for b in getattr(mod, "_non_persistent_buffers_set", ()):
            names.add(f"{mod_name}.{b}" if mod_name else b)
    return names


@register_weight_loader_v2_supported_method
class DGQLinearMethod(LinearMethodBase):
    """One vLLM linear running checkpoint linears of one dgq format (see :class:`dgq.vllm_plugin.layout.LayerSpec`)."""

    def __init__(self, spec: layout.LayerSpec, prefix: str):
        self.spec = spec
        self.prefix = prefix

    def create_weights(self, layer: torch.nn.Module, input_size_per_partition: int, output_partition_sizes: list[int],
                       input_size: int, output_size: int, params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        spec, where = self.spec, self.prefix
        if input_size != spec.in_features or output_size != sum(spec.out_features):
            raise DGQError(f"{where}: the checkpoint's {'+'.join(n.rsplit('.', 1)[-1] for n in spec.names)} is "
                           f"{sum(spec.out_features)}x{spec.in_features}, vLLM's layer {output_size}x{input_size}")
        layout.check_partition(spec, input_size_per_partition, where)
        loader = extra_weight_attrs["weight_loader"]
        shapes = layout.partition_shapes(spec, input_size_per_partition, sum(output_partition_sizes))
        for name, (kind, dtype) in layout.tensor_kinds(spec.format).items():
            data = torch.zeros(shapes[name], dtype=dtype)
            if kind == "packed":
                p = PackedvLLMParameter(data=data, input_dim=1, output_dim=0, packed_dim=1, packed_factor=2,
                                        weight_loader=loader)
            elif kind in ("group", "full"):
                cls = GroupQuantScaleParameter if kind == "group" else ModelWeightParameter
                p = cls(data=data, input_dim=1, output_dim=0, weight_loader=loader)
            elif kind == "channel":
                p = ChannelQuantScaleParameter(data=data, output_dim=0, weight_loader=loader)
            else:  # one scalar per fused linear
                p = PerTensorScaleParameter(data=data, weight_loader=loader)
            layer.register_parameter(name, p)
        layer.dgq_partition = (input_size_per_partition, sum(output_partition_sizes))

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        """Wrap the loaded tensors (no copy) in the format's module, the object dgq's kernels run, and check the
        format's invariants on this rank's part."""
        spec = self.spec
        k, n = layer.dgq_partition
        cls = FORMATS[spec.format]
        rt = cls(k, n, spec.group_size if cls.grouped else k, bias=False, act_mode=spec.act_mode, device="meta")
        for name, (kind, _) in layout.tensor_kinds(spec.format).items():
            t = getattr(layer, name).data
            if kind == "tensor":  # the fused linears read one input: one activation scale for all of them
                if not bool((t == t[0]).all()):
                    raise DGQError(f"{self.prefix}: {', '.join(spec.names)} have different static activation "
                                   f"scales ({t.tolist()}); vLLM runs them as one layer on one quantized input")
                t = t[0]
            rt._buffers[name] = t
        rt.name = self.prefix
        rt.cache_weights = _env_flag("DGQ_VLLM_WEIGHT_CACHE", False)
        rt.check(self.prefix)
        layer.__dict__["dgq_runtime"] = rt  # a plain attribute: not a submodule, its tensors are the layer's
        layer.__dict__["dgq_key"] = len(_RUNTIMES)
        _RUNTIMES.append(rt)

    def apply(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        x2d = x.reshape(-1, x.shape[-1])
        if torch.compiler.is_compiling():
            y = torch.ops.dgq.vllm_linear(x2d, layer.dgq_key, bias)
        else:  # eager: the same function without the custom-op call overhead
            y = _run(layer.dgq_key, x2d, bias)
        return y.reshape(*x.shape[:-1], y.shape[-1])


def weight_bytes(model: torch.nn.Module) -> dict:
    """Bytes of the parameters and buffers the model holds, split into the quantized linears' tensors (by dtype)
    and the rest, counting each storage once; plus what dgq's kernels cache (expanded weights)."""
    seen: set[int] = set()
    out = {"quantized": {}, "other": 0, "quantized_layers": 0, "kernel_cache": 0}
    for mod in model.modules():
        rt = mod.__dict__.get("dgq_runtime")
        if rt is not None:
            out["quantized_layers"] += 1
            out["kernel_cache"] += sum(t.numel() * t.element_size() for t in rt.kernel_cache.values()
                                       if isinstance(t, torch.Tensor))
        names = set(layout.tensor_kinds(rt.format)) if rt is not None else set()
        for name, t in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
            key = t.untyped_storage().data_ptr()
            if key in seen:
                continue
            seen.add(key)
            nbytes = t.untyped_storage().nbytes()
            if name in names:
                d = str(t.dtype).replace("torch.", "")
                out["quantized"][d] = out["quantized"].get(d, 0) + nbytes
            else:
                out["other"] += nbytes
    out["quantized_total"] = sum(out["quantized"].values())
    return out


def describe(model: torch.nn.Module) -> str:
    """One line per format of the quantized layers (for logs and reports)."""
    counts: dict[str, int] = {}
    for mod in model.modules():
        rt = mod.__dict__.get("dgq_runtime")
        if rt is not None:
            key = f"{rt.format} g={rt.group_size} act={rt.act_mode}"
            counts[key] = counts.get(key, 0) + 1
    return json.dumps(counts)
