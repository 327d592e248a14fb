"""``DGQLinear``: an ``nn.Linear`` replacement holding the packed DGQ A8W4 tensors; its forward is one dispatch."""

from __future__ import annotations

import torch
from torch import nn

from . import format as fmt
from .quant.act import quantize_per_tensor, quantize_per_token

ACT_MODES = ("dynamic", "static", "none")  # none = weight-only (A16W4)


class DGQLinear(nn.Module):
    """y = x W_hat^T + b with W in the DGQ format and (unless ``act_mode='none'``) int8 activations.

    Buffers (all saved): ``qweight`` uint8 [N, K/2], ``zeros`` int8 [N, G], ``scales`` int8 [N, G],
    ``channel_scale`` float32 [N], ``act_scale`` float32 [] (static mode; 0 otherwise), ``bias`` (optional).
    """

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
        if bias:
            self.register_buffer("bias", torch.zeros(n, dtype=bias_dtype, device=device))
        else:
            self.bias = None
        self.kernel_cache: dict = {}  # derived, never saved: expanded/repacked weights per kernel
        self.name = ""

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
        m.qweight.copy_(qweight)
        m.zeros.copy_(zeros)
        m.scales.copy_(scales)
        m.channel_scale.copy_(channel_scale)
        if bias is not None:
            m.bias.copy_(bias)
        if act_scale is not None:
            m.act_scale.fill_(float(act_scale))
        m.name = name
        return m

    def _apply(self, fn, recurse=True):  # moving the module invalidates derived weights
        self.kernel_cache = {}
        return super()._apply(fn, recurse)

    def describe(self) -> str:
        return (f"DGQLinear {self.name or ''}[{self.out_features}x{self.in_features}, g={self.group_size}, "
                f"act={self.act_mode}]").replace(" [", "[")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, group_size={self.group_size}, "
                f"act_mode={self.act_mode}, bias={self.bias is not None}")

    def quantize_input(self, x2d: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """int8 activations and their per-row scales, by this layer's activation mode."""
        if self.act_mode == "static":
            return quantize_per_tensor(x2d, self.act_scale)
        return quantize_per_token(x2d)

    def dequantized_weight(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return fmt.dequantize(self.qweight, self.zeros, self.scales, self.channel_scale, self.group_size, dtype)

    def kernel_for(self, x: torch.Tensor):
        from .kernels import select

        return select(self, x.reshape(-1, self.in_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x2d = x.reshape(-1, self.in_features)
        y = self.kernel_for(x2d).forward(self, x2d)
        return y.reshape(*x.shape[:-1], self.out_features)
