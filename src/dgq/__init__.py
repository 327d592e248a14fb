"""dgq: Dual Grained Quantization (A8W4) for LLMs: 4-bit group-wise weights with integer group scales that
expand exactly to int8, run as one INT8 x INT8 GEMM with a per-token x per-channel float epilogue.

The public names below are imported on first use, so that a runtime consumer (the vLLM plugin, which imports
:mod:`dgq.formats` and :mod:`dgq.kernels` only) does not load the quantization algorithms (:mod:`dgq.methods`,
:mod:`dgq.quant`) or the evaluation and export dependencies. ``import dgq`` still registers the transformers loader
(:mod:`dgq.hf`), as before."""

import sys as _sys
import types as _types
from importlib import import_module as _import_module

from ._version import __version__
from .errors import DGQError
from .hf import register as _register_hf

# public name -> (module, attribute; None: the module itself)
_LAZY = {
    "data": (".data", None),
    "methods": (".methods", None),
    "quantize": (".api", "quantize"),
    "use_kv_cache": (".api", "use_kv_cache"),
    "load": (".checkpoint", "load"),
    "save": (".checkpoint", "save"),
    "DGQConfig": (".config", "DGQConfig"),
    "perplexity": (".eval.perplexity", "perplexity"),
    "evaluate_tasks": (".eval.tasks", "evaluate_tasks"),
    "export": (".export", "export"),
    "DGQLinear": (".formats", "DGQLinear"),
    "W4A16Linear": (".formats", "W4A16Linear"),
    "W8A8Linear": (".formats", "W8A8Linear"),
    "fuse_siblings": (".fuse", "fuse_siblings"),
    "unfuse": (".fuse", "unfuse"),
    "load_model": (".models", "load_model"),
}

__all__ = ["DGQError", "__version__", *_LAZY]


def __getattr__(name: str):
    if name not in _LAZY:
        raise AttributeError(f"module 'dgq' has no attribute {name!r}")
    module, attr = _LAZY[name]
    value = _import_module(module, __name__)
    if attr is not None:
        value = getattr(value, attr)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


class _Package(_types.ModuleType):
    """``dgq.export`` is the function :func:`dgq.export.export`, not its subpackage: importing the subpackage (e.g.
    ``from dgq.export.ct import ...``) makes Python set the package attribute to the subpackage, which this keeps
    as the function (what the eager ``from .export import export`` used to leave)."""

    def __setattr__(self, name, value):
        if name == "export" and isinstance(value, _types.ModuleType) and hasattr(value, "export"):
            value = value.export
        super().__setattr__(name, value)


_sys.modules[__name__].__class__ = _Package

_register_hf()  # AutoModelForCausalLM.from_pretrained(dgq checkpoint) works after import dgq (dgq.hf)
