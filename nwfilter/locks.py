"""Named, levelled locks and the lock-order checker.

Every lock has a level (see docs/locking.md); a thread may take locks only
in increasing level order (equal levels only where a lock says so, e.g. the
driver locks taken all together in registration order).  When the checker
is enabled (always in tests), taking a lock out of order raises
`LockOrderError` naming both locks and the stacks that took them, so a
potential deadlock shows up as a failed test instead of a hang.
"""

from __future__ import annotations

import threading
import traceback
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from enum import IntEnum

from nwfilter.errors import JobTimeoutError, LockOrderError


class Level(IntEnum):
    ALL_DRIVERS = 1  # every registered VM driver, on the filter-change path
    DRIVER = 2  # one VM driver
    POOL = 3  # the filter pool (readers/writer)
    DOMAIN = 4  # one domain object
    BINDING = 5  # one port binding / the binding table
    BACKEND = 6  # one kernel transaction at a time


@dataclass
class _Held:
    lock: LevelledLock | RWLock
    stack: str


class LockOrderChecker:
    """Records the locks each thread holds and refuses inversions."""

    def __init__(self) -> None:
        self.enabled = False
        self._local = threading.local()
        self.violations: list[str] = []

    def held(self) -> list[_Held]:
        stack: list[_Held] | None = getattr(self._local, "held", None)
        if stack is None:
            stack = []
            self._local.held = stack
        return stack

    def before_acquire(self, lock: LevelledLock | RWLock) -> None:
        if not self.enabled:
            return
        for held in self.held():
            if held.lock is lock and not getattr(lock, "reentrant", False):
                raise self._fail(f"lock '{lock.name}' taken twice by one thread", held)
            if held.lock.level > lock.level or (
                held.lock.level == lock.level
                and held.lock is not lock
                and not lock.same_level_ok
            ):
                raise self._fail(
                    f"lock order inversion: taking '{lock.name}' (level {lock.level}) while "
                    f"holding '{held.lock.name}' (level {held.lock.level})",
                    held,
                )

    def _fail(self, message: str, held: _Held) -> LockOrderError:
        here = "".join(traceback.format_stack(limit=12)[:-2])
        text = f"{message}\n--- held since:\n{held.stack}--- acquiring at:\n{here}"
        self.violations.append(text)
        return LockOrderError(text)

    def acquired(self, lock: LevelledLock | RWLock) -> None:
        if self.enabled:
            self.held().append(_Held(lock, "".join(traceback.format_stack(limit=12)[:-2])))

    def released(self, lock: LevelledLock | RWLock) -> None:
        if not self.enabled:
            return
        stack = self.held()
        for i in range(len(stack) - 1, -1, -1):
            if stack[i].lock is lock:
                del stack[i]
                return


CHECKER = LockOrderChecker()


class LevelledLock:
    """A mutex with a name and a level, usable as a context manager."""

    def __init__(
        self,
        name: str,
        level: Level,
        *,
        same_level_ok: bool = False,
        checker: LockOrderChecker = CHECKER,
    ) -> None:
        self.name = name
        self.level = level
        self.same_level_ok = same_level_ok
        self.reentrant = False
        self._lock = threading.Lock()
        self._checker = checker

    def acquire(self, timeout: float | None = None) -> None:
        self._checker.before_acquire(self)
        if not self._lock.acquire(timeout=-1 if timeout is None else timeout):
            raise JobTimeoutError(f"timed out after {timeout}s waiting for lock '{self.name}'")
        self._checker.acquired(self)

    def release(self) -> None:
        self._checker.released(self)
        self._lock.release()

    def locked(self) -> bool:
        return self._lock.locked()

    def __enter__(self) -> LevelledLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class RWLock:
    """Readers/writer lock with writer preference, named and levelled."""

    def __init__(
        self, name: str, level: Level, *, checker: LockOrderChecker = CHECKER
    ) -> None:
        self.name = name
        self.level = level
        self.same_level_ok = False
        self.reentrant = False
        self._cond = threading.Condition(threading.Lock())
        self._readers = 0
        self._writer: int | None = None
        self._waiting_writers = 0
        self._checker = checker

    @contextmanager
    def read(self) -> Iterator[None]:
        self._checker.before_acquire(self)
        with self._cond:
            while self._writer is not None or self._waiting_writers:
                self._cond.wait()
            self._readers += 1
        self._checker.acquired(self)
        try:
            yield
        finally:
            self._checker.released(self)
            with self._cond:
                self._readers -= 1
                if not self._readers:
                    self._cond.notify_all()

    @contextmanager
    def write(self) -> Iterator[None]:
        self._checker.before_acquire(self)
        with self._cond:
            self._waiting_writers += 1
            try:
                while self._writer is not None or self._readers:
                    self._cond.wait()
            finally:
                self._waiting_writers -= 1
            self._writer = threading.get_ident()
        self._checker.acquired(self)
        try:
            yield
        finally:
            self._checker.released(self)
            with self._cond:
                self._writer = None
                self._cond.notify_all()
