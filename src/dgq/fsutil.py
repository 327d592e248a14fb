"""Atomic folder writes: everything goes to a temporary folder beside the target, which is renamed into place
only when complete, so an interrupted write never leaves a half-written target."""

from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_folder(target: Path, replace: bool = False):
    """Yield a temporary folder; on success it becomes ``target`` (an existing ``target`` is replaced only with
    ``replace``; without it, an existing one is kept and the new folder discarded — another writer won)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield tmp
        if not target.exists():
            os.replace(tmp, target)
        elif replace:
            old = target.with_name(f".{target.name}.old-{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
