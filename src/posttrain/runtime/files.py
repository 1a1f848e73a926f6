"""Atomic file writes (write to a temporary file in the same directory, fsync, then rename), and
what a failed write means in words (disk full, read-only, no permission)."""

from __future__ import annotations

import errno
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any


class WriteError(OSError):
    """Writing run output failed; the message says where and why (disk full, read-only, permission)."""


# Libraries that write files themselves (safetensors, torch.save) report a full disk in their own
# words, without an errno: match those texts too.
_KINDS = (
    (
        (errno.ENOSPC, errno.EDQUOT),
        ("No space left on device", "os error 28", "Disk quota exceeded", "os error 122"),
        "the disk is full",
    ),
    ((errno.EROFS,), ("Read-only file system", "os error 30"), "the file system is read-only"),
    ((errno.EACCES, errno.EPERM), ("Permission denied", "os error 13"), "permission denied"),
    ((errno.ENOTDIR,), ("Not a directory", "os error 20"), "a part of that path is a file, not a directory"),
)


def _free_bytes(path: Path) -> int | None:
    for p in (path, *path.parents):
        if p.exists():
            try:
                return shutil.disk_usage(p).free
            except OSError:
                return None
    return None


def describe_write_error(e: BaseException, where: str | Path) -> str | None:
    """ "cannot write WHERE: the disk is full (0.2 MB free)" for a failed write, or None when the failure is
    not one of the storage problems a user can act on."""
    code, text = getattr(e, "errno", None), str(e)
    for codes, texts, kind in _KINDS:
        if code in codes or any(t in text for t in texts):
            path = Path(getattr(e, "filename", None) or where)
            if kind == "the disk is full":
                free = _free_bytes(path)
                if free is not None:
                    kind += f" ({free / 1e6:.1f} MB free there)"
            return f"cannot write {path}: {kind}"
    return None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    path = Path(path)
    try:
        _atomic_write_text(path, text)
    except OSError as e:
        # Name the file the user asked for, not the hidden temporary one.
        raise OSError(e.errno, e.strerror or str(e), str(path)) from e


def _atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        # mkstemp creates the file 0600; a run's records should be as readable as any file the user writes.
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_json(path: str | Path, data: Any) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, default=str) + "\n")


def keep_steps_upto(path: str | Path, step: int) -> None:
    """Rewrite a per-step jsonl log (``{"step": N, ...}`` per line) keeping the records of steps
    <= ``step``: on resume from that step's checkpoint the later ones will be written again. A torn
    last line (the process was killed mid-write) is dropped too."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for ln in path.read_text(encoding="utf-8").splitlines():
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and rec.get("step", 0) <= step:
            kept.append(ln + "\n")
    atomic_write_text(path, "".join(kept))


def fsync_dir(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
