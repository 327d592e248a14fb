"""``dgq export``: a dgq checkpoint in another library's format. One module per format family; this dispatches.

- ``ct-w8a8``, ``ct-w4a16``: compressed-tensors (vLLM, transformers), :mod:`dgq.export.ct`.
- ``gguf-q8_0``, ``gguf-q4_1``: GGUF (llama.cpp, Ollama), :mod:`dgq.export.gguf`; needs the source GGUF.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DGQError
from . import ct
from . import gguf as gguf_export

TARGETS = {**{t: ct.export for t in ct.TARGETS}, **{t: gguf_export.export for t in gguf_export.TARGETS}}


def export(ckpt, to: str, out, force: bool = False, verify: bool = True, max_shard_size=ct.EXPORT_MAX_SHARD,
           source_gguf=None) -> Path:
    """Write the dgq checkpoint ``ckpt`` as ``to`` (one of :data:`TARGETS`) into the new folder ``out`` (atomic;
    ``force`` replaces an earlier dgq output there; a GGUF target also takes a ``.gguf`` file name and returns the
    file). ``source_gguf``: GGUF targets only, the GGUF the model came from (a path or an alias; see
    :mod:`dgq.export.gguf`). A module the target cannot hold is a :class:`DGQError` before anything is written."""
    if to not in TARGETS:
        raise DGQError(f"unknown export target {to!r}; choose one of {', '.join(TARGETS)}")
    if to in gguf_export.TARGETS:
        return gguf_export.export(ckpt, to=to, out=out, force=force, verify=verify, source_gguf=source_gguf)
    if source_gguf is not None:
        raise DGQError(f"--source-gguf is for the GGUF targets ({', '.join(gguf_export.TARGETS)}), not {to}")
    return TARGETS[to](ckpt, to=to, out=out, force=force, verify=verify, max_shard_size=max_shard_size)


__all__ = ["TARGETS", "export"]
