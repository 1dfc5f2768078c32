"""The rebuild coordinator: the registry of VM drivers and the filter-change lock.

Every path that changes filters (define, undefine, reload) first takes the
lock of every registered VM driver, in registration order, then the filter
pool.  A VM start takes only its own driver's lock before it reads the pool,
so the (filter, domain) pair can never be taken in opposite orders by two
threads: this is the fix for libvirt's driver/filter deadlock, built in.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from nwfilter.errors import ConflictError
from nwfilter.locks import Level, LevelledLock

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DriverEntry:
    name: str
    lock: Callable[[], None]
    unlock: Callable[[], None]


class RebuildCoordinator:
    """Holds the registered VM drivers and serialises filter changes."""

    def __init__(self) -> None:
        self._drivers: list[DriverEntry] = []
        self._registered = 0  # never reused, so ranks keep increasing
        self._mutex = threading.Lock()
        # Stands for "every driver lock" in the lock-order checker, so that
        # taking it while holding a pool, domain or binding lock is reported.
        self._all = LevelledLock("all-vm-drivers", Level.ALL_DRIVERS)

    def register_driver(
        self,
        name: str,
        lock: Callable[[], None],
        unlock: Callable[[], None],
        *,
        set_rank: Callable[[int], None] | None = None,
    ) -> int:
        """Register a driver; return its rank, which is the order
        `filter_change()` takes its lock in.

        `set_rank` is called with that rank before the driver is added to
        the list, so a filter change running at the same time can only ever
        see the lock with its final rank (the lock's `rank` must be set
        before the lock-order checker compares it with another driver's).
        It runs under the coordinator's own mutex: it must take no lock."""
        with self._mutex:
            if any(d.name == name for d in self._drivers):
                raise ConflictError(f"a VM driver named '{name}' is already registered")
            rank = self._registered + 1
            if set_rank is not None:
                set_rank(rank)
            self._drivers.append(DriverEntry(name, lock, unlock))
            self._registered = rank
            return rank

    def unregister_driver(self, name: str) -> None:
        with self._mutex:
            self._drivers = [d for d in self._drivers if d.name != name]

    def drivers(self) -> tuple[DriverEntry, ...]:
        with self._mutex:
            return tuple(self._drivers)

    @contextmanager
    def filter_change(self) -> Iterator[tuple[DriverEntry, ...]]:
        """Hold every driver lock (registration order) for a filter change.

        The locks are released in reverse order, also when the body or a
        later lock fails.
        """
        self._all.acquire()
        taken: list[DriverEntry] = []
        try:
            for driver in self.drivers():
                driver.lock()
                taken.append(driver)
            yield tuple(taken)
        finally:
            for driver in reversed(taken):
                try:
                    driver.unlock()
                except Exception:  # one failing unlock must not keep the others held
                    log.exception("unlocking VM driver '%s' failed", driver.name)
            self._all.release()
