"""Atomic file writes and safe names.

A write goes to a temporary file in the same directory, is fsynced, renamed
over the target and the directory is fsynced, so a crash at any point
leaves either the old content or the new one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

from nwfilter.errors import StorageError


def atomic_write(path: Path, data: bytes | str, mode: int = 0o600) -> None:
    """Replace `path` with `data` atomically; raise `StorageError` on failure."""
    if isinstance(data, str):
        data = data.encode("utf-8")
    directory = path.parent
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{_temp_stem(path.name)}.", suffix=".tmp", dir=directory
        )
    except OSError as exc:
        raise StorageError(f"cannot write in '{directory}': {exc.strerror}") from exc
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
        fsync_dir(directory)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise StorageError(f"cannot write '{path}': {exc.strerror}") from exc


def _temp_stem(name: str) -> str:
    # The temporary name adds 14 bytes to the stem: keep it under NAME_MAX
    # even when the target's own name is close to it.
    return name.encode("utf-8")[:200].decode("utf-8", errors="ignore")


def atomic_remove(path: Path) -> None:
    """Remove `path` (if present) and make the removal durable."""
    try:
        path.unlink()
    except FileNotFoundError:
        return
    except OSError as exc:
        raise StorageError(f"cannot remove '{path}': {exc.strerror}") from exc
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def ensure_dir(directory: Path, mode: int = 0o700) -> Path:
    """Create `directory` if needed and check it is writable."""
    try:
        directory.mkdir(parents=True, exist_ok=True, mode=mode)
    except OSError as exc:
        raise StorageError(f"cannot create directory '{directory}': {exc.strerror}") from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise StorageError(f"directory '{directory}' is not writable")
    return directory
