"""The domains publish what happened to them, and only what succeeded."""

from __future__ import annotations

import pytest

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
