"""Storage formats, one module each: its container (the pure tensors), packing, dequantization, invariants
(``check``) and its linear module. ``FORMATS`` maps the checkpoint's per-module ``format`` name to the module class.

- :mod:`.dgq`: DGQ A8W4 (4-bit codes, int8 group scales, float channel scales; int8 or float activations)
- :mod:`.w4a16`: the standard GPTQ/AWQ W4A16 (float16 group scales, 4-bit zeros; float activations)
- :mod:`.w8a8`: per-channel int8 weights (SmoothQuant / RTN W8; int8 activations)

Shared pieces: :mod:`.packing` (uint4 packing, group sizes), :mod:`.act` (activation quantizers and the int8 GEMM
epilogue), :mod:`.base` (``QuantLinear``).
"""

from .base import ACT_MODES, QuantLinear
from .dgq import DGQLinear, DGQWeight
from .w4a16 import W4A16Linear, W4Weight
from .w8a8 import W8A8Linear, W8Weight

FORMATS: dict[str, type[QuantLinear]] = {cls.format: cls for cls in (DGQLinear, W4A16Linear, W8A8Linear)}

__all__ = ["ACT_MODES", "FORMATS", "DGQLinear", "DGQWeight", "QuantLinear", "W4A16Linear", "W4Weight",
           "W8A8Linear", "W8Weight"]
