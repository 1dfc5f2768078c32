"""What an audit reuses and what it must not: the engine's compiled
rulesets for ports whose sources did not change, an `Auditor`'s per-port
findings for ruleset objects it audited before; and the periodic audit's
events (memory backend, no root)."""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from nwfilter.audit.periodic import PeriodicAudit
from nwfilter.audit.run import Auditor
from nwfilter.backends.memory import MemoryBackend
from nwfilter.conf import parse_filter
from nwfilter.conf.model import BindingDef, FilterRef, Parameter
from nwfilter.engine import Engine
from nwfilter.events import Event, EventKind

STOCK = Path(__file__).resolve().parents[3] / "filters"
GUEST = """<filter name='guest' chain='root'>
  <filterref filter='clean-traffic'/>
  <rule action='drop' direction='out' priority='-900'>
    <udp srcportstart='67' dstportstart='68'/></rule>
</filter>"""
# The same filter without the drop of DHCP server replies: the port is exposed.
OPEN = GUEST.replace("""  <rule action='drop' direction='out' priority='-900'>
    <udp srcportstart='67' dstportstart='68'/></rule>
""", "")


def bind(n: int, flt: str = "guest") -> BindingDef:
    return BindingDef(f"vm{n}", uuid.UUID(int=n + 1), f"vnet{n}", f"52:54:00:00:00:{n:02x}",
                      FilterRef(flt, (Parameter("IP", f"10.0.0.{n + 2}"),)))


def same_uuid(engine: Engine, xml: str) -> str:
    uid = engine.pool.lookup("guest").uuid
    return xml.replace("chain='root'>", f"chain='root'><uuid>{uid}</uuid>", 1)


def restarted(root: Path, previous: Engine | None = None) -> Engine:
    if previous is not None:
        previous.close()
    engine = Engine(root, MemoryBackend(), stock_dir=STOCK)
    engine.start()
    return engine


@pytest.fixture
def root(tmp_path: Path) -> Path:
    engine = restarted(tmp_path)
    engine.define_filter(GUEST)
    engine.create_bindings([bind(0), bind(1)])
    engine.close()
    return tmp_path


@pytest.mark.parametrize("starts", [1, 2], ids=["compiled-at-start", "deferred-at-start"])
def test_an_unchanged_port_is_audited_against_the_ruleset_applied(root: Path,
                                                                  starts: int) -> None:
    engine = None
    for _ in range(starts):  # the second start defers its compiles (compiled.json)
        engine = restarted(root, engine)
    assert engine is not None
    applied = engine.backend.recorded()
    now = engine.compile_bindings()
    assert set(now) == {"vnet0", "vnet1"}
    for port in now:
        assert now[port] is applied[port]
    assert engine.compile_bindings()["vnet0"] is now["vnet0"]


def test_a_port_bound_later_is_audited_against_the_ruleset_applied(root: Path) -> None:
    engine = restarted(root)
    engine.create_bindings([bind(5)])
    assert engine.compile_bindings()["vnet5"] is engine.backend.recorded()["vnet5"]
    # Any change of the pool: the generation moved, the stamp decides.
    engine.define_filter("<filter name='lonely' chain='root'/>")
    assert engine.compile_bindings()["vnet5"] == engine.backend.recorded()["vnet5"]


def test_a_filter_changed_behind_the_engine_is_compiled_again(root: Path) -> None:
    engine = restarted(root)
    applied = engine.backend.recorded()["vnet0"]
    engine.pool.define(parse_filter(same_uuid(engine, OPEN)))
    now = engine.compile_bindings()["vnet0"]
    assert not isinstance(now, Exception)
    assert now != applied
    kinds = {f["kind"] for f in Auditor().run(engine, None)["findings"]}
    assert {"drift.altered-rule", "exposure.dhcp-server"} <= kinds


def test_an_auditor_audits_a_changed_ruleset_again(root: Path) -> None:
    engine = restarted(root)
    auditor = Auditor()
    assert auditor.run(engine, None)["findings"] == []
    assert auditor.run(engine, None)["findings"] == []
    engine.define_filter(same_uuid(engine, OPEN))
    found = auditor.run(engine, None)["findings"]
    assert sorted((f["kind"], f["port"]) for f in found) == [
        ("exposure.dhcp-server", "vnet0"), ("exposure.dhcp-server", "vnet1")]
    engine.define_filter(same_uuid(engine, GUEST))
    assert auditor.run(engine, None)["findings"] == []


def test_periodic_audit_tells_each_new_and_each_resolved_finding_once(root: Path) -> None:
    engine = restarted(root)
    engine.define_filter("<filter name='lonely' chain='root'/>")
    sub = engine.events.subscribe(frozenset({EventKind.AUDIT}))
    periodic = PeriodicAudit(engine, lambda: None, 3600)
    assert periodic.run_once()
    # The first round tells what there is.
    (event,) = sub.wait(0)
    assert (event.object, event.name, event.details["state"]) == ("filter", "lonely", "found")
    assert event.details["finding"]["kind"] == "hygiene.unused-filter"
    assert event.text().startswith("event 'audit' for filter 'lonely': new finding "
                                   "hygiene.unused-filter (info): ")
    # A finding that stays is not told again.
    assert periodic.run_once()
    assert sub.wait(0) == []
    engine.create_bindings([bind(2, "clean-traffic")])
    assert periodic.run_once()
    (event,) = sub.wait(0)
    assert (event.object, event.name, event.details["state"]) == ("port", "vnet2", "found")
    assert event.details["finding"]["kind"] == "exposure.dhcp-server"
    engine.delete_binding("vnet2")
    engine.undefine_filter("lonely")
    assert periodic.run_once()
    resolved = sub.wait(0)
    assert sorted((e.name, e.details["state"]) for e in resolved) == [
        ("lonely", "resolved"), ("vnet2", "resolved")]
    assert "finding exposure.dhcp-server (medium) resolved: " in next(
        e.text() for e in resolved if e.name == "vnet2")
    assert periodic.rounds == 4


def test_a_round_that_saw_the_state_move_tells_nothing(root: Path) -> None:
    engine = restarted(root)
    sub = engine.events.subscribe(frozenset({EventKind.AUDIT}))
    periodic = PeriodicAudit(engine, lambda: None, 3600)

    def domains() -> None:
        # Runs inside the round, after the compile: a change meanwhile.
        engine.create_bindings([bind(2, "clean-traffic")])

    periodic._domains = domains
    assert not periodic.run_once()
    assert sub.wait(0) == [] and periodic.rounds == 0
    periodic._domains = lambda: None
    assert periodic.run_once()
    assert [(e.name, e.details["state"]) for e in sub.wait(0)] == [("vnet2", "found")]


def test_the_interval_must_be_positive(root: Path) -> None:
    engine = restarted(root)
    with pytest.raises(ValueError):
        PeriodicAudit(engine, lambda: None, 0)


def test_periodic_audit_beside_changes_keeps_the_lock_order_and_adds_up(root: Path) -> None:
    """Rounds in their thread while filters and bindings change: the lock
    checker (on in every test) sees no inversion, and what the events say
    is open at the end is what an audit finds then."""
    engine = restarted(root)
    sub = engine.events.subscribe(frozenset({EventKind.AUDIT}))
    periodic = PeriodicAudit(engine, lambda: None, 0.01)
    told: list[Event] = []
    periodic.start()
    try:
        for n in range(2, 12):
            engine.create_bindings([bind(n, "clean-traffic" if n % 2 else "guest")])
            engine.define_filter(
                f"<filter name='spare{n % 3}' chain='root'><uuid>{uuid.UUID(int=900 + n % 3)}"
                f"</uuid><rule action='drop' direction='out' priority='{n}'><all/></rule>"
                "</filter>")
            if n % 4 == 0:
                engine.delete_binding(f"vnet{n - 1}")
        wanted, give_up = periodic.rounds + 2, time.monotonic() + 30
        while periodic.rounds < wanted and periodic.last_error is None:
            assert time.monotonic() < give_up, "no periodic round within 30 s"
            told.extend(sub.wait(0.05))
    finally:
        periodic.stop()
    assert periodic.last_error is None
    assert periodic.run_once()
    opened: dict[tuple[str, ...], int] = {}
    for event in told + sub.wait(0):
        f = event.details["finding"]
        key = (f["kind"], f["port"], f["filter"], f["rule"], f["message"])
        opened[key] = opened.get(key, 0) + (1 if event.details["state"] == "found" else -1)
        assert opened[key] in (0, 1), key  # told found and resolved in turn
    now = {(f["kind"], f["port"], f["filter"], f["rule"], f["message"])
           for f in Auditor().run(engine, None)["findings"]}
    assert {k for k, v in opened.items() if v == 1} == now
    assert any(k[0] == "exposure.dhcp-server" for k in now)


def test_learnt_addresses_are_sources_too(root: Path) -> None:
    engine = restarted(root)
    learning = BindingDef("vm7", uuid.UUID(int=8), "vnet7", "52:54:00:00:00:07",
                          FilterRef("guest"))
    engine.create_bindings([learning])
    held = engine.compile_bindings()["vnet7"]
    assert held is engine.backend.recorded()["vnet7"]
    engine.set_learnt("vnet7", "IP", ["10.0.0.77"])
    now = engine.compile_bindings()["vnet7"]
    assert now is not held and now == engine.backend.recorded()["vnet7"]
    assert "10.0.0.77" in repr(now) and "10.0.0.77" not in repr(held)
    assert Auditor().run(engine, None)["findings"] == []
