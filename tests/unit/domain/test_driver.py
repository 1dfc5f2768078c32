"""The domain driver: lifecycle, files, filters following domains, restart."""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from pathlib import Path

import pytest

from nwfilter.conf.model import DomainDef, InterfaceDef
from nwfilter.domain.jobs import JobKind
from nwfilter.domain.manager import DomainManager
from nwfilter.domain.objects import DomainState
from nwfilter.engine import Engine
from nwfilter.errors import (
    BackendError,
    ConflictError,
    NotFoundError,
    StateError,
    StorageError,
    ValidationError,
)
from tests.unit.domain.conftest import World, domain_xml, filter_xml


def test_start_binds_every_filtered_interface_and_stop_removes(world: World) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1", filters=("web", None, "db")))
    m.run("start", "vm1")
    assert world.backend.ports() == ("vnet0", "vnet2")
    rows = m.interfaces("vm1")
    assert [r.interface for r in rows] == ["vnet0", "vnet1", "vnet2"]
    assert [r.filter for r in rows] == ["web", None, "db"]
    assert world.hv_a.guests() == {"vm1": "running"}
    binding = world.engine.binding("vnet0")
    assert binding.owner_name == "vm1" and binding.mac == rows[0].mac
    m.run("destroy", "vm1")
    assert world.backend.ports() == ()
    assert world.engine.list_bindings() == []
    assert m.state("vm1").state is DomainState.SHUTOFF
    assert not (world.root / "run" / "domains" / "vm1.json").exists()


def test_generated_mac_is_stored_in_persistent_definition(world: World) -> None:
    world.manager.define_xml(domain_xml("vm1"))
    first = world.manager.dumpxml("vm1")
    assert "52:54:00:" in first
    assert (world.root / "domains" / "vm1.xml").read_text() == first


def test_portdevs_unique_across_drivers(world: World) -> None:
    m = world.manager
    m.define_xml(domain_xml("a", "test"))
    m.define_xml(domain_xml("b", "ns"))
    m.define_xml(domain_xml("c", "test", target="vnet1"))
    m.run("start", "a")
    m.run("start", "b")
    with pytest.raises(ConflictError, match="vnet1"):
        m.run("start", "c")
    assert world.backend.ports() == ("vnet0", "vnet1")
    m.run("destroy", "b")
    m.run("start", "c")
    assert world.backend.ports() == ("vnet0", "vnet1")
    assert {b.owner_name for b in world.engine.list_bindings()} == {"a", "c"}


def test_names_unique_across_drivers(world: World) -> None:
    world.manager.define_xml(domain_xml("a", "test"))
    with pytest.raises(ConflictError):
        world.manager.define_xml(domain_xml("a", "ns"))


def test_fail_closed_when_a_filter_cannot_be_applied(world: World) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1", filters=("web", "db")))
    world.backend.fail_on.add("vnet1")
    with pytest.raises(BackendError):
        m.run("start", "vm1")
    assert world.backend.ports() == ()
    assert world.engine.list_bindings() == []
    assert world.hv_a.guests() == {}
    assert m.state("vm1").state is DomainState.SHUTOFF
    world.backend.fail_on.clear()
    m.run("start", "vm1")  # the port names were given back
    assert world.backend.ports() == ("vnet0", "vnet1")


def test_fail_closed_when_filter_missing_or_launch_fails(world: World) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1", filters=("web", "nosuch")))
    with pytest.raises(Exception, match="nosuch"):
        m.run("start", "vm1")
    assert world.backend.ports() == () and world.hv_a.guests() == {}
    m.define_xml(domain_xml("vm2"))
    world.hv_a.fail_next("launch")
    with pytest.raises(BackendError):
        m.run("start", "vm2")
    assert world.backend.ports() == () and world.engine.list_bindings() == []


def test_filter_redefine_rebuilds_running_domains(world: World) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1"))
    m.define_xml(domain_xml("vm2", "ns"))
    m.run("start", "vm1")
    m.run("start", "vm2")
    before = world.backend.transactions
    world.engine.define_filter(filter_xml("web", 8443))
    assert world.backend.transactions == before + 1  # one transaction for both
    for port in ("vnet0", "vnet1"):
        assert "8443" in world.backend.read_back(port)


def test_suspend_resume_and_state_checks(world: World) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1"))
    with pytest.raises(StateError):
        m.run("suspend", "vm1")
    m.run("start", "vm1")
    with pytest.raises(StateError):
        m.run("start", "vm1")
    m.run("suspend", "vm1")
    assert m.state("vm1").state is DomainState.PAUSED
    with pytest.raises(StateError):
        m.run("suspend", "vm1")
    m.run("resume", "vm1")
    assert m.state("vm1").state is DomainState.RUNNING
    m.run("shutdown", "vm1")
    assert m.state("vm1").reason == "shutdown"


def test_undefine_running_domain_goes_at_stop(world: World) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1"))
    m.run("start", "vm1")
    m.run("undefine", "vm1")
    assert not (world.root / "domains" / "vm1.xml").exists()
    assert not m.state("vm1").persistent
    m.run("destroy", "vm1")
    with pytest.raises(NotFoundError):
        m.state("vm1")
    m.define_xml(domain_xml("vm1", "ns"))  # the name is free again, any type


def test_list_orders_active_by_id_then_inactive_by_name(world: World) -> None:
    m = world.manager
    for name in ("c", "a", "b"):
        m.define_xml(domain_xml(name, filters=()))
    m.run("start", "c")
    m.run("start", "b")
    assert [r.name for r in m.list_domains()] == ["c", "b"]
    assert [r.name for r in m.list_domains(all_domains=True)] == ["c", "b", "a"]


def test_autostart_marks_and_redefine_while_running(world: World) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1"))
    m.set_autostart("vm1", True)
    assert (world.root / "domains" / "autostart" / "vm1").exists()
    m.run("start", "vm1")
    m.define_xml(domain_xml("vm1", filters=("db",)).replace(
        "<name>vm1</name>", f"<name>vm1</name><uuid>{m.state('vm1').uuid}</uuid>"))
    assert "web" in m.dumpxml("vm1") and "db" in m.dumpxml("vm1", inactive=True)
    m.run("destroy", "vm1")
    assert "db" in m.dumpxml("vm1")
    m.set_autostart("vm1", False)
    assert not (world.root / "domains" / "autostart" / "vm1").exists()


def test_restart_finds_running_domains_and_reapplies_filters(world: World) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1"))
    m.define_xml(domain_xml("vm2", "ns"))
    m.define_xml(domain_xml("vm3"))
    m.run("start", "vm1")
    m.run("start", "vm2")
    m.run("start", "vm3")
    status = json.loads((world.root / "run" / "domains" / "vm1.json").read_text())
    assert status["state"] == "RUNNING" and status["ports"][0]["portdev"] == "vnet0"
    world.hv_a.crash("vm3")  # dies while the daemon is down
    world.backend.clear("vnet0")  # and the kernel lost vm1's rules
    again = world.restart()
    rows = {r.name: r for r in again.manager.list_domains(all_domains=True)}
    assert rows["vm1"].state is DomainState.RUNNING and rows["vm1"].id == 1
    assert rows["vm2"].state is DomainState.RUNNING
    assert rows["vm3"].state is DomainState.SHUTOFF and rows["vm3"].reason == "crashed"
    assert again.backend.ports() == ("vnet0", "vnet1")
    assert "port vnet0" in again.backend.read_back("vnet0")
    # new ids continue above the old ones, port names stay taken
    again.manager.run("start", "vm3")
    assert again.manager.state("vm3").id == 3  # above every running id, as libvirt
    assert again.manager.interfaces("vm3")[0].interface == "vnet2"


def test_bad_names_are_refused(world: World) -> None:
    with pytest.raises(Exception, match="name"):
        world.manager.run("start", "../etc")


# -- failures part-way and concurrent changes ------------------------------------------


def _with_uuid(xml: str, name: str, uid: uuid.UUID) -> str:
    return xml.replace(f"<name>{name}</name>", f"<name>{name}</name><uuid>{uid}</uuid>")


def test_failed_stop_keeps_the_domain_running_with_its_filters(world: World) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1"))
    m.run("start", "vm1")
    world.hv_a.fail_next("stop")
    with pytest.raises(BackendError):
        m.run("destroy", "vm1")
    assert m.state("vm1").state is DomainState.RUNNING
    assert world.hv_a.guests() == {"vm1": "running"}
    assert world.backend.ports() == ("vnet0",)
    assert [b.portdev for b in world.engine.list_bindings()] == ["vnet0"]
    assert (world.root / "run" / "domains" / "vm1.json").exists()
    m.run("destroy", "vm1")
    assert world.backend.ports() == () and world.hv_a.guests() == {}
    assert m.state("vm1").state is DomainState.SHUTOFF


def test_define_while_starting_becomes_the_next_definition(world: World) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1"))
    uid = m.state("vm1").uuid
    world.hv_a.set_delay("launch", 0.3)
    errors: list[BaseException] = []

    def start() -> None:
        try:
            m.run("start", "vm1")
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=start, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while ("launch", "vm1") not in world.hv_a.calls:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    m.define_xml(_with_uuid(domain_xml("vm1", filters=("db",)), "vm1", uid))
    thread.join(5)
    assert errors == []
    web, db = "filter='web'", "filter='db'"
    assert web in m.dumpxml("vm1") and db not in m.dumpxml("vm1")
    assert db in m.dumpxml("vm1", inactive=True)
    assert db in (world.root / "domains" / "vm1.xml").read_text()
    m.run("destroy", "vm1")
    assert db in m.dumpxml("vm1")


def test_refused_start_reserves_no_port_name(world: World) -> None:
    m = world.manager
    driver = m.driver("test")
    bare = DomainDef("test", "bare", uuid.uuid4(), (InterfaceDef(source_bridge="br0"),))
    m.names.claim_domain("bare", bare.uuid, "test")
    obj, _ = driver.domains.add(bare, persistent=False)
    obj.end_api()
    with pytest.raises(ValidationError, match="no MAC"):
        m.run("start", "bare")
    assert m.names.reserve_ports("someone", [None]) == ["vnet0"]


def test_hand_written_definition_gets_lasting_macs_at_load(world: World) -> None:
    xml = _with_uuid(domain_xml("hand"), "hand", uuid.uuid4())
    path = world.root / "domains" / "hand.xml"
    path.write_text(xml)
    again = world.restart()
    stored = path.read_text()
    assert "52:54:00:" in stored
    assert again.manager.dumpxml("hand") == stored
    again.manager.run("start", "hand")
    assert again.manager.interfaces("hand")[0].mac in stored


def test_failed_define_changes_nothing(world: World, monkeypatch: pytest.MonkeyPatch) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1"))
    uid = m.state("vm1").uuid
    m.define_xml(domain_xml("vm2"))
    m.run("start", "vm2")
    uid2 = m.state("vm2").uuid

    def no_space(definition: DomainDef) -> None:
        raise StorageError("no space left on device")

    monkeypatch.setattr(m.driver("test"), "save_config", no_space)
    with pytest.raises(StorageError):
        m.define_xml(_with_uuid(domain_xml("vm1", filters=("db",)), "vm1", uid))
    assert "filter='db'" not in m.dumpxml("vm1")
    with pytest.raises(StorageError):
        m.define_xml(_with_uuid(domain_xml("vm2", filters=("db",)), "vm2", uid2))
    assert "filter='db'" not in m.dumpxml("vm2", inactive=True)
    with pytest.raises(StorageError):
        m.define_xml(domain_xml("vm3"))
    with pytest.raises(NotFoundError):
        m.state("vm3")


def test_autostart_fails_for_a_domain_removed_meanwhile(world: World) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1"))
    driver = m.driver("test")
    obj = driver.domains.lookup_by_name("vm1")
    obj.job.begin(JobKind.MODIFY, "undefine")  # an undefine is under way
    obj.unlock()
    errors: list[BaseException] = []

    def autostart() -> None:
        try:
            m.set_autostart("vm1", True)
        except BaseException as exc:
            errors.append(exc)

    thread = threading.Thread(target=autostart, daemon=True)
    thread.start()
    deadline = time.monotonic() + 5
    while True:
        with obj.mutex:
            if obj.job.waiters:
                break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    # ... and removes the domain, then lets go of the job
    obj.lock()
    (world.root / "domains" / "vm1.xml").unlink()
    driver.domains.remove(obj)
    m.names.release_domain("vm1")
    obj.job.end()
    obj.end_api()
    thread.join(5)
    assert len(errors) == 1 and isinstance(errors[0], NotFoundError)
    assert not (world.root / "domains" / "autostart" / "vm1").exists()


def test_a_conflicting_definition_is_skipped_at_load(world: World) -> None:
    m = world.manager
    m.define_xml(domain_xml("a"))
    m.define_xml(domain_xml("b"))
    m.run("start", "b")
    uid_a, uid_b = m.state("a").uuid, m.state("b").uuid
    (world.root / "domains" / "c.xml").write_text(
        _with_uuid(domain_xml("c"), "c", uid_a))  # a copy that kept a's UUID
    again = world.restart()
    rows = {r.name: r for r in again.manager.list_domains(all_domains=True)}
    assert sorted(rows) == ["a", "b"]
    assert rows["a"].uuid == uid_a and rows["b"].uuid == uid_b
    assert rows["b"].state is DomainState.RUNNING


def test_status_write_failure_after_launch_stops_the_guest(
    world: World, monkeypatch: pytest.MonkeyPatch
) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1"))

    def no_space(obj: object) -> None:
        raise StorageError("no space left on device")

    monkeypatch.setattr(m.driver("test"), "save_status", no_space)
    with pytest.raises(StorageError):
        m.run("start", "vm1")
    assert world.hv_a.guests() == {}
    assert world.backend.ports() == () and world.engine.list_bindings() == []
    assert m.state("vm1").state is DomainState.SHUTOFF
    # a guest that cannot be stopped keeps its filters and stays listed as running
    world.hv_a.fail_next("stop")
    with pytest.raises(StorageError):
        m.run("start", "vm1")
    assert world.hv_a.guests() == {"vm1": "running"}
    assert m.state("vm1").state is DomainState.RUNNING
    assert world.backend.ports() == ("vnet0",)
    monkeypatch.undo()
    m.run("destroy", "vm1")
    m.run("start", "vm1")
    assert m.interfaces("vm1")[0].interface == "vnet0"


# -- loaded for queries only -------------------------------------------------------------


def _files(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes()
        for top in ("domains", "run") for p in sorted((root / top).rglob("*")) if p.is_file()
    }


def test_query_mode_on_a_read_only_engine_changes_nothing(
    world: World, caplog: pytest.LogCaptureFixture
) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1", filters=("web", None)))
    m.define_xml(domain_xml("vm2"))
    m.define_xml(domain_xml("vm3"))
    m.run("start", "vm1")
    m.run("start", "vm3")
    m.set_autostart("vm2", True)
    live_xml = m.dumpxml("vm1")
    world.hv_a.crash("vm3")  # its bindings and status stay until the daemon looks
    world.engine.close()
    files = _files(world.root)
    calls = list(world.hv_a.calls)
    transactions = world.backend.transactions

    engine = Engine(world.root, world.backend, stock_dir=world.root / "no-stock")
    engine.start(read_only=True)
    try:
        query = DomainManager.for_engine(
            engine, hypervisors={"test": world.hv_a, "ns": world.hv_b}, job_timeout=5
        )
        with caplog.at_level(logging.WARNING):
            query.start(take_over=False)
        assert [r for r in caplog.records if r.levelno >= logging.WARNING] == []
        rows = {r.name: r for r in query.list_domains(all_domains=True)}
        assert [r.name for r in query.list_domains()] == ["vm1"]
        assert rows["vm1"].id == 1 and rows["vm1"].state is DomainState.RUNNING
        assert rows["vm2"].state is DomainState.SHUTOFF and rows["vm2"].autostart
        assert rows["vm3"].state is DomainState.SHUTOFF and rows["vm3"].reason == "crashed"
        assert query.state("vm1").reason == "booted"
        assert query.dumpxml("vm1") == live_xml
        assert [(r.interface, r.filter) for r in query.interfaces("vm1")] == [
            ("vnet0", "web"), ("vnet1", None)]
        with pytest.raises(StateError):
            query.run("destroy", "vm1")
        with pytest.raises(StateError):
            query.run("start", "vm2")
        with pytest.raises(StateError):
            query.define_xml(domain_xml("vm4"))
        assert _files(world.root) == files
        assert world.hv_a.calls == calls
        assert world.backend.transactions == transactions
        assert [b.portdev for b in engine.list_bindings()] == ["vnet0", "vnet2"]
        with pytest.raises(ValueError):
            query.start(autostart=True, take_over=False)
    finally:
        engine.close()


def test_one_table_names_the_lifecycle_operations_of_api_and_command_line(
    world: World,
) -> None:
    from nwfilter.api import known_methods
    from nwfilter.commands.domains import _LIFECYCLE
    from nwfilter.domain.lifecycle import LIFECYCLE

    assert tuple(LIFECYCLE) == tuple(name for name, *_texts in _LIFECYCLE)
    assert {f"domain.{verb}" for verb in LIFECYCLE} <= set(known_methods())
    m = world.manager
    m.define_xml(domain_xml("vm1"))
    with pytest.raises(ValidationError, match="unknown domain operation 'explode'"):
        m.run("explode", "vm1")
    assert m.state("vm1").state is DomainState.SHUTOFF
