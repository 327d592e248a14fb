"""dgq checkpoints in vLLM, natively: 4-bit weights in vLLM's memory, dgq's kernels, tensor-parallel sharding.

An out-of-tree vLLM plugin (entry point ``vllm.general_plugins: dgq = dgq.vllm_plugin:register``, in pyproject):
with dgq installed in vLLM's environment, ``vllm.LLM(model=dgq_checkpoint)`` reads config.json's
``quantization_config`` (``quant_method: "dgq"``) and runs the checkpoint's quantized linears through dgq's kernel
dispatch. Runtime only: it imports :mod:`dgq.formats`, :mod:`dgq.kernels` and :mod:`dgq.checkpoint`, never the
quantization algorithms. See docs/vllm-plugin.md.

- :mod:`.layout`: which checkpoint linears a vLLM layer runs, the tensors of each format and how they split across
  tensor-parallel ranks (plain torch; no vLLM needed)
- :mod:`.engine`: the vLLM quantization config and linear method (imports vLLM)
"""

from __future__ import annotations


def register() -> None:
    """The entry point vLLM calls in each of its processes: registers the quantization method ``dgq`` (idempotent:
    importing the module registers it once)."""
    from . import engine  # noqa: F401 - the import registers DGQVllmConfig with vLLM
