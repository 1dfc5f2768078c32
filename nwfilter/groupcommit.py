"""Group commit: requests that arrive together share one commit.

Callers `submit` a request; it joins a queue, then the caller takes the
commit slot.  Whoever holds the slot is the leader: if a previous leader
already committed its request, it returns at once; otherwise it enters the
`hold` context (the locks the commit needs), takes every request queued by
then, and hands them to `commit`, which gives each request its own outcome
(`Pending.fail`, `Pending.succeed`).  Requests that queue meanwhile wait on the slot and form
the next batch.  Nobody waits for a batch to form: a leader commits what
is queued when it has its locks, so a lone request costs one commit, as
before, and a burst costs about one commit per commit time.

Locking: the slot is a `LevelledLock` at the driver level with a rank above
every driver's, so it is taken after any driver lock a caller holds and
before the filter pool; a slot holder never takes a driver lock (the
checker refuses it).  Waiting for the slot is an ordinary lock wait, which
the lock-order checker sees.  The queue's own mutex is a leaf.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Generic, TypeVar

from nwfilter.errors import NwfilterError
from nwfilter.locks import Level, LevelledLock

log = logging.getLogger(__name__)

T = TypeVar("T")

#: the slot's rank: above every driver lock's (`RebuildCoordinator` numbers
#: them from 1 in registration order)
SLOT_RANK = 1 << 30


class Pending(Generic[T]):
    """One queued request: its item and the outcome `commit` gives it."""

    __slots__ = ("done", "error", "item", "ok")

    def __init__(self, item: T) -> None:
        self.item = item
        self.error: NwfilterError | None = None
        self.ok = False  # committed
        self.done = False  # a leader has finished with it

    def fail(self, error: NwfilterError) -> None:
        """Record why this request failed (the first reason counts)."""
        if self.error is None and not self.ok:
            self.error = error

    def succeed(self) -> None:
        """Record that this request is committed."""
        if self.error is None:
            self.ok = True


class CommitQueue(Generic[T]):
    """A queue of requests committed in batches by whoever holds the slot."""

    def __init__(
        self,
        name: str,
        commit: Callable[[list[Pending[T]]], None],
        hold: Callable[[], AbstractContextManager[object]],
    ) -> None:
        self._commit = commit
        self._hold = hold
        self.slot = LevelledLock(f"commit-slot:{name}", Level.DRIVER, rank=SLOT_RANK)
        self._mutex = LevelledLock(f"commit-queue:{name}", Level.LEAF)
        self._queue: list[Pending[T]] = []
        # Read by tests and benchmarks; written under the slot.
        self.batches = 0
        self.requests = 0

    def pending(self) -> int:
        """How many requests are queued and not yet taken by a leader."""
        with self._mutex:
            return len(self._queue)

    def submit(self, item: T) -> None:
        """Commit `item` (alone or with whatever else is queued); raise its
        own error if it failed."""
        request = Pending(item)
        with self._mutex:
            self._queue.append(request)
        try:
            with self.slot:
                if not request.done:
                    self._lead()
        except BaseException:
            # The slot or the commit's locks could not be taken (an order
            # the checker refuses, an interrupt): a request still queued
            # leaves with its caller; the others stay for the next leader.
            with self._mutex:
                self._queue = [r for r in self._queue if r is not request]
            raise
        if request.error is not None:
            raise request.error

    def _lead(self) -> None:
        batch: list[Pending[T]] = []
        try:
            with self._hold():
                with self._mutex:
                    batch, self._queue = self._queue, []
                self.batches += 1
                self.requests += len(batch)
                self._commit(batch)
        except Exception as exc:
            if not batch:
                raise  # the locks could not be taken; nothing was taken from the queue
            # A fault of the commit itself (a request's refusal is recorded
            # by `commit`, which marks a request committed only once all of
            # it is in force): every request it left undecided fails with it.
            if isinstance(exc, NwfilterError):
                reason = exc
                log.error("committing %d request(s) failed: %s", len(batch), exc.message)
            else:
                reason = NwfilterError(f"internal error while committing: {exc!r}")
                log.exception("committing %d request(s) failed", len(batch))
            for request in batch:
                if not request.ok:
                    request.fail(copy_error(reason))
        except BaseException:
            for request in batch:
                if not request.ok:
                    request.fail(NwfilterError("interrupted while committing"))
            raise
        finally:
            for request in batch:
                request.done = True
        if len(batch) > 1:
            log.debug("committed %d requests together", len(batch))


def copy_error(error: NwfilterError) -> NwfilterError:
    """A fresh error of the same class and message: one exception object is
    raised in one thread only."""
    try:
        return type(error)(error.message, error.code)
    except TypeError:
        return NwfilterError(error.message, error.code)
