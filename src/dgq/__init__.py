"""dgq: Dual Grained Quantization (A8W4) for LLMs: 4-bit group-wise weights with integer group scales that
expand exactly to int8, run as one INT8 x INT8 GEMM with a per-token x per-channel float epilogue."""

__version__ = "0.1.0"

from .api import DGQConfig, quantize  # noqa: E402
from .checkpoint import load, save  # noqa: E402
from .errors import DGQError  # noqa: E402
from .eval.perplexity import perplexity  # noqa: E402
from .eval.tasks import evaluate_tasks  # noqa: E402
from .fuse import fuse_siblings, unfuse  # noqa: E402
from .models import load_model  # noqa: E402
from .nn import DGQLinear  # noqa: E402

__all__ = ["DGQConfig", "DGQError", "DGQLinear", "evaluate_tasks", "fuse_siblings", "load", "load_model",
           "perplexity", "quantize", "save", "unfuse", "__version__"]
