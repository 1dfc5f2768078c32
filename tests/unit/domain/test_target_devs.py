"""A host port (target device) belongs to one interface of one domain, or to
one binding made by hand: duplicates are refused at define and at start,
generated names skip ports in use, and a hand binding cannot take a port a
running domain uses."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from nwfilter.cli import main
from nwfilter.conf.model import BindingDef, FilterRef, Parameter
from nwfilter.errors import ConflictError, NotFoundError, ValidationError
from tests.unit.domain.conftest import World

MAC1, MAC2 = "52:54:00:00:00:01", "52:54:00:00:00:02"


def iface(mac: str, target: str | None, filt: str | None = "web") -> str:
    parts = [f"<interface type='bridge'><source bridge='br0'/><mac address='{mac}'/>"]
    if target:
        parts.append(f"<target dev='{target}'/>")
    if filt:
        parts.append(f"<filterref filter='{filt}'><parameter name='IP' value='10.0.0.1'/>"
                     "</filterref>")
    return "".join(parts) + "</interface>"


def domain(name: str, *ifaces: str, dtype: str = "test") -> str:
    devices = "".join(ifaces)
    return f"<domain type='{dtype}'><name>{name}</name><devices>{devices}</devices></domain>"


def hand_binding(portdev: str, owner: str = "other") -> BindingDef:
    return BindingDef(owner, uuid.UUID(int=99), portdev, MAC2,
                      FilterRef("web", (Parameter("IP", "10.0.0.9"),)))


@pytest.mark.parametrize("dtype", ["test", "ns"])
@pytest.mark.parametrize("filters", [("web", "web"), (None, "web"), (None, None)])
def test_duplicate_target_dev_refused_at_define(
    world: World, dtype: str, filters: tuple[str | None, str | None]
) -> None:
    xml = domain("vm1", iface(MAC1, "vnet5", filters[0]), iface(MAC2, "vnet5", filters[1]),
                 dtype=dtype)
    with pytest.raises(ValidationError) as err:
        world.manager.define_xml(xml)
    assert "'vnet5'" in err.value.message and "'vm1'" in err.value.message
    with pytest.raises(NotFoundError):
        world.manager.state("vm1")
    assert not (world.root / "domains" / "vm1.xml").exists()


def test_duplicate_in_a_stored_definition_is_refused_at_start(world: World) -> None:
    # a definition written before the check existed, found at load
    world.engine.close()
    xml = domain("vm1", iface(MAC1, "vnet5", None), iface(MAC2, "vnet5"))
    (world.root / "domains" / "vm1.xml").write_text(xml)
    world = world.restart()
    with pytest.raises(ValidationError) as err:
        world.manager.run("start", "vm1")
    assert "'vnet5'" in err.value.message and "'vm1'" in err.value.message
    assert world.engine.list_bindings() == [] and world.hv_a.guests() == {}
    # nothing reserved: another domain may take the port
    world.manager.define_xml(domain("vm2", iface(MAC1, "vnet5")))
    world.manager.run("start", "vm2")
    assert [b.portdev for b in world.engine.list_bindings()] == ["vnet5"]
    world.engine.close()


def test_two_domains_cannot_run_on_one_target_dev(world: World) -> None:
    m = world.manager
    m.define_xml(domain("vm1", iface(MAC1, "vnet5", None)))
    m.define_xml(domain("vm2", iface(MAC2, "vnet5")))  # defining both is fine
    m.run("start", "vm1")
    with pytest.raises(ConflictError) as err:
        m.run("start", "vm2")
    assert "'vnet5'" in err.value.message and "'vm1'" in err.value.message
    assert world.engine.list_bindings() == []


def test_generated_names_skip_ports_bound_by_hand(world: World) -> None:
    world.engine.create_bindings([hand_binding("vnet0")])
    m = world.manager
    m.define_xml(domain("vm1", iface(MAC1, None, None), iface(MAC2, None)))
    m.run("start", "vm1")
    assert [r.interface for r in m.interfaces("vm1")] == ["vnet1", "vnet2"]
    owners = {b.portdev: b.owner_name for b in world.engine.list_bindings()}
    assert owners == {"vnet0": "other", "vnet2": "vm1"}


@pytest.mark.parametrize("filt", ["web", None])
def test_start_on_a_port_bound_by_hand_is_refused(world: World, filt: str | None) -> None:
    world.engine.create_bindings([hand_binding("vnet7")])
    m = world.manager
    m.define_xml(domain("vm1", iface(MAC1, "vnet7", filt)))
    with pytest.raises(ConflictError) as err:
        m.run("start", "vm1")
    text = err.value.message
    assert "'vnet7'" in text and "'vm1'" in text and "'other'" in text
    assert [b.owner_name for b in world.engine.list_bindings()] == ["other"]
    assert world.hv_a.guests() == {}


@pytest.mark.parametrize("filt", ["web", None])
def test_hand_binding_on_a_running_domains_port_is_refused(
    world: World, filt: str | None
) -> None:
    m = world.manager
    m.define_xml(domain("vm1", iface(MAC1, "vnet3", filt)))
    m.run("start", "vm1")
    before = world.engine.list_bindings()
    with pytest.raises(ConflictError) as err:
        world.engine.create_bindings([hand_binding("vnet3")])
    assert "'vnet3'" in err.value.message and "'vm1'" in err.value.message
    assert world.engine.list_bindings() == before
    # once the domain is off the port is free
    m.run("destroy", "vm1")
    world.engine.create_bindings([hand_binding("vnet3")])


def test_cli_refuses_duplicate_target_devs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "vm1.xml"
    path.write_text(domain("vm1", iface(MAC1, "vnet5", None), iface(MAC2, "vnet5")))
    args = ["--root", str(tmp_path / "root"), "--backend", "memory"]
    assert main([*args, "define", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "'vnet5'" in err and "'vm1'" in err


def test_cli_hand_binding_on_a_running_domains_unfiltered_port(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "vm1.xml"
    path.write_text(domain("vm1", iface(MAC1, "vnet3", None)))
    args = ["--root", str(tmp_path / "root"), "--backend", "memory"]
    assert main([*args, "define", str(path)]) == 0
    assert main([*args, "start", "vm1"]) == 0
    bind = tmp_path / "b.xml"
    bind.write_text(
        "<filterbinding><owner><name>other</name>"
        "<uuid>c2a3f1a2-8d4e-4a51-9a9e-2f6f1d8e7a11</uuid></owner>"
        f"<portdev name='vnet3'/><mac address='{MAC2}'/>"
        "<filterref filter='allow-arp'/></filterbinding>"
    )
    capsys.readouterr()
    assert main([*args, "nwfilter-binding-create", str(bind)]) == 4
    err = capsys.readouterr().err
    assert "'vnet3'" in err and "'vm1'" in err
