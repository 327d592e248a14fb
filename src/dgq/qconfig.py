"""The header of a dgq ``quantization_config`` (config.json): its layout version and the checks every reader of it
makes — ``dgq.checkpoint`` and the vLLM plugin. No torch, no transformers: the plugin imports it in vLLM's
processes."""

from __future__ import annotations

from .errors import DGQError

FORMAT_VERSION = 2  # of the checkpoint layout and its quantization_config; readers take 1 (no checksums) and 2


def check_header(q: dict, where: str, reader: str = "this dgq", upgrade: str = "upgrade dgq") -> int:
    """``format_version`` (a positive integer this reader knows) and a non-empty ``modules`` table; returns the
    version. ``where`` starts each message (the folder), ``reader``/``upgrade`` name who reads it and the fix."""
    v = q.get("format_version")
    if not isinstance(v, int) or isinstance(v, bool) or v < 1:
        raise DGQError(f"{where}: quantization_config.format_version must be a positive integer, got {v!r}")
    if v > FORMAT_VERSION:
        raise DGQError(f"{where} uses dgq format version {v}, newer than {reader} reads ({FORMAT_VERSION}); {upgrade}")
    if not isinstance(q.get("modules"), dict) or not q["modules"]:
        raise DGQError(f"{where}: quantization_config lists no quantized modules")
    return v
