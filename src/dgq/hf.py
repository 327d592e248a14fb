"""transformers-native loading: after ``import dgq``, ``AutoModelForCausalLM.from_pretrained(ckpt)`` (and pipelines)
load dgq checkpoints through transformers' quantizer API (``quant_method: "dgq"``), with the checks of
:func:`dgq.load`, and ``save_pretrained`` writes a dgq checkpoint again (checksums included).

How it loads: transformers builds the float model on the meta device; :class:`DGQHfQuantizer` first checks the
folder as ``dgq.load`` does (config, format version, checksums of config.json and every weights file, tensor names,
shapes and the quantized tensors' dtypes, from the files' headers), then swaps each linear listed in
``quantization_config["modules"]`` for its empty quantized module (:func:`dgq.checkpoint.quantized_module`).
transformers then fills the modules' buffers from the files: integer tensors keep their dtype and float buffers take
the dtype of the module's buffer (float32 channel scales, float16 W4A16 scales), never the model's ``dtype``; the
other float weights (embeddings, norms, biases, lm_head) take the requested ``dtype`` as in any transformers model.
After loading: every float tensor read is finite, every quantized module passes its format's ``check()``, and the
siblings are fused (:func:`dgq.fuse_siblings`), as ``dgq.load`` leaves them.

Without ``import dgq``, plain transformers would only warn ("Unknown quantization type") and fill the quantized
layers at random. Checkpoints therefore carry :data:`dgq.checkpoint.HF_GUARD` in config.json's
``transformers_weights`` (the weights file transformers should read), which transformers refuses with that message;
the quantizer removes it before transformers looks for the weights (``update_attn_implementation`` is its only hook
that sees the model config that early). Checkpoints written before the guard still load silently wrong in plain
transformers (re-save them with dgq to add it). The other lever, a tensor whose shape differs from the float model's
(transformers raises on size mismatches), does not exist for W8A8 (``weight`` int8 ``[N, K]``, cast silently).

Saving: ``save_pretrained`` writes every parameter and buffer (``get_state_dict_and_metadata``: what ``dgq.save``
writes); the loaded model's ``save_pretrained`` is wrapped (on the instance) to put the guard back afterwards
(transformers drops ``transformers_weights`` from every config it saves) and record fresh checksums, so the folder is
a dgq checkpoint that ``dgq.load`` verifies.

``dgq.load`` stays the reference loader (``verify=False``, ``cache_weights``, ``device``, exact dtypes, no
transformers loading machinery); this module loads the same tensors into the same modules, so the logits are bitwise
equal when the model ``dtype`` is the checkpoint's.
"""

from __future__ import annotations

import copy
import json
import re
import types
from pathlib import Path

import torch

from . import kvcache
from .arch import arch_for_config, set_submodule
from .checkpoint import (
    FORMAT_VERSION,
    HF_GUARD,
    HF_GUARD_KEY,
    WEIGHTS,
    check_sizes,
    quantized_module,
    read_quantization_config,
    state_of,
    tensor_index,
    verify_checksums,
    weight_files,
    write_config,
)
from .errors import DGQError
from .formats import QuantLinear
from .fuse import fuse_siblings

QUANT_METHOD = "dgq"
_DTYPES = {"U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32, "I64": torch.int64,
           "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32, "F64": torch.float64,
           "BOOL": torch.bool}

try:  # transformers' quantizer API (4.46+); without it from_pretrained cannot load dgq checkpoints
    from transformers.quantizers import HfQuantizer, register_quantization_config, register_quantizer
    from transformers.utils.quantization_config import QuantizationConfigMixin
except ImportError:  # pragma: no cover - very old transformers
    HfQuantizer = QuantizationConfigMixin = None


if HfQuantizer is not None:

    class DGQQuantizationConfig(QuantizationConfigMixin):
        """A checkpoint's ``quantization_config`` as written (recipe, per-module formats...). Serialized without
        its checksums: they describe the files it was loaded from; ``save_pretrained`` writes new ones."""

        def __init__(self, **entries):
            self.__dict__.update(copy.deepcopy(entries))
            self.quant_method = QUANT_METHOD

        def to_dict(self) -> dict:
            return {k: copy.deepcopy(v) for k, v in self.__dict__.items() if k != "checksums"}

    class DGQHfQuantizer(HfQuantizer):
        """Loads pre-quantized dgq checkpoints (see the module docstring); quantizing on load is not supported."""

        requires_calibration = True  # only pre-quantized checkpoints

        def __init__(self, quantization_config, **kwargs):
            super().__init__(quantization_config, **kwargs)
            self.path: Path | None = None
            self.names: dict = {}
            self.q: dict = {}

        def validate_environment(self, *args, device_map=None, **kwargs):
            if "update_attn_implementation" not in vars(HfQuantizer):  # e.g. transformers 4.x
                import transformers

                raise DGQError(f"from_pretrained cannot load dgq checkpoints with transformers "
                               f"{transformers.__version__} (its quantizers never see the model config before the "
                               f"weights are looked up); load them with dgq.load")
            if isinstance(device_map, dict) and "disk" in {str(v) for v in device_map.values()}:
                raise DGQError("dgq checkpoints cannot be offloaded to disk (device_map has 'disk')")

        def update_attn_implementation(self, config):
            guard = getattr(config, HF_GUARD_KEY, None)
            if guard == HF_GUARD or (isinstance(guard, str) and guard.startswith("dgq checkpoint")):
                delattr(config, HF_GUARD_KEY)  # transformers resolves the weights files next: the standard names
            return config

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            if not checkpoint_files:
                raise DGQError("dgq checkpoints load from a checkpoint folder (no weights files were given)")
            path = Path(checkpoint_files[0]).parent
            cfg, q = read_quantization_config(path)
            verify_checksums(path, cfg, q)
            names = tensor_index(path)
            check_sizes(path, cfg, names)
            arch_for_config(model.config)
            if q.get("kv_cache") is not None:
                kvcache.check_layout(q["kv_cache"], model.config, str(path))
            with torch.device("meta"):
                for name, spec in q["modules"].items():
                    set_submodule(model, name, quantized_module(path, model, name, spec))
            check_tensor_headers(path, model, names)
            # dgq checkpoints hold the non-persistent buffers too (rotary tables; dgq.load reads them): transformers
            # computes its own, and would list these as unexpected keys
            persistent = set(model.state_dict())
            extra = {rf"^{re.escape(n)}$" for n, _ in model.named_buffers() if n in names and n not in persistent}
            model._keys_to_ignore_on_load_unexpected = set(model._keys_to_ignore_on_load_unexpected or ()) | extra
            self.path, self.names, self.q = path, names, q

        def _process_model_after_weight_loading(self, model, **kwargs):
            path = self.path
            tensors = dict(model.named_parameters(remove_duplicate=False))
            tensors.update(model.named_buffers(remove_duplicate=False))
            for name in self.names:
                t = tensors.get(name)
                if t is None:
                    continue  # a tied copy (checked against the model before loading)
                if t.is_meta:
                    raise DGQError(f"{path}: tensor {name} was not loaded")
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise DGQError(f"{path}: tensor {name} holds NaN/Inf (corrupt checkpoint, or a value out of "
                                   f"range for dtype {t.dtype})")
            for name, m in model.named_modules():
                if isinstance(m, QuantLinear):
                    m.check(f"{path}: {name}")
                    m.kernel_cache = {}
            model.dgq_config = dict(self.q)
            model.save_pretrained = types.MethodType(save_pretrained, model)
            fuse_siblings(model)
            if self.q.get("kv_cache") is not None:
                kvcache.enable(model, self.q["kv_cache"]["mode"], self.q["kv_cache"])
            return model

        def get_state_dict_and_metadata(self, model, *args, **kwargs):
            # every parameter and buffer (non-persistent rotary tables too), as dgq.save writes: dgq.load reads them
            return state_of(model), {}

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self):
            return False


def check_tensor_headers(path: Path, model: torch.nn.Module, names: dict) -> None:
    """The checkpoint's tensors (``names``: name -> (file, shape, dtype) from the headers) are exactly the model's
    (tied copies aside), with their shapes, and the quantized modules' tensors with their dtypes too."""
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    expected = {n: t for n, t in model.named_parameters(remove_duplicate=False) if n not in tied}
    expected.update(model.named_buffers(remove_duplicate=False))
    missing = [n for n in expected if n not in names]
    if missing:
        raise DGQError(f"{path}: tensor {missing[0]} is missing from the weights"
                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    unknown = sorted(set(names) - set(expected) - tied)
    if unknown:
        raise DGQError(f"{path}: the weights hold a tensor this model does not have: {unknown[0]}"
                       + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else ""))
    quantized = {f"{n}.{b}" for n, m in model.named_modules() if isinstance(m, QuantLinear)
                 for b, _ in m.named_buffers(recurse=False) if b != "bias"}
    for name, target in expected.items():
        _, shape, dtype = names[name]
        if tuple(shape) != tuple(target.shape):
            raise DGQError(f"{path}: tensor {name} has shape {tuple(shape)}, expected {tuple(target.shape)}")
        src = _DTYPES.get(dtype)
        if name in quantized and src != target.dtype:
            raise DGQError(f"{path}: tensor {name} is {dtype}, expected {target.dtype}")
        if src is None or src.is_floating_point != target.dtype.is_floating_point:  # floats are cast, others not
            want = "a float tensor" if target.dtype.is_floating_point else target.dtype
            raise DGQError(f"{path}: tensor {name} is {dtype}, expected {want}")


def save_pretrained(model, save_directory, *args, **kwargs):
    """``save_pretrained`` of a model loaded with from_pretrained: transformers writes the folder, then config.json
    gets the guard back and the checksums of the files written (a dgq checkpoint ``dgq.load`` verifies)."""
    if kwargs.get("push_to_hub"):
        raise DGQError("push_to_hub is not supported for dgq models: save_pretrained to a folder, then upload it")
    type(model).save_pretrained(model, save_directory, *args, **kwargs)
    seal(Path(save_directory))


def seal(path: Path) -> None:
    """Rewrite the config.json of a folder written by ``save_pretrained`` as a dgq checkpoint's (see
    :func:`dgq.checkpoint.write_config`)."""
    cfg = json.loads((path / "config.json").read_text())
    q = cfg.pop("quantization_config", None)
    if not isinstance(q, dict) or q.get("quant_method") != QUANT_METHOD:
        raise DGQError(f"{path}: save_pretrained wrote no dgq quantization_config")
    q["format_version"] = FORMAT_VERSION
    wm = weight_files(path)
    files = sorted(set(wm.values())) if wm is not None else [WEIGHTS]
    write_config(path, cfg, q, files)


def register() -> bool:
    """Register the config and quantizer for ``quant_method: "dgq"`` with transformers (idempotent: a name already
    registered is left as it is). Returns whether transformers has both."""
    if HfQuantizer is None:
        return False
    from transformers.quantizers import auto

    if QUANT_METHOD not in auto.AUTO_QUANTIZATION_CONFIG_MAPPING:
        register_quantization_config(QUANT_METHOD)(DGQQuantizationConfig)
    if QUANT_METHOD not in auto.AUTO_QUANTIZER_MAPPING:
        register_quantizer(QUANT_METHOD)(DGQHfQuantizer)
    return True
