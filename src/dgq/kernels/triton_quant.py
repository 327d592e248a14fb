"""Activation quantization in Triton for the A8W4 kernels: one program per row, bitwise equal to
:func:`dgq.formats.act.quantize_per_token` / :func:`dgq.formats.act.quantize_per_tensor` (torch on the CPU).

Dynamic: ``s = amax / 127`` (1.0 for an all-zero row) with IEEE division (``div_rn``), ``x / s`` with ``div_rn``,
clamp to [-127, 127], round half to even. A row holding NaN (Inf) gets the scale NaN (Inf) in both modes.
``permute=True`` writes ``x8`` in the GEMM kernels' activation order (evens then odds inside each 128-wide chunk
of K, :func:`dgq.kernels.triton_gemm.permute_activations`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .triton_gemm import CHUNK


@triton.jit
def _quantize_rows_kernel(x_ptr, x8_ptr, s_ptr, scale_ptr, K, stride_xm,
                          BLOCK: tl.constexpr, STATIC: tl.constexpr, PERMUTE: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK)
    mask = k < K
    x = tl.load(x_ptr + row * stride_xm + k, mask=mask, other=0.0).to(tl.float32)
    amax = tl.max(tl.abs(x), axis=0)
    if STATIC:
        s = tl.load(scale_ptr).to(tl.float32)
    else:
        s = tl.where(amax == 0, 1.0, tl.math.div_rn(amax, 127.0))
    # a row holding NaN/Inf gets scale NaN/Inf, so its output is not finite either (as in dgq.formats.act); the
    # flag is explicit because max on the GPU ignores NaN
    bad = tl.sum((x != x).to(tl.int32), axis=0) > 0
    s = tl.where(bad, float("nan"), tl.where(amax == float("inf"), amax, s))
    y = tl.math.div_rn(x, s)
    y = tl.minimum(tl.maximum(y, -127.0), 127.0)
    # round half to even (as torch.round): exact for |y| < 2**22 under IEEE round-to-nearest-even
    r = (y + 12582912.0) - 12582912.0
    q = r.to(tl.int8)
    if PERMUTE:
        dst = (k // 128) * 128 + (k % 2) * 64 + (k % 128) // 2
    else:
        dst = k
    tl.store(x8_ptr + row * K + dst, q, mask=mask)
    tl.store(s_ptr + row, s)


def _quant(x: torch.Tensor, scale: torch.Tensor | None, permute: bool):
    if x.dim() != 2:
        raise ValueError(f"expected a 2-D input, got shape {tuple(x.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    m, k = x.shape
    if permute and k % CHUNK:
        raise ValueError(f"K={k} must be a multiple of {CHUNK} to permute activations")
    x8 = torch.empty(m, k, dtype=torch.int8, device=x.device)
    s = torch.empty(m, dtype=torch.float32, device=x.device)
    block = triton.next_power_of_2(max(k, 64))
    warps = 4 if block <= 2048 else (8 if block <= 8192 else 16)
    sc = scale.float().reshape(1) if scale is not None else s
    if m:
        _quantize_rows_kernel[(m,)](x, x8, s, sc, k, x.stride(0), BLOCK=block, STATIC=scale is not None,
                                    PERMUTE=permute, num_warps=warps)
    return x8, s


def quantize_per_token_triton(x: torch.Tensor, permute: bool = False):
    """Fused dynamic per-token absmax quantization of a 2-D ``x``: ``(x8 int8 [M, K], s_x float32 [M])``
    (``permute=True``: ``x8`` in the GEMM kernels' activation order)."""
    return _quant(x, None, permute)


def quantize_per_tensor_triton(x: torch.Tensor, scale: torch.Tensor, permute: bool = False):
    """Static per-tensor quantization with the calibrated ``scale`` (``s_x`` is ``scale`` broadcast to [M])."""
    return _quant(x, scale, permute)
