"""An event loop in its own thread: fd watches and timers.

It follows libvirt's poll loop (src/util/vireventpoll.c) where that loop's
rules keep objects alive and callbacks harmless:

* A watch or timer may hold a reference to the object its callback serves
  (`opaque` with `ref()`/`unref()`, such as a `DomainObj`): it is taken
  when the watch is added and given back only when the watch is gone.
* Removing a watch marks it deleted at once; a callback that would fire
  later (already selected for dispatch, or racing with the removal from
  another thread) sees the mark and does nothing.
* The object is released (`unref()`, then the `free` callback) only after
  the owner removed the watch *and* the loop let go of it: never while its
  callback is running, and always from the loop thread, outside the loop's
  own lock, so a release callback may take any lock.
* Callbacks run with no loop lock held, so they may add, update or remove
  watches, including their own.
* A watched fd that was closed (poll reports POLLNVAL) is reported to its
  callback once as `EVENT_ERROR`, as libvirt does; then the loop stops
  polling it until its owner updates or removes the watch, so a closed fd
  cannot make the loop spin.
* A stopped loop can be started again.

Work that may block (a guest event waits for its domain's job) is never
done on the loop thread: a callback hands it to `defer(queue, work)`, and
the loop's `Workers` run it on a worker thread, in order within its queue
(libvirt's driver worker pool does the same for its monitor events).
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import os
import select
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from nwfilter.errors import StateError

log = logging.getLogger(__name__)

EVENT_READABLE = select.POLLIN
EVENT_WRITABLE = select.POLLOUT
EVENT_ERROR = select.POLLERR
EVENT_HANGUP = select.POLLHUP
_POLL_INVALID = select.POLLNVAL


class Referenced(Protocol):
    def ref(self) -> object: ...

    def unref(self) -> None: ...


HandleCallback = Callable[[int, int, int, object], None]  # (watch, fd, events, opaque)
TimerCallback = Callable[[int, object], None]  # (timer, opaque)
FreeCallback = Callable[[object], None]


@dataclass
class _Watch:
    ident: int
    opaque: object
    free: FreeCallback | None
    deleted: bool = False
    dispatching: int = 0


@dataclass
class _Handle(_Watch):
    fd: int = -1
    events: int = 0
    callback: HandleCallback | None = None
    invalid: bool = False  # its fd was reported closed; not polled until updated


@dataclass
class _Timer(_Watch):
    interval: float = -1.0  # seconds; < 0 disabled, 0 every iteration
    due: float = 0.0
    callback: TimerCallback | None = None


class Workers:
    """Blocking work handed off by loop callbacks: each queue's work runs in
    the order it came, on a worker thread of that queue started on demand
    (and ended once the queue is empty)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()  # a leaf: guards `_queues`
        self._queues: dict[str, deque[Callable[[], None]]] = {}

    def submit(self, queue: str, work: Callable[[], None]) -> None:
        """Queue `work` behind `queue`'s earlier work; never blocks."""
        with self._lock:
            pending = self._queues.get(queue)
            if pending is not None:
                pending.append(work)
                return
            self._queues[queue] = deque([work])
        threading.Thread(target=self._drain, args=(queue,), name=queue, daemon=True).start()

    def _drain(self, queue: str) -> None:
        while True:
            with self._lock:
                pending = self._queues[queue]
                if not pending:
                    del self._queues[queue]
                    return
                work = pending.popleft()
            try:
                work()
            except Exception:
                log.exception("%s: deferred work failed", queue)


class EventLoop:
    """fd watches and timers dispatched by one thread."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._lock = threading.Lock()  # leaf: never held while calling out
        self._handles: dict[int, _Handle] = {}
        self._timers: dict[int, _Timer] = {}
        self._ids = itertools.count(1)
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None
        self._stopping = False
        self.loop_thread_id: int | None = None
        self.workers = Workers()

    # -- life cycle --------------------------------------------------------

    def start(self) -> None:
        if self._thread is not None:
            raise StateError("event loop already started")
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_r, False)
        os.set_blocking(wake_w, False)
        with self._lock:
            self._wake_r, self._wake_w = wake_r, wake_w
            self._stopping = False
        self._thread = threading.Thread(target=self._run, name="nwfilter-eventloop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread, remove every watch and release what they hold."""
        thread = self._thread
        if thread is None:
            return
        with self._lock:
            self._stopping = True
            for handle in self._handles.values():
                handle.deleted = True
            for timer in self._timers.values():
                timer.deleted = True
        self._wake()
        thread.join()
        self._thread = None
        self._cleanup()
        with self._lock:
            wake_r, wake_w = self._wake_r, self._wake_w
            self._wake_r, self._wake_w = -1, -1
        os.close(wake_r)
        os.close(wake_w)

    def __enter__(self) -> EventLoop:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def defer(self, queue: str, work: Callable[[], None]) -> None:
        """Run `work`, which may block, off the loop thread, after the
        earlier work of `queue` (see `Workers`)."""
        self.workers.submit(queue, work)

    # -- watches -----------------------------------------------------------

    def add_handle(
        self,
        fd: int,
        events: int,
        callback: HandleCallback,
        opaque: object = None,
        free: FreeCallback | None = None,
    ) -> int:
        _take_ref(opaque)
        with self._lock:
            ident = next(self._ids)
            self._handles[ident] = _Handle(ident, opaque, free, fd=fd, events=events,
                                           callback=callback)
        self._wake()
        return ident

    def update_handle(self, watch: int, events: int) -> None:
        with self._lock:
            handle = self._handles.get(watch)
            if handle is None or handle.deleted:
                raise StateError(f"no fd watch {watch}")
            handle.events = events
            handle.invalid = False
        self._wake()

    def remove_handle(self, watch: int) -> None:
        with self._lock:
            handle = self._handles.get(watch)
            if handle is None or handle.deleted:
                raise StateError(f"no fd watch {watch}")
            handle.deleted = True
        self._wake()

    def add_timeout(
        self,
        interval: float,
        callback: TimerCallback,
        opaque: object = None,
        free: FreeCallback | None = None,
    ) -> int:
        """A timer firing every `interval` seconds (0: every iteration, < 0: off)."""
        _take_ref(opaque)
        with self._lock:
            ident = next(self._ids)
            self._timers[ident] = _Timer(ident, opaque, free, interval=interval,
                                         due=self._clock() + max(interval, 0.0),
                                         callback=callback)
        self._wake()
        return ident

    def update_timeout(self, timer: int, interval: float) -> None:
        with self._lock:
            entry = self._timers.get(timer)
            if entry is None or entry.deleted:
                raise StateError(f"no timer {timer}")
            entry.interval = interval
            entry.due = self._clock() + max(interval, 0.0)
        self._wake()

    def remove_timeout(self, timer: int) -> None:
        with self._lock:
            entry = self._timers.get(timer)
            if entry is None or entry.deleted:
                raise StateError(f"no timer {timer}")
            entry.deleted = True
        self._wake()

    def pending(self) -> int:
        """Watches and timers not yet released (deleted ones included)."""
        with self._lock:
            return len(self._handles) + len(self._timers)

    # -- the loop ------------------------------------------------------------

    def _wake(self) -> None:
        # Under the lock, so stop() cannot close the pipe in between (and
        # the fd number be reused) after it was read; the write never blocks.
        with self._lock:
            if self._wake_w >= 0:
                with contextlib.suppress(BlockingIOError, OSError):
                    os.write(self._wake_w, b"x")

    def _run(self) -> None:
        self.loop_thread_id = threading.get_ident()
        while True:
            with self._lock:
                if self._stopping:
                    break
                poller = select.poll()
                poller.register(self._wake_r, select.POLLIN)
                fds: dict[int, list[_Handle]] = {}
                for handle in self._handles.values():
                    if not handle.deleted and not handle.invalid and handle.events:
                        fds.setdefault(handle.fd, []).append(handle)
                for fd, handles in fds.items():
                    mask = 0
                    for handle in handles:
                        mask |= handle.events
                    poller.register(fd, mask)
                timeout = self._next_timeout()
            try:
                ready = poller.poll(None if timeout is None else int(timeout * 1000) + 1)
            except InterruptedError:
                ready = []
            if any(fd == self._wake_r for fd, _ in ready):
                with contextlib.suppress(BlockingIOError):
                    while os.read(self._wake_r, 4096):
                        pass
            self._dispatch_timers()
            self._dispatch_handles([(fd, ev) for fd, ev in ready if fd != self._wake_r])
            self._cleanup()

    def _next_timeout(self) -> float | None:
        now = self._clock()
        soonest: float | None = None
        for timer in self._timers.values():
            if timer.deleted or timer.interval < 0:
                continue
            wait = max(0.0, timer.due - now)
            soonest = wait if soonest is None else min(soonest, wait)
        return soonest

    def _dispatch_timers(self) -> None:
        now = self._clock()
        with self._lock:
            due = [t for t in self._timers.values()
                   if not t.deleted and t.interval >= 0 and t.due <= now]
            for timer in due:
                timer.dispatching += 1
                timer.due = now + timer.interval
        for timer in due:
            try:
                # the owner may have removed it since it was picked
                with self._lock:
                    live = not timer.deleted
                if live and timer.callback is not None:
                    timer.callback(timer.ident, timer.opaque)
            except Exception:
                log.exception("timer %d callback failed", timer.ident)
            finally:
                with self._lock:
                    timer.dispatching -= 1

    def _dispatch_handles(self, ready: list[tuple[int, int]]) -> None:
        with self._lock:
            picked: list[tuple[_Handle, int]] = []
            for fd, revents in ready:
                for handle in self._handles.values():
                    if handle.fd == fd and not handle.deleted and not handle.invalid:
                        got = revents & (handle.events | EVENT_ERROR | EVENT_HANGUP)
                        if revents & _POLL_INVALID:
                            # The fd was closed under the watch: poll would
                            # report it again at once on every round.
                            log.warning("fd watch %d: fd %d is not open", handle.ident, fd)
                            handle.invalid = True
                            got |= EVENT_ERROR
                        if got:
                            handle.dispatching += 1
                            picked.append((handle, got))
        for handle, got in picked:
            try:
                with self._lock:
                    live = not handle.deleted
                if live and handle.callback is not None:
                    handle.callback(handle.ident, handle.fd, got, handle.opaque)
            except Exception:
                log.exception("fd watch %d callback failed", handle.ident)
            finally:
                with self._lock:
                    handle.dispatching -= 1

    def _cleanup(self) -> None:
        gone: list[_Watch] = []
        with self._lock:
            for table in (self._handles, self._timers):
                for ident in [i for i, w in table.items() if w.deleted and not w.dispatching]:
                    gone.append(table.pop(ident))
        for watch in gone:
            _release(watch)


def _take_ref(opaque: object) -> None:
    ref = getattr(opaque, "ref", None)
    if callable(ref) and callable(getattr(opaque, "unref", None)):
        ref()


def _release(watch: _Watch) -> None:
    try:
        unref = getattr(watch.opaque, "unref", None)
        if callable(unref) and callable(getattr(watch.opaque, "ref", None)):
            unref()
        if watch.free is not None:
            watch.free(watch.opaque)
    except Exception:
        log.exception("releasing watch %d failed", watch.ident)
