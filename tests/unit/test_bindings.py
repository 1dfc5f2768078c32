"""The binding table and its runtime files."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from nwfilter.bindings import BindingTable
from nwfilter.conf.binding_xml import format_binding
from nwfilter.conf.model import BindingDef, FilterRef, Parameter
from nwfilter.conf.values import check_port_name
from nwfilter.errors import ValidationError


def make(portdev: str, filter_name: str = "clean-traffic") -> BindingDef:
    return BindingDef(
        "vm1", uuid.UUID(int=7), portdev, "52:54:00:00:00:01",
        FilterRef(filter_name, (Parameter("IP", "10.0.0.5"),)),
    )


def test_put_load_remove_round_trip(tmp_path: Path) -> None:
    table = BindingTable(tmp_path / "run")
    table.load()
    table.put_many([make("vnet0"), make("vnet1", "other")])
    assert sorted(p.name for p in (tmp_path / "run").glob("*.xml")) == ["vnet0.xml", "vnet1.xml"]
    again = BindingTable(tmp_path / "run")
    assert again.load() == []
    assert again.get("vnet0") == make("vnet0")
    assert [b.portdev for b in again.using({"other"})] == ["vnet1"]
    assert again.remove("vnet0") == make("vnet0")
    assert not (tmp_path / "run" / "vnet0.xml").exists()
    assert again.remove("vnet0") is None


def test_bad_files_are_reported_and_skipped(tmp_path: Path) -> None:
    run = tmp_path / "run"
    table = BindingTable(run)
    table.load()
    table.put_many([make("vnet0")])
    (run / "broken.xml").write_text("<filterbinding>")
    (run / "vnet9.xml").write_bytes((run / "vnet0.xml").read_bytes())
    again = BindingTable(run)
    warnings = again.load()
    assert len(warnings) == 2
    assert any("broken.xml" in w for w in warnings)
    assert any("vnet9.xml" in w and "vnet0" in w for w in warnings)
    assert [b.portdev for b in again.all()] == ["vnet0"]
    assert (run / "broken.xml").exists()


@pytest.mark.parametrize("name", ["", "../x", "a/b", "x" * 16, ".", "a b", ".vnet0", "é" * 8,
                                  "a:b", "a\x00", "v*", "v\\*", "*", "@v", 'v"x'])
def test_unsafe_portdev_refused(name: str) -> None:
    with pytest.raises(ValidationError):
        check_port_name(name)


@pytest.mark.parametrize("name", ["v*", "*", "@v", 'v"x'])
def test_binding_files_with_names_nft_reads_specially_are_skipped(
    tmp_path: Path, name: str
) -> None:
    # A file written by an earlier version, whose rule let these names pass.
    run = tmp_path / "run"
    run.mkdir()
    text = format_binding(make("vnet0")).replace("vnet0", name.replace('"', "&quot;"))
    (run / f"{name}.xml").write_text(text)
    table = BindingTable(run)
    warnings = table.load()
    assert not table.all()
    assert len(warnings) == 1 and repr(name) in warnings[0]


def test_changes_leave_earlier_reads_alone(tmp_path: Path) -> None:
    table = BindingTable(tmp_path / "run")
    table.load()
    table.put_many([make("vnet2"), make("vnet0", "other")])
    before, generation = table.all(), table.generation
    table.put_many([make("vnet1", "other")])
    table.remove("vnet2")
    assert [b.portdev for b in before] == ["vnet0", "vnet2"]
    assert [b.portdev for b in table.all()] == ["vnet0", "vnet1"]
    assert [b.portdev for b in table.using(["other"])] == ["vnet0", "vnet1"]
    assert table.generation == generation + 2
    assert "vnet2" not in table and len(table) == 2
