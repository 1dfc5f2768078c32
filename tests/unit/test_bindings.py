"""The binding table and its runtime files."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import pytest

from nwfilter import bindings
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


@pytest.fixture
def parsed(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The binding files `load` parses (the real parser, counted)."""
    seen: list[str] = []
    real = bindings.parse_binding

    def counting(data: str | bytes, *, source: str = "") -> BindingDef:
        seen.append(Path(source).name)
        return real(data, source=source)

    monkeypatch.setattr(bindings, "parse_binding", counting)
    return seen


def test_load_takes_unchanged_files_from_the_index(tmp_path: Path, parsed: list[str]) -> None:
    run = tmp_path / "run"
    table = BindingTable(run)
    table.load()
    table.put_many([make("vnet0"), make("vnet1", "other"), make("vnet2")])
    table.remove("vnet2")
    again = BindingTable(run)
    assert again.load() == [] and parsed == []
    assert again.all() == [make("vnet0"), make("vnet1", "other")]


def test_files_changed_by_hand_are_parsed_again(tmp_path: Path, parsed: list[str]) -> None:
    run = tmp_path / "run"
    table = BindingTable(run)
    table.load()
    table.put_many([make("vnet0"), make("vnet1"), make("vnet2")])
    other = BindingDef("vm1", uuid.UUID(int=7), "vnet0", "52:54:00:00:00:01",
                       FilterRef("clean-traffic", (Parameter("IP", "10.0.0.6"),)))
    text = format_binding(other)
    assert len(text) == len(format_binding(make("vnet0")))  # same size, same name
    (run / "vnet0.xml").write_text(text)  # edited in place
    (run / "vnet1.xml").unlink()
    (run / "vnet3.xml").write_text(format_binding(make("vnet3")))
    again = BindingTable(run)
    assert again.load() == []
    assert sorted(parsed) == ["vnet0.xml", "vnet3.xml"]
    assert again.all() == [other, make("vnet2"), make("vnet3")]
    parsed.clear()
    third = BindingTable(run)
    assert third.load() == [] and parsed == []  # the load brought the index up to date
    assert third.all() == again.all()


@pytest.mark.parametrize("index", [
    b"{", b"[]", b'{"version": 99, "files": {}}', b'{"version": 1, "files": {"x": 1}}',
])
def test_an_unusable_index_is_ignored(tmp_path: Path, parsed: list[str], index: bytes) -> None:
    run = tmp_path / "run"
    table = BindingTable(run)
    table.load()
    table.put_many([make("vnet0"), make("vnet1")])
    (run / bindings.INDEX).write_bytes(index)
    again = BindingTable(run)
    assert again.load() == []
    assert sorted(parsed) == ["vnet0.xml", "vnet1.xml"]
    assert again.all() == [make("vnet0"), make("vnet1")]


def test_an_index_entry_naming_another_port_is_not_trusted(
    tmp_path: Path, parsed: list[str]
) -> None:
    run = tmp_path / "run"
    table = BindingTable(run)
    table.load()
    table.put_many([make("vnet0"), make("vnet1")])
    data = json.loads((run / bindings.INDEX).read_text())
    data["files"]["vnet0.xml"]["binding"]["portdev"] = "vnet1"
    (run / bindings.INDEX).write_text(json.dumps(data))
    again = BindingTable(run)
    assert again.load() == []
    assert again.all() == [make("vnet0"), make("vnet1")]
    assert sorted(parsed) == ["vnet0.xml", "vnet1.xml"]


def test_a_bad_file_is_reported_on_every_load(tmp_path: Path) -> None:
    run = tmp_path / "run"
    table = BindingTable(run)
    table.load()
    table.put_many([make("vnet0")])
    (run / "broken.xml").write_text("<filterbinding>")
    for _ in range(2):
        again = BindingTable(run)
        assert [w for w in again.load() if "broken.xml" in w]
        assert again.all() == [make("vnet0")]
