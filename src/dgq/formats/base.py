"""``QuantLinear``: what every quantized linear module shares, whatever its storage format.

A format module (:mod:`dgq.formats.dgq`, ``w4a16``, ``w8a8``) subclasses it with its buffers and a ``container()``
that returns its container (the pure tensors of the format). Every forward is one kernel dispatch
(:func:`dgq.kernels.select`); derived weights a kernel builds (expanded int8, re-laid scales) live in
``kernel_cache``, never in the checkpoint, and are dropped whenever the buffers move or are reloaded.
"""

from __future__ import annotations

import torch
from torch import nn

from ..errors import DGQError
from .act import quantize_per_tensor, quantize_per_token
from .packing import resolve_group_size

ACT_MODES = ("dynamic", "static", "none")  # none = weight-only: float activations


class QuantLinear(nn.Module):
    """Subclasses set ``format`` (the checkpoint's per-module format name), ``w_bits``, ``act_modes`` (the
    activation modes the format can run), register their buffers (``register_buffers``) and implement ``container()``.
    All take the same constructor arguments, so the checkpoint loader and sibling fusion build any of them alike."""

    format = ""
    w_bits = 4
    grouped = True  # False: one scale per row, the group size is ignored
    act_modes: tuple[str, ...] = ACT_MODES
    in_features: int
    out_features: int
    group_size: int
    act_mode: str
    siblings = None  # the SiblingGroup this layer runs in (dgq.fuse), if any
    cache_weights = True  # kernels may keep derived weights (expanded int8, dequantized) between calls
    sibling_index = -1

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False,
                 act_mode: str = "dynamic", bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if act_mode not in self.act_modes:
            raise ValueError(f"{self.format} layers run activation modes {self.act_modes}, got {act_mode!r}")
        self.in_features, self.out_features, self.act_mode = in_features, out_features, act_mode
        self.group_size = self.resolve_group_size(in_features, group_size)
        self.register_buffers(device)
        if "static" in self.act_modes:  # formats with int8 activations keep a (static-mode) scale, 0 otherwise
            self.register_buffer("act_scale", torch.zeros((), dtype=torch.float32, device=device))
        if bias:
            self.register_buffer("bias", torch.zeros(out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None
        self.kernel_cache: dict = {}
        self.name = ""

    # -- what a format defines ---------------------------------------------------------------------------------
    @staticmethod
    def resolve_group_size(in_features: int, group_size: int, name: str = "layer") -> int:
        """The group size a layer of this format uses (grouped formats: ``group_size`` must divide K)."""
        return resolve_group_size(in_features, group_size, name)

    def register_buffers(self, device) -> None:
        raise NotImplementedError

    def container(self):
        """The format's container over this layer's buffers (no copy)."""
        raise NotImplementedError

    @classmethod
    def from_weight(cls, w, bias: torch.Tensor | None = None, act_mode: str | None = None,
                    act_scale: float | torch.Tensor | None = None, name: str = "") -> QuantLinear:
        """A layer holding the container ``w`` (and the bias, and a static activation scale)."""
        n, k = w.shape
        m = cls(k, n, w.group_size, bias=bias is not None, act_mode=act_mode or cls.act_modes[0],
                bias_dtype=bias.dtype if bias is not None else torch.float32, device=w.device)
        for key, t in w.tensors().items():
            getattr(m, key).copy_(t)
        if bias is not None:
            m.bias.copy_(bias)
        if act_scale is not None:
            m.act_scale.fill_(float(act_scale))
        m.name = name
        return m

    # -- shared behaviour ----------------------------------------------------------------------------------------
    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return self.container().dequantize(dtype)

    def check(self, where: str) -> None:
        """The format's invariants (and a usable static activation scale); raises DGQError naming ``where``."""
        self.container().check(where)
        if "static" in self.act_modes:
            s = float(self.act_scale)
            if self.act_mode == "static" and not 0 < s < float("inf"):
                raise DGQError(f"{where}: static activation scale {s} is not a finite positive number")
            if self.act_mode != "static" and s != 0:  # unused, saved as 0: anything else is corruption
                raise DGQError(f"{where}: act_scale is {s}, expected 0 for {self.act_mode} activations")

    def _invalidate(self) -> None:
        self.kernel_cache = {}
        if self.siblings is not None:
            self.siblings.invalidate()

    def _apply(self, fn, recurse=True):  # moving the module invalidates derived weights
        self._invalidate()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # new values invalidate derived weights too
        self._invalidate()
        return super()._load_from_state_dict(*args, **kwargs)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"act_mode={self.act_mode}, bias={self.bias is not None}")

    def describe(self) -> str:
        fused = "" if self.siblings is None else f", fused with {len(self.siblings.members) - 1} sibling(s)"
        return (f"{type(self).__name__} {self.name or ''}[{self.out_features}x{self.in_features}, "
                f"g={self.group_size}, act={self.act_mode}{fused}]").replace(" [", "[")

    def quantize_input(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 activations and their per-row scales, by this layer's activation mode."""
        if self.act_mode == "static":
            return quantize_per_tensor(x2d, self.act_scale)
        return quantize_per_token(x2d)

    def kernel_for(self, x: torch.Tensor):
        # the dispatch is looked up at call time: the kernels import this package (activation quantizers)
        from ..kernels import select

        return select(self, x.reshape(-1, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # one GEMM for all the linears reading x (dgq.fuse); under torch.compile each runs alone, since the
        # group's identity/pointer checks would break the graph (a traced graph has no Python state to reuse)
        if self.siblings is not None and not torch.compiler.is_compiling():
            return self.siblings(self, x)
        x2d = x.reshape(-1, self.in_features)
        y = self.kernel_for(x2d).forward(self, x2d)
        return y.reshape(*x.shape[:-1], self.out_features)

    # -- row layout (sibling fusion) -----------------------------------------------------------------------------
    def row_buffers(self) -> list[str]:
        """The buffers laid out one row per output feature (concatenated along dim 0 by fusion)."""
        return [n for n, t in self.named_buffers(recurse=False)
                if t.dim() >= 1 and t.shape[0] == self.out_features]

    @classmethod
    def concat(cls, members: list[QuantLinear]) -> QuantLinear:
        """A new layer of this format whose output is ``cat([m(x) for m in members], -1)`` (same input size,
        group size, activation mode and per-tensor buffers; checked by :func:`dgq.fuse.why_not_fusable`)."""
        m0 = members[0]
        ref = m0.bias if m0.bias is not None else next(iter(m0.buffers()))
        fused = cls(m0.in_features, sum(m.out_features for m in members), m0.group_size, bias=m0.bias is not None,
                    act_mode=m0.act_mode, bias_dtype=ref.dtype, device=ref.device)
        rows = m0.row_buffers()
        for name, _ in list(fused.named_buffers(recurse=False)):  # rows concatenated; per-layer ones shared
            setattr(fused, name, torch.cat([getattr(m, name) for m in members], 0) if name in rows
                    else getattr(m0, name))
        fused.name = "+".join(m.name or "?" for m in members)
        fused.cache_weights = m0.cache_weights
        return fused

    def use_rows_of(self, other: QuantLinear, lo: int, hi: int) -> None:
        """Make this layer's row buffers views of rows ``lo:hi`` of ``other``'s (no copy)."""
        for name in self.row_buffers():
            setattr(self, name, getattr(other, name)[lo:hi])
        self.kernel_cache = {}

