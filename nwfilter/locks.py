"""Named, levelled locks and the lock-order checker.

Every lock has a level (see docs/locking.md); a thread may take locks only
in increasing level order.  Two locks of one level may be held together
only where the locks say so: either both are `same_level_ok`, or both carry
a `rank` and they are taken in increasing rank (the VM-driver locks, taken
all together in registration order on the filter-change path).  When the
checker is enabled (always in tests), taking a lock out of order raises
`LockOrderError` naming both locks and the stacks that took them, so a
potential deadlock shows up as a failed test instead of a hang.

Blocking without a lock is the other half of the proof: waiting for a
domain job, running a monitor command or sleeping while holding a lock
extends that lock's hold time without bound, and a job is a resource other
threads wait for.  `LockOrderChecker.check_may_block()` raises when the
calling thread holds any lock other than the ones it names, and
`LevelledCondition.wait()` calls it, so "never wait while holding a lock"
is checked, not hoped for.

The checker also records every (held, taken) pair of lock classes it has
seen (the class of `domain:vm1` is `domain`), which tests print and check
against the documented order.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Iterable, Iterator
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
    LEAF = 7  # small tables (names in use, counters); nothing is taken under one


@dataclass
class _Held:
    lock: LevelledLock | RWLock
    stack: str


def lock_class(name: str) -> str:
    """The class of a lock name: the part before the first ':'."""
    return name.split(":", 1)[0]


class LockOrderChecker:
    """Records the locks each thread holds and refuses inversions."""

    def __init__(self) -> None:
        self.enabled = False
        self._local = threading.local()
        self.violations: list[str] = []
        self._edges_lock = threading.Lock()
        self._edges: dict[tuple[str, str], tuple[int, int]] = {}

    def held(self) -> list[_Held]:
        stack: list[_Held] | None = getattr(self._local, "held", None)
        if stack is None:
            stack = []
            self._local.held = stack
        return stack

    def held_names(self) -> tuple[str, ...]:
        """Names of the locks the calling thread holds, oldest first."""
        return tuple(h.lock.name for h in self.held())

    def before_acquire(self, lock: LevelledLock | RWLock) -> None:
        if not self.enabled:
            return
        for held in self.held():
            if held.lock is lock:
                raise self._fail(f"lock '{lock.name}' taken twice by one thread", held)
            if held.lock.level > lock.level or (
                held.lock.level == lock.level and not _same_level_allowed(held.lock, lock)
            ):
                raise self._fail(
                    f"lock order inversion: taking '{lock.name}' (level {lock.level}"
                    f"{_rank_text(lock)}) while holding '{held.lock.name}' (level "
                    f"{held.lock.level}{_rank_text(held.lock)})",
                    held,
                )

    def check_may_block(self, what: str, allowed: Iterable[LevelledLock | RWLock] = ()) -> None:
        """Raise if the calling thread holds a lock (other than `allowed`)
        while it is about to block on `what`."""
        if not self.enabled:
            return
        keep = tuple(allowed)
        for held in self.held():
            if not any(held.lock is a for a in keep):
                raise self._fail(
                    f"blocking on {what} while holding '{held.lock.name}' "
                    f"(level {held.lock.level})",
                    held,
                )

    def _fail(self, message: str, held: _Held) -> LockOrderError:
        here = "".join(traceback.format_stack(limit=14)[:-2])
        text = f"{message}\n--- held since:\n{held.stack}--- acquiring at:\n{here}"
        self.violations.append(text)
        return LockOrderError(text)

    def acquired(self, lock: LevelledLock | RWLock) -> None:
        if not self.enabled:
            return
        stack = self.held()
        if stack:
            taken = lock_class(lock.name)
            with self._edges_lock:
                for held in stack:
                    key = (lock_class(held.lock.name), taken)
                    if key not in self._edges:
                        self._edges[key] = (int(held.lock.level), int(lock.level))
        stack.append(_Held(lock, "".join(traceback.format_stack(limit=14)[:-2])))

    def released(self, lock: LevelledLock | RWLock) -> None:
        if not self.enabled:
            return
        stack = self.held()
        for i in range(len(stack) - 1, -1, -1):
            if stack[i].lock is lock:
                del stack[i]
                return

    def observed_order(self) -> list[tuple[str, int, str, int]]:
        """Every (held class, its level, taken class, its level) seen, sorted."""
        with self._edges_lock:
            items = [(a, la, b, lb) for (a, b), (la, lb) in self._edges.items()]
        return sorted(items, key=lambda e: (e[1], e[0], e[3], e[2]))

    def reset_observed(self) -> None:
        with self._edges_lock:
            self._edges.clear()


def _rank_of(lock: LevelledLock | RWLock) -> int | None:
    return lock.rank if isinstance(lock, LevelledLock) else None


def _rank_text(lock: LevelledLock | RWLock) -> str:
    rank = _rank_of(lock)
    return "" if rank is None else f", rank {rank}"


def _same_level_allowed(held: LevelledLock | RWLock, new: LevelledLock | RWLock) -> bool:
    held_rank = _rank_of(held)
    new_rank = _rank_of(new)
    if held_rank is not None and new_rank is not None:
        return held_rank < new_rank
    return held.same_level_ok and new.same_level_ok


CHECKER = LockOrderChecker()


class LevelledLock:
    """A mutex with a name and a level, usable as a context manager.

    `rank` orders locks of one level: holding rank r, a thread may take a
    lock of the same level only if its rank is greater than r.
    """

    def __init__(
        self,
        name: str,
        level: Level,
        *,
        same_level_ok: bool = False,
        rank: int | None = None,
        checker: LockOrderChecker = CHECKER,
    ) -> None:
        self.name = name
        self.level = level
        self.same_level_ok = same_level_ok
        self.rank = rank
        self._lock = threading.Lock()
        self._checker = checker

    @property
    def checker(self) -> LockOrderChecker:
        return self._checker

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

    def condition(self) -> LevelledCondition:
        """A condition variable bound to this lock."""
        return LevelledCondition(self)

    def __enter__(self) -> LevelledLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class LevelledCondition:
    """A condition variable over a `LevelledLock`.

    `wait()` releases the lock while it sleeps, so it refuses to run while
    the thread holds any other lock: that other lock would be held for as
    long as the wait lasts.
    """

    def __init__(self, lock: LevelledLock) -> None:
        self.lock = lock
        self._cond = threading.Condition(lock._lock)

    def wait(self, timeout: float | None, what: str) -> bool:
        """Wait (lock held on entry and on return); True if notified."""
        checker = self.lock.checker
        checker.check_may_block(what, allowed=(self.lock,))
        checker.released(self.lock)
        try:
            return self._cond.wait(timeout)
        finally:
            checker.acquired(self.lock)

    def wait_until(self, deadline: float, what: str) -> bool:
        """Wait until notified or `deadline` (time.monotonic()); False on timeout."""
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return False
        return self.wait(remaining, what)

    def notify_all(self) -> None:
        self._cond.notify_all()


class RWLock:
    """Readers/writer lock with writer preference, named and levelled."""

    def __init__(
        self,
        name: str,
        level: Level,
        *,
        checker: LockOrderChecker = CHECKER,
    ) -> None:
        self.name = name
        self.level = level
        self.same_level_ok = False
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
