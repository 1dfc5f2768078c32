"""Source digests of bindings and the index of what they compiled to."""

from __future__ import annotations

from pathlib import Path

from nwfilter.backends.memory import MemoryBackend, MemoryHost
from nwfilter.compile import Compiler
from nwfilter.conf import parse_filter
from nwfilter.engine import Engine
from nwfilter.fileio import SafeDir
from nwfilter.ir_digest import ruleset_digest
from nwfilter.pool import FilterPool
from nwfilter.sourcestamp import INDEX_NAME, CompiledIndex, SourceStamps
from tests.unit.test_engine import SPOOF, STOCK, make

LEAF = "<filter name='leaf' chain='root'><rule action='drop' direction='in'><all/></rule></filter>"
MID = "<filter name='mid' chain='root'><filterref filter='leaf'/></filter>"
ALONE = "<filter name='alone' chain='root'><rule action='accept' direction='in'><all/></rule>" \
        "</filter>"


def _pool(tmp_path: Path) -> FilterPool:
    pool = FilterPool(tmp_path / "pool", stock_dir=STOCK)
    pool.load()
    for text in (LEAF, MID, ALONE):
        pool.define(parse_filter(text))
    return pool


def _stamps(pool: FilterPool) -> SourceStamps:
    return SourceStamps(pool.snapshot(), pool.reaches)


def test_a_filter_edit_changes_the_sources_of_exactly_the_bindings_reaching_it(
    tmp_path: Path,
) -> None:
    pool = _pool(tmp_path)
    bindings = [make("vnet0", filter_name="mid"), make("vnet1", filter_name="leaf"),
                make("vnet2", filter_name="alone"), make("vnet3")]  # clean-traffic
    before = {b.portdev: _stamps(pool).of(b, None) for b in bindings}
    leaf = pool.get("leaf")
    assert leaf is not None
    pool.define(parse_filter(LEAF.replace("drop", "reject").replace(
        "<rule", f"<uuid>{leaf.uuid}</uuid><rule", 1)))
    after = {b.portdev: _stamps(pool).of(b, None) for b in bindings}
    assert sorted(p for p in before if before[p] != after[p]) == ["vnet0", "vnet1"]
    assert pool.define(parse_filter(SPOOF)).changed
    again = {b.portdev: _stamps(pool).of(b, None) for b in bindings}
    assert [p for p in after if after[p] != again[p]] == ["vnet3"]


def test_the_binding_and_its_learnt_values_are_sources(tmp_path: Path) -> None:
    stamps = _stamps(_pool(tmp_path))
    base = stamps.of(make("vnet0"), None)
    assert stamps.of(make("vnet0"), {}) == base
    assert stamps.of(make("vnet0", ip="10.0.0.6"), None) != base
    assert stamps.of(make("vnet0"), {"IP": ["10.0.0.9"]}) != base
    assert stamps.of(make("vnet0"), {"IP": ["10.0.0.9", "10.0.0.8"]}) != \
        stamps.of(make("vnet0"), {"IP": ["10.0.0.8", "10.0.0.9"]})


def test_a_filter_not_defined_is_a_source_too(tmp_path: Path) -> None:
    pool = _pool(tmp_path)
    dangling = make("vnet0", filter_name="missing")
    before = _stamps(pool).of(dangling, None)
    pool.define(parse_filter(LEAF.replace("'leaf'", "'missing'")))
    assert _stamps(pool).of(dangling, None) != before


def test_the_index_keeps_entries_and_ignores_what_it_cannot_use(tmp_path: Path) -> None:
    with SafeDir.open(tmp_path / "run") as run:
        index = CompiledIndex(run)
        assert index.load() == {}
        index.save({"vnet0": ("a" * 64, "b" * 64)})
        assert CompiledIndex(run).load() == {"vnet0": ("a" * 64, "b" * 64)}
        for junk in (b"{", b"[]", b'{"version": 1, "ports": {"x": 5}}',
                     b'{"version": 7, "ports": {}}'):
            (tmp_path / "run" / INDEX_NAME).write_bytes(junk)
            assert CompiledIndex(run).load() == {}


def test_a_start_records_what_each_binding_compiled_to(tmp_path: Path) -> None:
    host = MemoryHost()
    engine = Engine(tmp_path, MemoryBackend(host=host), stock_dir=STOCK)
    engine.start()
    engine.create_bindings([make("vnet0"), make("vnet1", ip="10.0.0.6")])
    engine.close()
    again = Engine(tmp_path, MemoryBackend(host=host), stock_dir=STOCK)
    again.start()
    with SafeDir.open(tmp_path / "run") as run:
        entries = CompiledIndex(run).load()
    compiler = Compiler(again.pool.snapshot())
    stamps = SourceStamps(again.pool.snapshot(), again.pool.reaches)
    assert entries == {
        b.portdev: (stamps.of(b, None), ruleset_digest(compiler.compile(b, None)))
        for b in again.list_bindings()
    }
    again.close()
    # a start that finds them unchanged hands over deferred compiles, which
    # give the same rulesets
    third = Engine(tmp_path, MemoryBackend(host=host), stock_dir=STOCK)
    third.start()
    assert dict(third.backend.recorded()) == {
        b.portdev: compiler.compile(b, None) for b in again.list_bindings()}
    third.close()
