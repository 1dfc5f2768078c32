"""One engine per state root at a time, on a root that is safe to use.

Two engines on one root would each believe they own the kernel objects and
the files under it; the second's start would replace the first's rules.  An
engine therefore holds an exclusive `flock` on ROOT/run/engine.lock for its
whole life; the file names the holder, so a refusal can say who it is.

Taking the lock opens the root and ROOT/run as checked directories
(`nwfilter.fileio.SafeDir`): a root that another user owns or can write,
or whose path another user can change, is refused before anything is
written under it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import time
from pathlib import Path

from nwfilter.errors import ConflictError, JobTimeoutError
from nwfilter.fileio import SafeDir

LOCK_NAME = "engine.lock"


class RootLock:
    def __init__(self, root: Path, owner: str) -> None:
        self.root = Path(root)
        self.path = self.root / "run" / LOCK_NAME
        self.owner = owner
        self._fd: int | None = None
        self.run_dir: SafeDir | None = None  # ROOT/run while the lock is held

    def acquire(self, timeout: float) -> None:
        """Take the lock, waiting up to `timeout` s for another command-line
        engine (then `JobTimeoutError`); a daemon holding it is reported at
        once as a `ConflictError` (it never lets go).  An unsafe root raises
        `StorageError`."""
        with SafeDir.open(self.root, what="state root") as root:
            run_dir = root.subdir("run")
        try:
            fd = run_dir.open_file(LOCK_NAME, os.O_RDWR | os.O_CREAT)
        except BaseException:
            run_dir.close()
            raise
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                holder = self._holder(fd) or "another engine"
                if holder.startswith("nwfilterd"):
                    error: Exception = ConflictError(
                        f"state root '{self.root}' is in use by {holder}"
                    )
                elif time.monotonic() >= deadline:
                    error = JobTimeoutError(
                        f"timed out after {timeout:g} s waiting for state root "
                        f"'{self.root}', in use by {holder}"
                    )
                else:
                    time.sleep(0.05)
                    continue
                os.close(fd)
                run_dir.close()
                raise error from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{self.owner} (pid {os.getpid()})\n".encode(), 0)
        self._fd = fd
        self.run_dir = run_dir

    @staticmethod
    def _holder(fd: int) -> str:
        with contextlib.suppress(OSError):
            return os.pread(fd, 200, 0).decode(errors="replace").strip()
        return ""

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self.run_dir is not None:
            self.run_dir.close()
            self.run_dir = None
