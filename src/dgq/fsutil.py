"""Where dgq writes: checked before any work, written atomically, and never over something dgq did not write.

- :func:`check_output_dir` — before minutes of calibration: the path is a usable new folder name, or (with
  ``force``) an earlier dgq output (a checkpoint or a ``dgq export``); its parent is writable (probed by creating
  and removing a folder there, which also catches read-only file systems and immutable folders, where permission
  bits say nothing for root).
- :func:`atomic_folder` — everything goes to a hidden temporary folder beside the target (named after this process),
  renamed into place only when complete; temporary folders that a killed earlier run left behind are removed.
  The result gets the permissions of a folder made with ``mkdir`` under the current umask (a temporary folder is
  private while being written).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import DGQError


def _config(path: Path) -> dict:
    """``path/config.json`` as a dict, or {} when absent or unreadable."""
    cfg = Path(path) / "config.json"
    try:
        doc = json.loads(cfg.read_text()) if cfg.is_file() else {}
    except (OSError, ValueError, UnicodeDecodeError):
        return {}
    return doc if isinstance(doc, dict) else {}


def is_dgq_checkpoint(path: Path) -> bool:
    """A folder whose config.json carries a dgq ``quantization_config``."""
    q = _config(path).get("quantization_config")
    return isinstance(q, dict) and q.get("quant_method") == "dgq"


EXPORT_KEY = "dgq_export"  # config.json key of a folder `dgq export` wrote (another library's format)


GGUF_EXPORT_KEY = "dgq.export"  # metadata key of a GGUF file `dgq export` wrote


def is_dgq_gguf(path: Path) -> bool:
    """A GGUF file ``dgq export`` wrote: its metadata carries :data:`GGUF_EXPORT_KEY`."""
    try:
        with open(path, "rb") as f:
            if f.read(4) != b"GGUF":
                return False
        import gguf

        return GGUF_EXPORT_KEY in gguf.GGUFReader(path).fields
    except Exception:  # noqa: BLE001 - unreadable or corrupt: not ours
        return False


def is_dgq_export(path: Path) -> bool:
    """A folder ``dgq export`` wrote: its config.json carries :data:`EXPORT_KEY` (the source and the target), or it
    holds nothing but one GGUF file a GGUF export wrote."""
    if isinstance(_config(path).get(EXPORT_KEY), dict):
        return True
    try:
        files = list(Path(path).iterdir())
    except OSError:
        return False
    return len(files) == 1 and files[0].suffix == ".gguf" and files[0].is_file() and is_dgq_gguf(files[0])


def _nearest_existing(path: Path) -> Path:
    p = path
    while not p.exists():
        if p.parent == p:
            break
        p = p.parent
    return p


def check_writable_dir(folder: Path, what: str) -> None:
    """``folder`` (or, if it does not exist yet, its nearest existing ancestor) accepts a new entry."""
    base = _nearest_existing(Path(folder).absolute())
    if not base.is_dir():
        raise DGQError(f"{what}: {base} is a file, not a folder")
    try:
        probe = tempfile.mkdtemp(prefix=".dgq-write-probe-", dir=base)
        os.rmdir(probe)
    except OSError as e:
        raise DGQError(f"{what}: cannot write in {base} ({e.strerror or e})") from None


def check_output_dir(path, force: bool = False, what: str = "output") -> Path:
    """The output folder ``path`` as a Path, after checking that dgq may write it (see the module docstring)."""
    if path is None or not str(path).strip():
        raise DGQError(f"{what} folder name is empty")
    out = Path(path).expanduser()
    cwd = Path.cwd().resolve()
    if out.name in ("", ".", "..") or out.resolve() in (cwd, *cwd.parents):
        raise DGQError(f"{what} {path!r} names the current folder or one above it; give a new folder name")
    if out.exists() or out.is_symlink():
        if not out.is_dir():
            raise DGQError(f"{what} {out} exists and is not a folder; choose another name")
        if not force:
            raise DGQError(f"{what} {out} already exists; choose another folder or pass --force")
        if any(out.iterdir()) and not (is_dgq_checkpoint(out) or is_dgq_export(out)):
            names = sorted(p.name for p in out.iterdir())
            raise DGQError(f"{what} {out} exists and is not a dgq checkpoint (it holds {', '.join(names[:3])}"
                           f"{', …' if len(names) > 3 else ''}); --force only replaces dgq checkpoints and exports")
    check_writable_dir(out.parent, what)
    return out


def check_disk(out, need: int, what: str = "the output") -> None:
    """Refuse to start when the file system of ``out`` (a folder to be written) has less free space than ``need``
    bytes (+5%)."""
    base = Path(out).expanduser().absolute()
    while not base.exists() and base.parent != base:
        base = base.parent
    free = shutil.disk_usage(base).free
    if free < need * 1.05:
        raise DGQError(f"not enough free disk for {what}: it needs about {need / 1e9:.2f} GB, {base} has "
                       f"{free / 1e9:.2f} GB free")


def check_output_file(path, what: str = "--json") -> Path:
    """A file dgq will write at the end of a run: not a folder, and its folder writable (checked first)."""
    if path is None or not str(path).strip():
        raise DGQError(f"{what}: the file name is empty")
    p = Path(path).expanduser()
    if p.is_dir():
        raise DGQError(f"{what} {p} is a folder; give a file name")
    check_writable_dir(p.parent, what)
    return p


def _umask() -> int:
    try:  # read it without changing it (os.umask can only be read by setting it, racy in a threaded host)
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove the hidden ``.NAME.tmp-PID-*`` / ``.NAME.old-PID`` folders beside ``target`` whose process is gone
    (left by a run that was killed while saving). Returns what was removed."""
    pat = re.compile(rf"^\.{re.escape(target.name)}\.(?:tmp|old)-(\d+)(?:-.*)?$")
    removed = []
    if not target.parent.is_dir():
        return removed
    for p in target.parent.iterdir():
        m = pat.match(p.name)
        if m and p.is_dir() and not p.is_symlink() and not _pid_alive(int(m.group(1))):
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


@contextmanager
def atomic_folder(target: Path, replace: bool = False):
    """Yield a temporary folder; on success it becomes ``target``. An existing ``target`` is replaced only with
    ``replace`` (without it, the existing one is kept and the new folder discarded: another writer won)."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-{os.getpid()}-", dir=target.parent))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
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
