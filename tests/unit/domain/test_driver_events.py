"""The domains publish what happened to them, and only what succeeded."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import pytest

from nwfilter.conf.model import DomainDef
from nwfilter.domain.manager import DomainManager
from nwfilter.engine import Engine
from nwfilter.errors import BackendError
from nwfilter.events import Event, EventBus, EventKind
from tests.unit.domain.conftest import World, domain_xml


def _texts(events: list[Event]) -> list[str]:
    return [e.text() for e in events]


def test_a_failed_start_publishes_nothing(world: World) -> None:
    sub = world.engine.events.subscribe()
    world.manager.define_xml(domain_xml("vm1", filters=("web", "db")))
    world.backend.fail_on.add("vnet1")
    with pytest.raises(BackendError):
        world.manager.run("start", "vm1")
    assert _texts(sub.take()[0]) == ["event 'lifecycle' for domain 'vm1': Defined Added"]


def test_a_guest_found_gone_at_restart_is_told_as_crashed(world: World) -> None:
    world.manager.define_xml(domain_xml("vm1"))
    world.manager.run("start", "vm1")
    world.hv_a.crash("vm1")  # dies while the daemon is down
    world.engine.close()
    bus = EventBus()
    sub = bus.subscribe()
    engine = Engine(world.root, world.backend, stock_dir=world.root / "no-stock", events=bus)
    engine.start()
    try:
        manager = DomainManager.for_engine(engine, hypervisors={"test": world.hv_a}, job_timeout=5)
        manager.start()
        events, _ended = sub.take()
        assert [(e.kind, e.name) for e in events] == [
            (EventKind.BINDING_DELETED, "vnet0"), (EventKind.LIFECYCLE, "vm1")]
        assert events[1].text() == "event 'lifecycle' for domain 'vm1': Stopped Crashed"
    finally:
        engine.close()
        world.engine = engine  # the fixture closes it again: harmless


def test_guest_events_are_handled_on_the_event_loops_workers(world: World) -> None:
    """A hypervisor reports from the loop thread; the driver hands the event
    to the loop's workers, which take the domain's job off the loop thread."""
    from nwfilter.domain.eventloop import EventLoop, Workers
    from nwfilter.domain.objects import DomainState
    from nwfilter.domain.testvm import TestHypervisor

    class Reporting(TestHypervisor):
        sink: Callable[[str, str, str], None]

        def set_event_sink(self, sink: Callable[[str, str, str], None]) -> None:
            self.sink = sink

    class Recording(Workers):
        queues: list[str] = []

        def submit(self, queue: str, work: Callable[[], None]) -> None:
            self.queues.append(queue)
            super().submit(queue, work)

    handled_on: list[str] = []
    with EventLoop() as loop:
        loop.workers = Recording()
        hv = Reporting()
        manager = DomainManager.for_engine(world.engine, hypervisors={"test": hv},
                                           job_timeout=5, loop=loop)
        manager.start()
        manager.define_xml(domain_xml("ev1"))
        manager.run("start", "ev1")
        sub = world.engine.events.subscribe()
        original = hv.is_alive

        def is_alive(dom: DomainDef) -> bool:
            handled_on.append(threading.current_thread().name)
            return original(dom)

        hv.is_alive = is_alive  # type: ignore[method-assign]

        def report(timer: int, _opaque: object) -> None:
            loop.remove_timeout(timer)
            hv.sink("ev1", "paused", "")
            hv.crash("ev1")
            hv.sink("ev1", "exited", "crashed")

        loop.add_timeout(0, report)
        deadline = time.monotonic() + 5
        while manager.state("ev1").state is not DomainState.SHUTOFF:
            assert time.monotonic() < deadline, "the events were not handled"
            time.sleep(0.01)
        texts = _texts(sub.take()[0])
    assert "event 'lifecycle' for domain 'ev1': Suspended Paused" in texts
    assert texts[-1] == "event 'lifecycle' for domain 'ev1': Stopped Crashed"
    assert manager.state("ev1").reason == "crashed"
    assert Recording.queues == ["guest-events-test"] * 2
    assert handled_on and set(handled_on) == {"guest-events-test"}  # a worker, not the loop


@pytest.mark.parametrize("persistent", [True, False])
def test_a_destroy_whose_kill_is_reported_first_still_succeeds(
    world: World, persistent: bool
) -> None:
    """A destroy kills the guest before it waits for the domain's job; the
    guest's exit, reported meanwhile, may take the job first and shut the
    domain off as 'destroyed'.  The destroy then succeeds all the same and
    the stop is told once (QEMU under load did exactly this)."""
    from nwfilter.domain.eventloop import EventLoop
    from nwfilter.domain.objects import DomainState
    from nwfilter.domain.testvm import TestHypervisor
    from nwfilter.errors import NotFoundError

    class Killing(TestHypervisor):
        sink: Callable[[str, str, str], None]

        def set_event_sink(self, sink: Callable[[str, str, str], None]) -> None:
            self.sink = sink

        def kill(self, dom: DomainDef) -> None:
            self.crash(dom.name)
            self.sink(dom.name, "exited", "destroyed")  # as the loop reports it
            deadline = time.monotonic() + 5
            while True:  # the exit is handled before the destroy takes the job
                try:
                    if manager.state(dom.name).state is DomainState.SHUTOFF:
                        return
                except NotFoundError:
                    return  # a transient domain is gone with it
                assert time.monotonic() < deadline, "the exit was not handled"
                time.sleep(0.01)

    with EventLoop() as loop:
        hv = Killing()
        manager = DomainManager.for_engine(world.engine, hypervisors={"test": hv},
                                           job_timeout=5, loop=loop)
        manager.start()
        manager.define_xml(domain_xml("k1"))
        manager.run("start", "k1")
        if not persistent:
            manager.run("undefine", "k1")  # running, so it stays until it stops
        sub = world.engine.events.subscribe()
        manager.run("destroy", "k1")
        # The exit's handler may still be telling the stop of a transient
        # domain that is already gone when the destroy returns.
        texts: list[str] = []
        deadline = time.monotonic() + 5
        while not any("Stopped" in t for t in texts) and time.monotonic() < deadline:
            texts += _texts(sub.wait(0.1))
        texts += _texts(sub.wait(0.2))  # a second stop would come now
    stopped = [t for t in texts if "Stopped" in t]
    assert stopped == ["event 'lifecycle' for domain 'k1': Stopped Destroyed"]
    if persistent:
        assert (manager.state("k1").state, manager.state("k1").reason) == (
            DomainState.SHUTOFF, "destroyed")
    else:
        with pytest.raises(NotFoundError):
            manager.state("k1")
    assert world.engine.list_bindings() == []
