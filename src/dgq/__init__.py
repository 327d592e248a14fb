"""dgq: Dual Grained Quantization (A8W4) for LLMs: 4-bit group-wise weights with integer group scales that
expand exactly to int8, run as one INT8 x INT8 GEMM with a per-token x per-channel float epilogue."""

from . import data, methods
from ._version import __version__
from .api import quantize, use_kv_cache
from .checkpoint import load, save
from .config import DGQConfig
from .errors import DGQError
from .eval.perplexity import perplexity
from .eval.tasks import evaluate_tasks
from .export import export
from .formats import DGQLinear, W4A16Linear, W8A8Linear
from .fuse import fuse_siblings, unfuse
from .hf import register as _register_hf
from .models import load_model

_register_hf()  # AutoModelForCausalLM.from_pretrained(dgq checkpoint) works after import dgq (dgq.hf)

__all__ = ["DGQConfig", "DGQError", "DGQLinear", "W4A16Linear", "W8A8Linear", "data", "evaluate_tasks", "export",
           "fuse_siblings", "load", "load_model", "methods", "perplexity", "quantize", "save", "unfuse",
           "use_kv_cache", "__version__"]
