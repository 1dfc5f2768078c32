"""The event loop: dispatch, removal races and release of what a watch holds."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from nwfilter.domain.eventloop import EVENT_ERROR, EVENT_READABLE, EventLoop


class Counted:
    """An object with a reference count, like a domain object."""

    def __init__(self) -> None:
        self.refs = 1
        self.freed = threading.Event()
        self._lock = threading.Lock()

    def ref(self) -> Counted:
        with self._lock:
            assert self.refs > 0, "ref after release"
            self.refs += 1
        return self

    def unref(self) -> None:
        with self._lock:
            self.refs -= 1
            if self.refs == 0:
                self.freed.set()


@pytest.fixture
def loop() -> Iterator[EventLoop]:
    with EventLoop() as running:
        yield running


def wait_for(cond: object, timeout: float = 3.0) -> bool:
    assert callable(cond)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.005)
    return False


def test_fd_watch_fires_and_timer_repeats(loop: EventLoop) -> None:
    r, w = os.pipe()
    try:
        seen: list[int] = []
        ticks: list[int] = []
        watch = loop.add_handle(r, EVENT_READABLE, lambda wid, fd, ev, op: seen.append(
            len(os.read(fd, 100))))
        timer = loop.add_timeout(0.01, lambda tid, op: ticks.append(tid))
        os.write(w, b"abc")
        assert wait_for(lambda: seen == [3])
        assert wait_for(lambda: len(ticks) >= 3)
        loop.remove_timeout(timer)
        loop.remove_handle(watch)
        assert wait_for(lambda: loop.pending() == 0)
    finally:
        os.close(r)
        os.close(w)


def test_object_freed_only_after_removal_and_loop_let_go(loop: EventLoop) -> None:
    r, w = os.pipe()
    try:
        obj = Counted()
        in_callback = threading.Event()
        finish = threading.Event()
        calls: list[int] = []

        def callback(wid: int, fd: int, ev: int, opaque: object) -> None:
            calls.append(wid)
            in_callback.set()
            finish.wait(5)
            os.read(fd, 100)

        watch = loop.add_handle(r, EVENT_READABLE, callback, obj)
        assert obj.refs == 2  # the watch holds a reference
        obj.unref()  # the owner lets go of its own reference
        os.write(w, b"x")
        assert in_callback.wait(3)
        loop.remove_handle(watch)  # removed while its callback runs
        time.sleep(0.05)
        assert not obj.freed.is_set()  # the loop still uses it
        finish.set()
        assert obj.freed.wait(3)
        assert calls == [watch]
    finally:
        os.close(r)
        os.close(w)


def test_callback_after_removal_does_nothing(loop: EventLoop) -> None:
    r, w = os.pipe()
    try:
        first = threading.Event()
        release = threading.Event()
        calls: list[str] = []
        objs = [Counted(), Counted()]
        watches: list[int] = []

        def a(wid: int, fd: int, ev: int, opaque: object) -> None:
            calls.append("a")
            os.read(fd, 100)
            # removes the other watch, which was picked for this same round
            loop.remove_handle(watches[1])
            first.set()
            release.wait(5)

        def b(wid: int, fd: int, ev: int, opaque: object) -> None:
            calls.append("b")

        watches.append(loop.add_handle(r, EVENT_READABLE, a, objs[0]))
        watches.append(loop.add_handle(r, EVENT_READABLE, b, objs[1]))
        os.write(w, b"x")
        assert first.wait(3)
        release.set()
        assert wait_for(lambda: objs[1].refs == 1)
        loop.remove_handle(watches[0])
        assert wait_for(lambda: objs[0].refs == 1)
        assert calls == ["a"]
    finally:
        os.close(r)
        os.close(w)


def test_stop_releases_everything() -> None:
    obj = Counted()
    loop = EventLoop()
    loop.start()
    loop.add_timeout(-1, lambda tid, op: None, obj)
    freed: list[object] = []
    loop.add_timeout(10, lambda tid, op: None, None, free=freed.append)
    loop.stop()
    assert obj.refs == 1 and freed == [None]


def test_closed_fd_is_reported_once_and_the_loop_does_not_spin(loop: EventLoop) -> None:
    r, w = os.pipe()
    try:
        obj = Counted()
        events: list[int] = []
        watch = loop.add_handle(r, EVENT_READABLE, lambda wid, fd, ev, op: events.append(ev),
                                obj)
        obj.unref()
        os.close(r)  # behind the watch's back
        loop.add_timeout(-1, lambda tid, op: None)  # wakes the loop, which polls the closed fd
        assert wait_for(lambda: events == [EVENT_ERROR])
        cpu = time.process_time()
        time.sleep(0.3)
        assert time.process_time() - cpu < 0.15, "the loop spins on the closed fd"
        assert events == [EVENT_ERROR]
        loop.remove_handle(watch)
        assert wait_for(lambda: obj.freed.is_set())
    finally:
        os.close(w)


def test_a_stopped_loop_starts_again() -> None:
    loop = EventLoop()
    loop.start()
    loop.stop()
    loop.start()
    try:
        ticks: list[int] = []
        loop.add_timeout(0.01, lambda tid, op: ticks.append(tid))
        assert wait_for(lambda: len(ticks) >= 2)
    finally:
        loop.stop()


def test_deferred_work_runs_off_the_loop_in_order_per_queue(loop: EventLoop) -> None:
    done: list[tuple[str, int, bool]] = []
    release = threading.Event()
    finished = threading.Event()

    def work(queue: str, n: int) -> None:
        if (queue, n) == ("slow", 0):
            assert release.wait(5)  # blocks its own queue only
        if (queue, n) == ("fast", 1):
            raise RuntimeError("a failing item does not stop its queue")
        done.append((queue, n, threading.get_ident() == loop.loop_thread_id))
        if (queue, n) == ("slow", 2):
            finished.set()

    def fire(timer: int, _opaque: object) -> None:
        loop.remove_timeout(timer)
        for n in range(3):
            for queue in ("slow", "fast"):
                loop.defer(queue, lambda q=queue, i=n: work(q, i))  # type: ignore[misc]

    loop.add_timeout(0, fire)
    assert wait_for(lambda: [d for d in done if d[0] == "fast"] == [("fast", 0, False),
                                                                     ("fast", 2, False)])
    assert [d for d in done if d[0] == "slow"] == []
    release.set()
    assert finished.wait(5)
    assert [d for d in done if d[0] == "slow"] == [("slow", n, False) for n in range(3)]
