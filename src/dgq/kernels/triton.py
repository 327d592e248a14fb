"""The CUDA A8W4 kernel of the dispatch: per-token (or static) activation quantization in Triton, then the fused
GEMM of :mod:`dgq.kernels.triton_gemm` with a config from a :class:`~dgq.kernels.triton_tuner.Tuner`.

Importable without triton: triton and the kernel modules are imported on the first CUDA input, and a missing or
broken triton becomes a refusal reason. See docs/gpu-kernel.md.
"""

from __future__ import annotations

import os

import torch

from .triton_tuner import Tuner

CHUNK = 128  # the kernels' K granularity (triton_gemm.CHUNK)
GROUP_SIZES = (64, 128, 256)  # validated on a GPU (g = 512 failed its compiled test on the H100 with the old v2 tile)
_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class TritonKernel:
    """Runs :class:`dgq.nn.DGQLinear` A8W4 layers (dynamic or static activations) on CUDA."""

    name = "triton"
    formats = ("dgq",)
    act_modes = ("dynamic", "static")

    def __init__(self):
        self.tuner = Tuner()
        self._mods = None  # (triton_gemm, triton_quant) once imported
        self._unusable: str | None = None  # why triton cannot be imported (set on the first failed import)
        self._cap: dict = {}  # device -> compute capability

    @staticmethod
    def limits(in_features: int, group_size: int) -> str | None:
        """Why this kernel would refuse a layer of this shape on a GPU (None: it would run it). Needs no GPU."""
        if in_features % CHUNK:
            return f"K={in_features} is not a multiple of {CHUNK}"
        if group_size not in GROUP_SIZES:
            return f"group size {group_size} is not 64, 128 or 256 (the sizes validated on a GPU)"
        return None

    def _kernels(self):
        """(triton_gemm, triton_quant), imported once; None (and ``_unusable`` set) if triton is missing/broken."""
        if self._mods is None and self._unusable is None:
            try:
                from . import triton_gemm, triton_quant
            except ModuleNotFoundError as e:
                if e.name != "triton" and not (e.name or "").startswith("triton."):
                    raise
                self._unusable = "triton is not installed"
            except Exception as e:  # noqa: BLE001 - a broken triton install must read as "not usable"
                msg = " ".join(str(e).split())[:200]
                self._unusable = f"triton is not usable ({type(e).__name__}: {msg})"
            else:
                self._mods = (triton_gemm, triton_quant)
                self.tuner.load_env()
        return self._mods

    def _capability(self, device: torch.device) -> tuple[int, int]:
        cap = self._cap.get(device)
        if cap is None:
            cap = self._cap[device] = torch.cuda.get_device_capability(device)
        return cap

    def refuse(self, layer, x: torch.Tensor) -> str | None:
        if x.device.type != "cuda":
            return f"input is on {x.device.type}; the Triton kernel runs on CUDA only"
        if self._kernels() is None:
            return self._unusable
        if os.environ.get("TRITON_INTERPRET", "0") == "1":
            return "TRITON_INTERPRET=1 is set (the interpreter runs on the CPU only)"
        if x.dtype not in _DTYPES:
            return f"input dtype {x.dtype} is not fp16/bf16/fp32"
        if self._capability(x.device) < (8, 0):
            return "int8 tensor-core dot needs compute capability 8.0 or newer"
        return self.limits(layer.in_features, layer.group_size)

    def sc(self, layer) -> torch.Tensor:
        """The layer's runtime (s, C) plane (``triton_gemm.pack_sc``), built once per device (never saved)."""
        key = ("triton_sc", layer.zeros.device)
        sc = layer.kernel_cache.get(key)
        if sc is None:
            sc = self._require()[0].pack_sc(layer.zeros, layer.scales)
            layer.kernel_cache[key] = sc
        return sc

    def _require(self):
        mods = self._kernels()
        if mods is None:
            raise RuntimeError(f"the Triton kernel cannot run: {self._unusable}")
        return mods

    def forward(self, layer, x: torch.Tensor) -> torch.Tensor:
        gemm, quant = self._require()
        if x.dtype not in _DTYPES:
            raise ValueError(f"input dtype {x.dtype} is not fp16/bf16/fp32")
        if layer.act_mode == "static":
            x8, s_x = quant.quantize_per_tensor_triton(x, layer.act_scale, permute=True)
        else:
            x8, s_x = quant.quantize_per_token_triton(x, permute=True)
        return gemm.a8w4_gemm(x8, s_x, layer.qweight, layer.zeros, layer.scales, layer.channel_scale, layer.bias,
                              layer.group_size, x.dtype, permuted=True, sc=self.sc(layer), tuner=self.tuner)
