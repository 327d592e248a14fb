"""CPU fast path: an exact int8 GEMM on the expanded int8 weight, then the shared float epilogue.

The int8 weight ``w8 = s_int * (q - z)`` is expanded once per layer on first use and kept (non-persistent) in the
layer's kernel cache: the CPU has no in-register expansion, so this trades RAM for speed (1 byte per weight with
``int_mm``, 4 with ``fp32-exact``: 6.5 GB or 26 GB for a 7B model, next to its 3.6 GB of 4-bit weights). With
``layer.cache_weights`` off (``dgq.load(path, cache_weights=False)``, ``--no-weight-cache``) the weight is expanded
on every call instead: memory stays at the 4-bit size, at the cost of the expansion per call. The saved checkpoint
stays 4-bit. Bitwise equal to the reference (exact int32 accumulators, same epilogue function).

Two exact ways to get the int32 product, chosen once per process by timing both on a small problem:

- ``int_mm``: ``torch._int_mm`` (oneDNN's int8 GEMM; fast where the CPU has VNNI), caching ``w8`` (1 byte/weight);
- ``fp32-exact``: float32 BLAS on the int8 values in K chunks of 1024. Every product is at most 127² = 16129 and a
  chunk's partial sums stay below 2**24, so each chunk's float32 sum is an exact integer whatever the summation
  order; the chunks add up in int32. It caches ``w8`` as float32 (4 bytes/weight, an fp32 model's size). Seen on an
  AVX2 machine without VNNI, where ``torch._int_mm`` ran ~48x slower than the float32 GEMM of the same shape.

``DGQ_CPU_INT8=int_mm|fp32-exact`` forces one.
"""

from __future__ import annotations

import os
import time

import torch

from ..formats.act import epilogue

EXACT_CHUNK = 1024  # 1024 * 127**2 < 2**24: a float32 sum of that many int8 products is exact
STRATEGIES = ("int_mm", "fp32-exact")


def int32_via_fp32(x8: torch.Tensor, w8t_f: torch.Tensor) -> torch.Tensor:
    """Exact ``x8 @ w8t`` as int32 from float32 GEMMs over K chunks (``w8t_f``: float32 ``[K, N]`` of int8 values)."""
    xf = x8.float()
    k = xf.shape[1]
    acc = None
    for c in range(0, k, EXACT_CHUNK):
        part = (xf[:, c:c + EXACT_CHUNK] @ w8t_f[c:c + EXACT_CHUNK]).to(torch.int32)
        acc = part if acc is None else acc.add_(part)
    return acc


def _probe() -> str:
    """The faster exact strategy on this CPU (a few ms, once per process)."""
    g = torch.Generator().manual_seed(0)
    x8 = torch.randint(-127, 128, (64, 1024), dtype=torch.int8, generator=g)
    w8t = torch.randint(-127, 128, (1024, 512), dtype=torch.int8, generator=g)
    w8t_f = w8t.float()

    def best(fn) -> float:
        fn()
        times = []
        for _ in range(3):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    t_int = best(lambda: torch._int_mm(x8, w8t))
    t_f32 = best(lambda: int32_via_fp32(x8, w8t_f))
    return "int_mm" if t_int <= 1.5 * t_f32 else "fp32-exact"  # int_mm also caches 4x fewer bytes


class CpuIntMMKernel:
    name = "cpu-int-mm"
    formats = ("dgq", "w8a8")
    act_modes = ("dynamic", "static")

    def __init__(self):
        self._strategy: str | None = None

    @property
    def strategy(self) -> str:
        if self._strategy is None:
            forced = os.environ.get("DGQ_CPU_INT8")
            if forced and forced not in STRATEGIES:
                raise ValueError(f"DGQ_CPU_INT8={forced!r}; choose one of {', '.join(STRATEGIES)}")
            self._strategy = forced or _probe()
        return self._strategy

    def refuse(self, layer, x: torch.Tensor) -> str | None:
        if x.device.type != "cpu":
            return f"input is on {x.device.type}, this kernel runs on the CPU only"
        if not hasattr(torch, "_int_mm"):
            return "this torch has no torch._int_mm"
        return None

    def weight_t(self, layer) -> torch.Tensor:
        """The layer's int8 weight transposed, ``[K, N]`` (cached unless ``layer.cache_weights`` is off)."""
        w8t = layer.kernel_cache.get("cpu_w8t")
        if w8t is None:
            w8t = layer.int8_weight().t()
            if layer.cache_weights:
                layer.kernel_cache["cpu_w8t"] = w8t
        return w8t

    def int32_product(self, layer, x8: torch.Tensor) -> torch.Tensor:
        if self.strategy == "int_mm":
            return torch._int_mm(x8, self.weight_t(layer))
        w8t_f = layer.kernel_cache.get("cpu_w8t_f32")
        if w8t_f is None:
            w8t_f = layer.int8_weight().t().float()
            if layer.cache_weights:
                layer.kernel_cache["cpu_w8t_f32"] = w8t_f
        return int32_via_fp32(x8, w8t_f)

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        x8, s_x = layer.quantize_input(x)
        return epilogue(self.int32_product(layer, x8), s_x, layer.channel_scale, layer.bias, x.dtype)
