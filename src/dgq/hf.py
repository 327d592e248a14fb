"""transformers-native loading: after ``import dgq``, ``AutoModelForCausalLM.from_pretrained(ckpt)`` (and pipelines)
load dgq checkpoints through transformers' quantizer API (``quant_method: "dgq"``), with the checks of
:func:`dgq.load`, and ``save_pretrained`` writes a dgq checkpoint again (checksums included). Tested with
transformers 5.x (the installed one) and 4.57 (tests/test_hf_tf457.py); their hooks differ where noted.

How it loads: transformers builds the float model on the meta device; :class:`DGQHfQuantizer` first checks the
folder as ``dgq.load`` does (config, format version, checksums of config.json and every weights file, tensor names,
shapes and the quantized tensors' dtypes, from the files' headers), then swaps each linear listed in
``quantization_config["modules"]`` for its empty quantized module (:func:`dgq.checkpoint.quantized_module`).
transformers then fills the modules' buffers from the files: integer tensors keep their dtype and float buffers take
the dtype of the module's buffer (float32 channel scales, float16 W4A16 scales), never the model's ``dtype`` (4.57
casts them to it: they are read again from the files); the other float weights (embeddings, norms, biases, lm_head)
take the requested ``dtype`` as in any transformers model. 5.x names the weights files to the quantizer; with 4.57
the folder is the one ``from_pretrained`` was given (a local folder). After loading: every float tensor read is
finite, every quantized module passes its format's ``check()``, and the siblings are fused
(:func:`dgq.fuse_siblings`), as ``dgq.load`` leaves them.

Without ``import dgq``, plain transformers would only warn ("Unknown quantization type") and fill the quantized
layers at random (4.57 refuses W8A8's int8 weights, with an unrelated message). Checkpoints therefore name
:data:`dgq.checkpoint.HF_GUARD` as their attention implementation in config.json, under ``attn_implementation``
(read by 5.x) and ``_attn_implementation_internal`` (read by 4.57): transformers refuses it when it builds the model,
with that message. The quantizer resets it before the model is built, in a hook that sees the config then
(``update_attn_implementation`` in 5.x, ``update_tp_plan`` in 4.57). In 5.x an ``attn_implementation`` passed to
``from_pretrained`` replaces the guard (in plain transformers too); 4.57 sets the guard over it as it reads
config.json, so plain 4.57 still refuses, and with dgq ``AutoModelForCausalLM`` gets transformers' default attention
(``model.set_attn_implementation(...)`` after loading changes it). Checkpoints written before the guard still load
silently wrong in plain transformers; those with the first guard (a weights file name in ``transformers_weights``,
:data:`dgq.checkpoint.HF_LEGACY_GUARD_KEY`) load with 5.x, but 4.57 refuses them before any quantizer hook, even
after ``import dgq`` (re-save them with dgq). A tensor whose shape differs from the float model's (transformers
raises on size mismatches) is no lever: W8A8 has none (``weight`` int8 ``[N, K]``, cast silently by 5.x).

Saving: ``save_pretrained`` writes every parameter and buffer (``get_state_dict_and_metadata``: what ``dgq.save``
writes); the loaded model's ``save_pretrained`` is wrapped (on the instance) to put the guard back afterwards
(transformers saves the config without it) and record fresh checksums, so the folder is a dgq checkpoint
that ``dgq.load`` verifies.

``dgq.load`` stays the reference loader (``verify=False``, ``cache_weights``, ``device``, exact dtypes, no
transformers loading machinery); this module loads the same tensors into the same modules, so the logits are bitwise
equal when the model ``dtype`` is the checkpoint's. A checkpoint holds transformers' rotary tables, which differ
between 4.57 and 5.x (5.x adds ``original_inv_freq``, equal to ``inv_freq`` as built): both loaders fill it from
``inv_freq`` when a 4.57 checkpoint lacks it and skip it when the model does not have it
(:data:`dgq.checkpoint.VERSION_BUFFERS`), so checkpoints move between the two versions (tested).
"""

from __future__ import annotations

import copy
import json
import re
import types
from pathlib import Path

import torch
from safetensors import safe_open

from . import kvcache
from .arch import arch_for_config, set_submodule
from .checkpoint import (
    FORMAT_VERSION,
    HF_LEGACY_GUARD_KEY,
    WEIGHTS,
    check_sizes,
    is_guard,
    quantized_module,
    read_quantization_config,
    state_of,
    tensor_index,
    verify_checksums,
    version_buffers,
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
            self.dtypes: dict = {}

        def validate_environment(self, *args, device_map=None, **kwargs):
            if not {"update_attn_implementation", "update_tp_plan"} & set(vars(HfQuantizer)):  # older than 4.5x
                import transformers

                raise DGQError(f"from_pretrained cannot load dgq checkpoints with transformers "
                               f"{transformers.__version__} (use 4.57 or 5.x); load them with dgq.load")
            if isinstance(device_map, dict) and "disk" in {str(v) for v in device_map.values()}:
                raise DGQError("dgq checkpoints cannot be offloaded to disk (device_map has 'disk')")

        def update_attn_implementation(self, config):
            """The guard off the config before the model is built (5.x calls this hook, 4.57 ``update_tp_plan``):
            transformers then picks its default attention (or the one requested), and the standard weights files."""
            if is_guard(getattr(config, "_attn_implementation", None)):
                config._attn_implementation = None
            if is_guard(getattr(config, HF_LEGACY_GUARD_KEY, None)):
                delattr(config, HF_LEGACY_GUARD_KEY)
            return config

        update_tp_plan = update_attn_implementation

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            # 5.x names the weights files; 4.57 does not: the folder is the one from_pretrained was given
            path = Path(checkpoint_files[0]).parent if checkpoint_files else Path(model.config.name_or_path)
            if not path.is_dir():
                raise DGQError(f"dgq checkpoints load from a local folder with this transformers; {path} is not one")
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
            extra = [rf"^{re.escape(n)}$" for n, _ in model.named_buffers() if n in names and n not in persistent]
            extra += [rf"^{re.escape(n)}$" for n in version_buffers(model, names)[1]]
            ignored = model._keys_to_ignore_on_load_unexpected  # a set in 5.x, a list (or None) in 4.57
            merged = [*(ignored or ()), *extra]
            model._keys_to_ignore_on_load_unexpected = set(merged) if isinstance(ignored, set) else merged
            # the quantized modules' own dtypes: 4.57 casts every float tensor it loads to the model's dtype
            self.dtypes = {f"{n}.{b}": t.dtype for n, m in model.named_modules() if isinstance(m, QuantLinear)
                           for b, t in m.named_buffers(recurse=False)}
            self.path, self.names, self.q = path, names, q

        def _process_model_after_weight_loading(self, model, **kwargs):
            path = self.path
            for name, dtype in self.dtypes.items():
                t = model.get_buffer(name)
                if t.dtype != dtype and not t.is_meta:  # cast by 4.57: read again, as the module holds it
                    file = self.names[name][0]
                    with safe_open(path / file, framework="pt", device=str(t.device)) as f:
                        mod, _, attr = name.rpartition(".")
                        setattr(model.get_submodule(mod), attr, f.get_tensor(name).to(dtype))
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
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})  # 5.x; in 4.57 the second name of a tensor
    seen = set()
    for n, p in model.named_parameters(remove_duplicate=False):
        if id(p) in seen:
            tied.add(n)
        seen.add(id(p))
    expected = {n: t for n, t in model.named_parameters(remove_duplicate=False) if n not in tied}
    expected.update(model.named_buffers(remove_duplicate=False))
    fill, ignore = version_buffers(model, names)  # transformers computes its own non-persistent buffers
    expected = {n: t for n, t in expected.items() if n not in fill}
    names = {n: v for n, v in names.items() if n not in ignore}
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
