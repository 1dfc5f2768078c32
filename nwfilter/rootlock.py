"""One engine per state root at a time.

Two engines on one root would each believe they own the kernel objects and
the files under it; the second's start would replace the first's rules.  An
engine therefore holds an exclusive `flock` on ROOT/run/engine.lock for its
whole life; the file names the holder, so a refusal can say who it is.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from nwfilter.errors import ConflictError, StorageError
from nwfilter.fileio import ensure_dir


class RootLock:
    def __init__(self, root: Path, owner: str) -> None:
        self.path = root / "run" / "engine.lock"
        self.owner = owner
        self._fd: int | None = None

    def acquire(self, timeout: float) -> None:
        """Take the lock, waiting up to `timeout` s for another command-line
        engine; a daemon holding it is reported at once (it never lets go)."""
        ensure_dir(self.path.parent)
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot open '{self.path}': {exc.strerror}") from exc
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self._holder(fd)
                if holder.startswith("nwfilterd") or time.monotonic() >= deadline:
                    os.close(fd)
                    raise ConflictError(
                        f"state root '{self.path.parent.parent}' is in use by "
                        f"{holder or 'another engine'}"
                    ) from None
                time.sleep(0.05)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.owner} (pid {os.getpid()})\n".encode(), 0)
        self._fd = fd

    @staticmethod
    def _holder(fd: int) -> str:
        with contextlib.suppress(OSError):
            return os.pread(fd, 200, 0).decode(errors="replace").strip()
        return ""

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
