"""``DGQLinear``: an ``nn.Linear`` replacement holding the packed DGQ A8W4 tensors; its forward is one dispatch."""

from __future__ import annotations

import torch
from torch import nn

from . import format as fmt
from .formats.act import quantize_per_tensor, quantize_per_token

ACT_MODES = ("dynamic", "static", "none")  # none = weight-only (A16W4)


class QuantLinear(nn.Module):
    """What every quantized linear shares: activation quantization, the kernel dispatch, a one-line description.
    Subclasses set ``format`` (the checkpoint's per-module format name) and hold their tensors as buffers."""

    format = ""
    in_features: int
    out_features: int
    act_mode: str

    def _finish_init(self, bias: bool, bias_dtype: torch.dtype, device) -> None:
        """The optional bias buffer, the kernel cache (derived, never saved: expanded/repacked weights per kernel)
        and the name every format has."""
        if bias:
            self.register_buffer("bias", torch.zeros(self.out_features, dtype=bias_dtype, device=device))
        else:
            self.bias = None
        self.kernel_cache: dict = {}
        self.name = ""

    def _fill(self, bias=None, act_scale=None, name: str = "", **tensors) -> QuantLinear:
        """Copy ``tensors`` (buffer name -> values), the bias and a static activation scale in; returns self."""
        for key, t in tensors.items():
            getattr(self, key).copy_(t)
        if bias is not None:
            self.bias.copy_(bias)
        if act_scale is not None:
            self.act_scale.fill_(float(act_scale))
        self.name = name
        return self

    def _invalidate(self) -> None:
        self.kernel_cache = {}
        group = self.__dict__.get("siblings")
        if group is not None:
            group.invalidate()

    def _apply(self, fn, recurse=True):  # moving the module invalidates derived weights
        self._invalidate()
        return super()._apply(fn, recurse)

    def _load_from_state_dict(self, *args, **kwargs):  # new values invalidate derived weights too
        self._invalidate()
        return super()._load_from_state_dict(*args, **kwargs)

    def describe(self) -> str:
        group = self.__dict__.get("siblings")
        fused = "" if group is None else f", fused with {len(group.members) - 1} sibling(s)"
        return (f"{type(self).__name__} {self.name or ''}[{self.out_features}x{self.in_features}, "
                f"g={getattr(self, 'group_size', '-')}, act={self.act_mode}{fused}]").replace(" [", "[")

    def quantize_input(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 activations and their per-row scales, by this layer's activation mode."""
        if self.act_mode == "static":
            return quantize_per_tensor(x2d, self.act_scale)
        return quantize_per_token(x2d)

    def kernel_for(self, x: torch.Tensor):
        from .kernels import select

        return select(self, x.reshape(-1, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        group = self.__dict__.get("siblings")
        # one GEMM for all the linears reading x (dgq.fuse); under torch.compile each runs alone, since the
        # group's identity/pointer checks would break the graph (a traced graph has no Python state to reuse)
        if group is not None and not torch.compiler.is_compiling():
            return group(self, x)
        x2d = x.reshape(-1, self.in_features)
        y = self.kernel_for(x2d).forward(self, x2d)
        return y.reshape(*x.shape[:-1], self.out_features)


class DGQLinear(QuantLinear):
    """The DGQ format. y = x W_hat^T + b with W in the DGQ format and (unless ``act_mode='none'``) int8 activations.

    Buffers (all saved): ``qweight`` uint8 [N, K/2], ``zeros`` int8 [N, G], ``scales`` int8 [N, G],
    ``channel_scale`` float32 [N], ``act_scale`` float32 [] (static mode; 0 otherwise), ``bias`` (optional).
    """

    format = "dgq"

    def __init__(
        self,
        in_features: int,
        out_features: int,
        group_size: int,
        bias: bool = False,
        act_mode: str = "dynamic",
        bias_dtype: torch.dtype = torch.float32,
        device=None,
    ):
        super().__init__()
        if act_mode not in ACT_MODES:
            raise ValueError(f"act_mode must be one of {ACT_MODES}, got {act_mode!r}")
        g = fmt.resolve_group_size(in_features, group_size)
        self.in_features, self.out_features, self.group_size, self.act_mode = in_features, out_features, g, act_mode
        n, k = out_features, in_features
        self.register_buffer("qweight", torch.zeros(n, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("zeros", torch.zeros(n, k // g, dtype=torch.int8, device=device))
        self.register_buffer("scales", torch.ones(n, k // g, dtype=torch.int8, device=device))
        self.register_buffer("channel_scale", torch.ones(n, dtype=torch.float32, device=device))
        self.register_buffer("act_scale", torch.zeros((), dtype=torch.float32, device=device))
        self._finish_init(bias, bias_dtype, device)

    @classmethod
    def from_tensors(
        cls,
        qweight: torch.Tensor,
        zeros: torch.Tensor,
        scales: torch.Tensor,
        channel_scale: torch.Tensor,
        group_size: int,
        bias: torch.Tensor | None = None,
        act_mode: str = "dynamic",
        act_scale: torch.Tensor | float | None = None,
        name: str = "",
    ) -> DGQLinear:
        n, k2 = qweight.shape
        m = cls(2 * k2, n, group_size, bias=bias is not None, act_mode=act_mode,
                bias_dtype=bias.dtype if bias is not None else torch.float32, device=qweight.device)
        return m._fill(bias, act_scale, name, qweight=qweight, zeros=zeros, scales=scales,
                       channel_scale=channel_scale)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"act_mode={self.act_mode}, bias={self.bias is not None}")

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return fmt.dequantize(self.qweight, self.zeros, self.scales, self.channel_scale, self.group_size, dtype)

    def int8_weight(self) -> torch.Tensor:
        """The exact int8 weight ``s_int * (q - z)`` ``[N, K]``."""
        return fmt.expand_int8(self.qweight, self.zeros, self.scales, self.group_size)


class W4A16Linear(QuantLinear):
    """The standard weight-only 4-bit format of GPTQ/AWQ/RTN: ``W_hat = scale * (q - zero)`` per (row, group) with
    float16 ``scales [N, G]`` and uint8 ``zeros [N, G]`` (0..15); codes packed as in DGQ. Float activations."""

    format = "w4a16"

    def __init__(self, in_features: int, out_features: int, group_size: int, bias: bool = False,
                 bias_dtype: torch.dtype = torch.float32, device=None, act_mode: str = "none"):
        super().__init__()
        g = fmt.resolve_group_size(in_features, group_size)
        self.in_features, self.out_features, self.group_size, self.act_mode = in_features, out_features, g, "none"
        n, k = out_features, in_features
        self.register_buffer("qweight", torch.zeros(n, k // 2, dtype=torch.uint8, device=device))
        self.register_buffer("scales", torch.ones(n, k // g, dtype=torch.float16, device=device))
        self.register_buffer("zeros", torch.zeros(n, k // g, dtype=torch.uint8, device=device))
        self._finish_init(bias, bias_dtype, device)

    @classmethod
    def from_weight(cls, qw, bias: torch.Tensor | None = None, name: str = "") -> W4A16Linear:
        n, k2 = qw.qweight.shape
        m = cls(2 * k2, n, qw.group_size, bias=bias is not None,
                bias_dtype=bias.dtype if bias is not None else torch.float32, device=qw.qweight.device)
        return m._fill(bias, None, name, qweight=qw.qweight, scales=qw.scales, zeros=qw.zeros)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        from .quant.peers import w4_dequantize

        return w4_dequantize(self.qweight, self.scales, self.zeros, self.group_size, dtype)


class W8A8Linear(QuantLinear):
    """SmoothQuant/RTN W8A8: per-output-channel symmetric int8 weight ``weight [N, K]`` with float32
    ``channel_scale [N]``; int8 activations (per-token dynamic or static per-tensor). Runs on the same int8 GEMM
    kernels and epilogue as DGQ (its int8 weight is simply stored instead of expanded)."""

    format = "w8a8"

    def __init__(self, in_features: int, out_features: int, group_size: int = -1, bias: bool = False,
                 act_mode: str = "dynamic", bias_dtype: torch.dtype = torch.float32, device=None):
        super().__init__()
        if act_mode not in ("dynamic", "static"):
            raise ValueError(f"W8A8 act_mode must be dynamic or static, got {act_mode!r}")
        self.in_features, self.out_features, self.act_mode = in_features, out_features, act_mode
        self.group_size = in_features
        self.register_buffer("weight", torch.zeros(out_features, in_features, dtype=torch.int8, device=device))
        self.register_buffer("channel_scale", torch.ones(out_features, dtype=torch.float32, device=device))
        self.register_buffer("act_scale", torch.zeros((), dtype=torch.float32, device=device))
        self._finish_init(bias, bias_dtype, device)

    @classmethod
    def from_weight(cls, qw, bias: torch.Tensor | None = None, act_mode: str = "dynamic",
                    act_scale: float | None = None, name: str = "") -> W8A8Linear:
        n, k = qw.weight.shape
        m = cls(k, n, bias=bias is not None, act_mode=act_mode,
                bias_dtype=bias.dtype if bias is not None else torch.float32, device=qw.weight.device)
        return m._fill(bias, act_scale, name, weight=qw.weight, channel_scale=qw.scale)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return (self.weight.float() * self.channel_scale[:, None]).to(dtype)

    def int8_weight(self) -> torch.Tensor:
        return self.weight


FORMATS = {"dgq": DGQLinear, "w4a16": W4A16Linear, "w8a8": W8A8Linear}
