"""``dgq export``: a dgq checkpoint in another library's format. One module per format family; this dispatches.

- ``ct-w8a8``, ``ct-w4a16``: compressed-tensors (vLLM, transformers), :mod:`dgq.export.ct`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import DGQError
from . import ct

TARGETS = {t: ct.export for t in ct.TARGETS}


def export(ckpt, to: str, out, force: bool = False, verify: bool = True, max_shard_size=ct.EXPORT_MAX_SHARD) -> Path:
    """Write the dgq checkpoint ``ckpt`` as ``to`` (one of :data:`TARGETS`) into the new folder ``out`` (atomic;
    ``force`` replaces an earlier dgq output there). A module the target cannot hold is a :class:`DGQError` before
    anything is written."""
    if to not in TARGETS:
        raise DGQError(f"unknown export target {to!r}; choose one of {', '.join(TARGETS)}")
    return TARGETS[to](ckpt, to=to, out=out, force=force, verify=verify, max_shard_size=max_shard_size)


__all__ = ["TARGETS", "export"]
