"""Long chains of filter references: within the documented depth limit they
define, bind, rebuild, dump and undefine like any other; past it a binding
is refused with an error naming the limit and the chain, never reported as a
loop and never a RecursionError."""

from __future__ import annotations

import uuid
from pathlib import Path

import pytest

from nwfilter.backends.memory import MemoryBackend
from nwfilter.cli import main
from nwfilter.compile import compile_binding
from nwfilter.compile.compiler import MAX_REFERENCE_DEPTH
from nwfilter.conf.model import (
    Action,
    BindingDef,
    Direction,
    FilterDef,
    FilterRef,
    Parameter,
    ProtocolMatch,
    Rule,
)
from nwfilter.engine import Engine
from nwfilter.errors import DepthError, ErrorCode, LoopError, NwfilterError

STOCK = Path(__file__).resolve().parents[2] / "filters"
MAC = "52:54:00:00:00:01"
CHAIN = 3000  # filters f0 -> f1 -> ... -> f2999, no loop


def leaf_rule() -> Rule:
    return Rule(Action.DROP, Direction.OUT, 500, ProtocolMatch("all", ()))


def chain_defs(length: int) -> dict[str, FilterDef]:
    """`f0 -> ... -> f{length-1}`, the last one holding one rule."""
    defs: dict[str, FilterDef] = {}
    for i in range(length):
        entries: tuple[Rule | FilterRef, ...] = (
            (FilterRef(f"f{i + 1}", ()),) if i < length - 1 else (leaf_rule(),)
        )
        name = f"f{i}"
        defs[name] = FilterDef(name, uuid.uuid5(uuid.NAMESPACE_DNS, name), None, None, entries)
    return defs


def binding(filter_name: str, portdev: str = "vnet0") -> BindingDef:
    return BindingDef(
        "vm1", uuid.UUID(int=1), portdev, MAC,
        FilterRef(filter_name, (Parameter("IP", "10.0.0.1"),)),
    )


def filter_xml(i: int, last: int) -> str:
    body = (
        f"<filterref filter='f{i + 1}'/>"
        if i < last
        else "<rule action='drop' direction='out'><all/></rule>"
    )
    return f"<filter name='f{i}'><uuid>{uuid.UUID(int=i + 1000)}</uuid>{body}</filter>\n"


# -- the compiler -----------------------------------------------------------------


def test_limit_is_documented() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs"
    for page in ("filter-language.md", "pool.md"):
        assert f"{MAX_REFERENCE_DEPTH} filters" in (docs / page).read_text()


def test_chain_at_the_limit_compiles_without_recursion_error() -> None:
    defs = chain_defs(MAX_REFERENCE_DEPTH)
    ruleset = compile_binding(binding("f0"), defs)
    assert len(ruleset.filter_names) == MAX_REFERENCE_DEPTH
    assert any(chain.rules for hook in ruleset.l2 for chain in ruleset.l2[hook])


def test_chain_past_the_limit_is_a_depth_error_naming_limit_and_chain() -> None:
    defs = chain_defs(CHAIN)
    with pytest.raises(DepthError) as err:
        compile_binding(binding("f0"), defs)
    assert not isinstance(err.value, LoopError)
    assert err.value.code is ErrorCode.INVALID
    text = err.value.message
    assert str(MAX_REFERENCE_DEPTH) in text and "loop" not in text
    assert text.count("\n") == 0 and len(text) < 400
    # the chain's start and the filter that crosses the limit
    assert "f0 -> f1" in text and f"f{MAX_REFERENCE_DEPTH}" in text
    with pytest.raises(DepthError):
        compile_binding(binding("f0"), chain_defs(MAX_REFERENCE_DEPTH + 1))


def test_loop_is_still_a_loop_deep_down() -> None:
    defs = chain_defs(500)
    defs["f499"] = FilterDef(
        "f499", defs["f499"].uuid, None, None, (FilterRef("f400", ()),)
    )
    with pytest.raises(LoopError, match="f499 -> f400"):
        compile_binding(binding("f0"), defs)


# -- the engine: define, bind, rebuild, dump, undefine, list --------------------------


@pytest.fixture
def deep_engine(tmp_path: Path) -> Engine:
    """An engine whose pool holds f1 ... f2999 (written as a restart finds
    them); f0 is left for the test to define."""
    pool_dir = tmp_path / "nwfilter"
    pool_dir.mkdir()
    for i in range(1, CHAIN):
        (pool_dir / f"f{i}.xml").write_text(filter_xml(i, CHAIN - 1))
    eng = Engine(tmp_path, MemoryBackend(), stock_dir=STOCK)
    assert eng.start() == []
    return eng


def test_engine_within_the_limit_and_past_it(deep_engine: Engine) -> None:
    eng = deep_engine
    outcome = eng.define_filter(filter_xml(0, CHAIN - 1))
    assert outcome.created
    # f2000 -> ... -> f2999 is exactly at the limit
    start = CHAIN - MAX_REFERENCE_DEPTH
    eng.create_bindings([binding(f"f{start}", "vnet1")])
    assert len(eng.ruleset("vnet1").filter_names) == MAX_REFERENCE_DEPTH
    # a change at the bottom rebuilds the bound chain
    changed = filter_xml(CHAIN - 1, CHAIN - 1).replace("drop", "accept")
    outcome = eng.define_filter(changed)
    assert outcome.rebuilt == ("vnet1",)
    # a define that would push the bound chain past the limit changes nothing
    eng.define_filter("<filter name='g'><rule action='drop' direction='in'><all/></rule></filter>")
    deeper = changed.replace("<rule", "<filterref filter='g'/><rule")
    with pytest.raises(NwfilterError) as err:
        eng.define_filter(deeper)
    assert err.value.code is ErrorCode.INVALID and "deeper than" in err.value.message
    assert eng.pool.lookup(f"f{CHAIN - 1}").referenced_names() == frozenset()
    assert len(eng.ruleset("vnet1").filter_names) == MAX_REFERENCE_DEPTH
    # the whole chain is refused with the depth error, and nothing changes
    with pytest.raises(NwfilterError) as err:
        eng.create_bindings([binding("f0", "vnet0")])
    assert err.value.code is ErrorCode.INVALID and str(MAX_REFERENCE_DEPTH) in err.value.message
    assert [b.portdev for b in eng.list_bindings()] == ["vnet1"]
    assert "f0" in {info.name for info in eng.pool.list_info()}
    eng.delete_binding("vnet1")
    assert eng.undefine_filter("f0").name == "f0"
    eng.close()


def test_cli_reports_the_depth_limit(
    deep_engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    deep_engine.close()
    top = tmp_path / "f0.xml"
    top.write_text(filter_xml(0, CHAIN - 1))
    bind = tmp_path / "b.xml"
    bind.write_text(
        "<filterbinding><owner><name>vm1</name>"
        "<uuid>c2a3f1a2-8d4e-4a51-9a9e-2f6f1d8e7a11</uuid></owner>"
        f"<portdev name='vnet0'/><mac address='{MAC}'/>"
        "<filterref filter='f0'/></filterbinding>"
    )
    args = ["--root", str(tmp_path), "--backend", "memory"]
    assert main([*args, "nwfilter-define", str(top)]) == 0
    capsys.readouterr()
    assert main([*args, "nwfilter-binding-create", str(bind)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "loop" not in err
    assert f"deeper than {MAX_REFERENCE_DEPTH}" in err and "'vnet0'" in err
    assert main([*args, "nwfilter-dumpxml", "f0"]) == 0
    assert "filterref filter=\"f1\"" in capsys.readouterr().out.replace("'", '"')
