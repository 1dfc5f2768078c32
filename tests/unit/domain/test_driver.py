"""The domain driver: lifecycle, files, filters following domains, restart."""

from __future__ import annotations

import json

import pytest

from nwfilter.domain.objects import DomainState
from nwfilter.errors import BackendError, ConflictError, NotFoundError, StateError
from tests.unit.domain.conftest import World, domain_xml, filter_xml


def test_start_binds_every_filtered_interface_and_stop_removes(world: World) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1", filters=("web", None, "db")))
    m.start_domain("vm1")
    assert world.backend.ports() == ("vnet0", "vnet2")
    rows = m.interfaces("vm1")
    assert [r.interface for r in rows] == ["vnet0", "vnet1", "vnet2"]
    assert [r.filter for r in rows] == ["web", None, "db"]
    assert world.hv_a.guests() == {"vm1": "running"}
    binding = world.engine.binding("vnet0")
    assert binding.owner_name == "vm1" and binding.mac == rows[0].mac
    m.destroy("vm1")
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
    m.start_domain("a")
    m.start_domain("b")
    with pytest.raises(ConflictError, match="vnet1"):
        m.start_domain("c")
    assert world.backend.ports() == ("vnet0", "vnet1")
    m.destroy("b")
    m.start_domain("c")
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
        m.start_domain("vm1")
    assert world.backend.ports() == ()
    assert world.engine.list_bindings() == []
    assert world.hv_a.guests() == {}
    assert m.state("vm1").state is DomainState.SHUTOFF
    world.backend.fail_on.clear()
    m.start_domain("vm1")  # the port names were given back
    assert world.backend.ports() == ("vnet0", "vnet1")


def test_fail_closed_when_filter_missing_or_launch_fails(world: World) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1", filters=("web", "nosuch")))
    with pytest.raises(Exception, match="nosuch"):
        m.start_domain("vm1")
    assert world.backend.ports() == () and world.hv_a.guests() == {}
    m.define_xml(domain_xml("vm2"))
    world.hv_a.fail_next("launch")
    with pytest.raises(BackendError):
        m.start_domain("vm2")
    assert world.backend.ports() == () and world.engine.list_bindings() == []


def test_filter_redefine_rebuilds_running_domains(world: World) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1"))
    m.define_xml(domain_xml("vm2", "ns"))
    m.start_domain("vm1")
    m.start_domain("vm2")
    before = world.backend.transactions
    world.engine.define_filter(filter_xml("web", 8443))
    assert world.backend.transactions == before + 1  # one transaction for both
    for port in ("vnet0", "vnet1"):
        assert "8443" in world.backend.read_back(port)


def test_suspend_resume_and_state_checks(world: World) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1"))
    with pytest.raises(StateError):
        m.suspend("vm1")
    m.start_domain("vm1")
    with pytest.raises(StateError):
        m.start_domain("vm1")
    m.suspend("vm1")
    assert m.state("vm1").state is DomainState.PAUSED
    with pytest.raises(StateError):
        m.suspend("vm1")
    m.resume("vm1")
    assert m.state("vm1").state is DomainState.RUNNING
    m.shutdown("vm1")
    assert m.state("vm1").reason == "shutdown"


def test_undefine_running_domain_goes_at_stop(world: World) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1"))
    m.start_domain("vm1")
    m.undefine("vm1")
    assert not (world.root / "domains" / "vm1.xml").exists()
    assert not m.state("vm1").persistent
    m.destroy("vm1")
    with pytest.raises(NotFoundError):
        m.state("vm1")
    m.define_xml(domain_xml("vm1", "ns"))  # the name is free again, any type


def test_list_orders_active_by_id_then_inactive_by_name(world: World) -> None:
    m = world.manager
    for name in ("c", "a", "b"):
        m.define_xml(domain_xml(name, filters=()))
    m.start_domain("c")
    m.start_domain("b")
    assert [r.name for r in m.list_domains()] == ["c", "b"]
    assert [r.name for r in m.list_domains(all_domains=True)] == ["c", "b", "a"]


def test_autostart_marks_and_redefine_while_running(world: World) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1"))
    m.set_autostart("vm1", True)
    assert (world.root / "domains" / "autostart" / "vm1").exists()
    m.start_domain("vm1")
    m.define_xml(domain_xml("vm1", filters=("db",)).replace(
        "<name>vm1</name>", f"<name>vm1</name><uuid>{m.state('vm1').uuid}</uuid>"))
    assert "web" in m.dumpxml("vm1") and "db" in m.dumpxml("vm1", inactive=True)
    m.destroy("vm1")
    assert "db" in m.dumpxml("vm1")
    m.set_autostart("vm1", False)
    assert not (world.root / "domains" / "autostart" / "vm1").exists()


def test_restart_finds_running_domains_and_reapplies_filters(world: World) -> None:
    m = world.manager
    m.define_xml(domain_xml("vm1"))
    m.define_xml(domain_xml("vm2", "ns"))
    m.define_xml(domain_xml("vm3"))
    m.start_domain("vm1")
    m.start_domain("vm2")
    m.start_domain("vm3")
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
    again.manager.start_domain("vm3")
    assert again.manager.state("vm3").id == 3  # above every running id, as libvirt
    assert again.manager.interfaces("vm3")[0].interface == "vnet2"


def test_bad_names_are_refused(world: World) -> None:
    with pytest.raises(Exception, match="name"):
        world.manager.start_domain("../etc")
