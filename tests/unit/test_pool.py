"""The filter pool: define/undefine rules, loops, the graph, files, seeding,
thread safety and crash safety."""

from __future__ import annotations

import itertools
import os
import random
import signal
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path

import networkx as nx
import pytest

from nwfilter.conf import format_filter, parse_filter
from nwfilter.conf.model import Action, Direction, FilterDef, FilterRef, Rule
from nwfilter.conf.values import MAX_NAME_BYTES as CONF_MAX_NAME_BYTES
from nwfilter.errors import (
    ConflictError,
    InUseError,
    LoopError,
    NotFoundError,
    StorageError,
    ValidationError,
)
from nwfilter.pool import MAX_NAME_BYTES, STOCK_MARKER, FilterPool, validate_filter_name

REPO = Path(__file__).resolve().parents[2]


def fdef(
    name: str, *refs: str, uid: uuid.UUID | None = None, priority: int = 500
) -> FilterDef:
    entries: list[Rule | FilterRef] = [
        Rule(Action.ACCEPT, Direction.INOUT, priority=priority)
    ]
    entries.extend(FilterRef(r) for r in refs)
    return FilterDef(
        name=name,
        uuid=uid or uuid.uuid5(uuid.NAMESPACE_URL, name),
        chain="ipv4",
        priority=-700,  # the chain's default, which formatting spells out
        entries=tuple(entries),
    )


@pytest.fixture
def empty_stock(tmp_path: Path) -> Path:
    d = tmp_path / "stock"
    d.mkdir()
    return d


@pytest.fixture
def pool(tmp_path: Path, empty_stock: Path) -> FilterPool:
    p = FilterPool(tmp_path / "cfg", stock_dir=empty_stock)
    assert p.load() == []
    return p


def reload(p: FilterPool) -> FilterPool:
    fresh = FilterPool(p.config_dir, stock_dir=p.stock_dir)
    assert fresh.load() == []
    return fresh


# ------------------------------------------------------------------ define


def test_define_new_replace_unchanged(pool: FilterPool) -> None:
    calls: list[frozenset[str]] = []
    pool.add_listener(calls.append)
    r = pool.define(fdef("a"))
    assert (r.name, r.created, r.changed, r.affected) == ("a", True, True, frozenset({"a"}))
    assert (pool.config_dir / "a.xml").is_file()
    r = pool.define(fdef("a", priority=400))
    assert (r.created, r.changed) == (False, True)
    assert pool.get("a") == fdef("a", priority=400)
    r = pool.define(fdef("a", priority=400))
    assert (r.created, r.changed) == (False, False)
    assert calls == [frozenset({"a"}), frozenset({"a"})]


def test_define_conflicts(pool: FilterPool) -> None:
    pool.define(fdef("a"))
    pool.define(fdef("b"))
    with pytest.raises(ConflictError, match="'a' already exists with uuid"):
        pool.define(fdef("a", uid=uuid.uuid4()))
    with pytest.raises(ConflictError, match=r"different name \('a'\)"):
        pool.define(fdef("c", uid=fdef("a").uuid))
    assert "c" not in pool
    assert not (pool.config_dir / "c.xml").exists()


def test_file_is_formatter_output(pool: FilterPool) -> None:
    d = fdef("a", "b")
    pool.define(d)
    text = (pool.config_dir / "a.xml").read_text()
    assert text == format_filter(d)
    assert parse_filter(text) == d


def test_check_define_changes_nothing(pool: FilterPool) -> None:
    calls: list[frozenset[str]] = []
    pool.add_listener(calls.append)
    pool.define(fdef("b"))
    pool.define(fdef("a", "b"))
    r = pool.check_define(fdef("b", priority=1))
    assert (r.created, r.changed, r.affected) == (False, True, frozenset({"a", "b"}))
    r = pool.check_define(fdef("new"))
    assert r.created and "new" not in pool
    assert not (pool.config_dir / "new.xml").exists()
    assert pool.get("b") == fdef("b")
    assert len(calls) == 2


def test_affected_set_and_graph_queries(pool: FilterPool) -> None:
    # top -> mid -> leaf, other -> leaf, top -> missing (undefined is fine)
    pool.define(fdef("leaf"))
    pool.define(fdef("mid", "leaf"))
    pool.define(fdef("top", "mid", "missing"))
    pool.define(fdef("other", "leaf"))
    assert pool.reached_by("leaf") == {"leaf", "mid", "top", "other"}
    assert pool.reached_by("top") == {"top"}
    assert pool.reaches("top") == {"mid", "leaf", "missing"}
    assert pool.reaches("leaf") == frozenset()
    assert pool.define(fdef("leaf", priority=1)).affected == {"leaf", "mid", "top", "other"}
    # dropping a reference updates the graph incrementally
    pool.define(fdef("mid"))
    assert pool.reached_by("leaf") == {"leaf", "other"}
    assert pool.referrers("leaf") == ["other"]


def test_snapshot_is_immutable_and_stable(pool: FilterPool) -> None:
    pool.define(fdef("a"))
    snap = pool.snapshot()
    pool.define(fdef("b"))
    pool.define(fdef("a", priority=7))
    assert set(snap) == {"a"} and snap["a"] == fdef("a")
    with pytest.raises(TypeError):
        snap["x"] = fdef("x")  # type: ignore[index]
    assert set(pool.snapshot()) == {"a", "b"}


# ------------------------------------------------------------------- loops


def test_self_reference_is_a_loop(pool: FilterPool) -> None:
    with pytest.raises(LoopError, match="a -> a"):
        pool.define(fdef("a", "a"))


def test_loop_is_named(pool: FilterPool) -> None:
    pool.define(fdef("b", "c"))  # c undefined yet: allowed
    pool.define(fdef("a", "b"))
    with pytest.raises(LoopError, match="c -> a -> b -> c"):
        pool.define(fdef("c", "a"))
    assert "c" not in pool
    pool.define(fdef("c"))
    with pytest.raises(LoopError, match="c -> a -> b -> c"):
        pool.define(fdef("c", "x", "a"))
    assert pool.get("c") == fdef("c")
    # a long chain and a diamond: no loop
    for i in range(50):
        pool.define(fdef(f"n{i}", f"n{i + 1}", "c"))
    pool.define(fdef("n50", "c"))
    with pytest.raises(LoopError) as info:
        pool.define(fdef("n50", "n0"))
    assert str(info.value).endswith("n50 -> n0 -> n1 -> " + " -> ".join(
        f"n{i}" for i in range(2, 51)
    ))
    # replacing a filter's own edges never counts as a loop
    pool.define(fdef("n0", "n2"))


def test_loop_check_matches_networkx(pool: FilterPool) -> None:
    rng = random.Random(7)
    names = [f"f{i}" for i in range(40)]
    for _ in range(400):
        name = rng.choice(names)
        refs = rng.sample(names, rng.randint(0, 3))
        graph: nx.DiGraph[str] = nx.DiGraph()
        for n, d in pool.snapshot().items():
            graph.add_node(n)
            graph.add_edges_from((n, r) for r in d.referenced_names())
        graph.remove_edges_from(list(graph.out_edges(name)) if name in graph else [])
        graph.add_edges_from((name, r) for r in refs)
        expect_loop = not nx.is_directed_acyclic_graph(graph)
        loop = pool.find_loop(fdef(name, *refs))
        assert (loop is not None) == expect_loop
        if loop is not None:
            assert loop[0] == loop[-1] == name
            assert all(graph.has_edge(a, b) for a, b in itertools.pairwise(loop))
            with pytest.raises(LoopError):
                pool.define(fdef(name, *refs))
        else:
            pool.define(fdef(name, *refs))


# ----------------------------------------------------------------- undefine


def test_undefine(pool: FilterPool) -> None:
    calls: list[frozenset[str]] = []
    pool.define(fdef("leaf"))
    pool.define(fdef("top", "leaf"))
    pool.add_listener(calls.append)
    with pytest.raises(InUseError, match="'leaf' is in use by filter 'top'"):
        pool.undefine("leaf")
    pool.undefine(str(fdef("top").uuid))  # by UUID
    assert "top" not in pool and not (pool.config_dir / "top.xml").exists()
    assert pool.undefine("leaf").name == "leaf"
    assert len(pool) == 0 and calls == [frozenset({"top"}), frozenset({"leaf"})]
    with pytest.raises(NotFoundError, match="'leaf'"):
        pool.undefine("leaf")
    # a freed UUID and name can be reused
    pool.define(fdef("other", uid=fdef("leaf").uuid))


def test_undefine_asks_usage_provider(pool: FilterPool) -> None:
    pool.define(fdef("leaf"))
    pool.define(fdef("root", "leaf"))
    seen: list[frozenset[str]] = []

    def users(names: frozenset[str]) -> list[str]:
        seen.append(names)
        return ["binding vnet0 (vm1)"] if "root" in names else []

    pool.set_usage_provider(users)
    with pytest.raises(InUseError, match=r"'root' is in use by binding vnet0 \(vm1\)"):
        pool.undefine("root")
    assert seen == [frozenset({"root"})]
    with pytest.raises(InUseError, match="filter 'root', binding vnet0"):
        pool.undefine("leaf")
    pool.set_usage_provider(lambda names: [])
    pool.undefine("root")
    pool.undefine("leaf")


def test_lookup(pool: FilterPool) -> None:
    pool.define(fdef("a"))
    assert pool.lookup("a") == fdef("a")
    assert pool.lookup(str(fdef("a").uuid)) == fdef("a")
    assert pool.lookup(str(fdef("a").uuid).upper()) == fdef("a")
    assert pool.get("zz") is None
    with pytest.raises(NotFoundError, match="'zz'"):
        pool.lookup("zz")
    # a name that looks like a UUID but names a filter
    odd = str(uuid.uuid4())
    pool.define(fdef(odd))
    assert pool.lookup(odd).name == odd


def test_list_info(pool: FilterPool) -> None:
    pool.define(fdef("b", "a"))
    pool.define(parse_filter("<filter name='a'><rule action='drop' direction='in'/></filter>"))
    infos = pool.list_info()
    assert [i.name for i in infos] == ["a", "b"]
    assert (infos[0].chain, infos[0].priority, infos[0].rule_count) == ("root", 0, 1)
    assert (infos[1].chain, infos[1].priority) == ("ipv4", -700)


# -------------------------------------------------------------------- names


@pytest.mark.parametrize(
    "name",
    ["", ".", "..", ".hidden", "a/b", "../../evil", "a\x00b", "tab\there", "nl\n", "del\x7f",
     "x" * (MAX_NAME_BYTES + 1), "é" * 124, " lead", "trail "],
)
def test_bad_names_refused(pool: FilterPool, name: str) -> None:
    with pytest.raises(ValidationError):
        validate_filter_name(name)
    with pytest.raises(ValidationError):
        pool.define(fdef(name, uid=uuid.uuid4()))
    assert os.listdir(pool.config_dir) == []


def test_longest_name_is_stored(pool: FilterPool) -> None:
    validate_filter_name("x" * MAX_NAME_BYTES)
    # the parser may be stricter than the pool; the stricter limit wins
    name = "x" * min(MAX_NAME_BYTES, CONF_MAX_NAME_BYTES)
    pool.define(fdef(name))
    assert reload(pool).get(name) == fdef(name)


# ---------------------------------------------------------- files and load


def test_reload_gives_same_pool(pool: FilterPool) -> None:
    pool.define(fdef("a", "b"))
    pool.define(fdef("b"))
    pool.define(fdef("c", "a"))
    fresh = reload(pool)
    assert dict(fresh.snapshot()) == dict(pool.snapshot())
    assert fresh.reached_by("b") == {"a", "b", "c"}


def test_load_skips_bad_files_without_deleting(pool: FilterPool) -> None:
    pool.define(fdef("good"))
    cfg = pool.config_dir
    (cfg / "broken.xml").write_text("<filter name='broken'><rule")
    (cfg / "wrong.xml").write_text(format_filter(fdef("right")))
    (cfg / "zdup.xml").write_text(format_filter(fdef("zdup", uid=fdef("good").uuid)))
    (cfg / "notes.txt").write_text("ignored")
    fresh = FilterPool(cfg, stock_dir=pool.stock_dir)
    warnings = fresh.load()
    assert len(warnings) == 3
    assert any("broken.xml" in w for w in warnings)
    assert any("wrong.xml" in w and "'right'" in w for w in warnings)
    assert any("zdup.xml" in w and "'good'" in w for w in warnings)
    assert fresh.names() == ["good"]
    for f in ("broken.xml", "wrong.xml", "zdup.xml", "notes.txt"):
        assert (cfg / f).exists()


def test_load_skips_file_closing_a_loop(pool: FilterPool) -> None:
    pool.define(fdef("a", "b"))
    (pool.config_dir / "b.xml").write_text(format_filter(fdef("b", "a")))
    fresh = FilterPool(pool.config_dir, stock_dir=pool.stock_dir)
    warnings = fresh.load()
    assert len(warnings) == 1 and "b -> a -> b" in warnings[0]
    assert fresh.names() == ["a"]


def test_load_removes_unfinished_writes(pool: FilterPool) -> None:
    pool.define(fdef("a"))
    (pool.config_dir / ".a.xml.abcd1234.tmp").write_text("<filter")
    fresh = reload(pool)
    assert fresh.names() == ["a"]
    assert sorted(os.listdir(pool.config_dir)) == ["a.xml"]


def test_unwritable_directory(tmp_path: Path, empty_stock: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match="file"):
        FilterPool(tmp_path / "file" / "cfg", stock_dir=empty_stock).load()


# ------------------------------------------------------------------ seeding


def test_seeding_happens_once(tmp_path: Path) -> None:
    stock = tmp_path / "stock"
    stock.mkdir()
    for d in (fdef("s1"), fdef("s2", "s1")):
        (stock / f"{d.name}.xml").write_text(format_filter(d))
    cfg = tmp_path / "cfg"
    pool = FilterPool(cfg, stock_dir=stock)
    assert pool.load() == []
    assert pool.names() == ["s1", "s2"]
    assert (cfg / STOCK_MARKER).read_text().split() == ["s1", "s2"]
    # an admin edits one stock filter and undefines another
    pool.define(fdef("s1", priority=9))
    pool.undefine("s2")
    again = reload(pool)
    assert again.names() == ["s1"] and again.get("s1") == fdef("s1", priority=9)
    # a stock filter added later is seeded once too
    (stock / "s3.xml").write_text(format_filter(fdef("s3")))
    assert reload(pool).names() == ["s1", "s3"]
    pool = reload(pool)
    pool.undefine("s3")
    assert reload(pool).names() == ["s1"]


def test_default_stock_dir_is_repo_filters(tmp_path: Path) -> None:
    pool = FilterPool.for_root(tmp_path)
    assert pool.stock_dir == REPO / "filters"
    assert pool.config_dir == tmp_path / "nwfilter"
    assert pool.load() == []
    assert len(pool) == 24


# -------------------------------------------------------------- concurrency


def test_concurrent_defines_stay_consistent(pool: FilterPool) -> None:
    names = [f"t{i}" for i in range(12)]
    errors: list[BaseException] = []
    loops = 0
    lock = threading.Lock()

    def worker(seed: int) -> None:
        nonlocal loops
        rng = random.Random(seed)
        try:
            for i in range(60):
                d = fdef(rng.choice(names), *rng.sample(names, rng.randint(0, 2)), priority=i)
                try:
                    pool.define(d)
                except LoopError:
                    with lock:
                        loops += 1
                if rng.random() < 0.1:
                    pool.reached_by(rng.choice(names))
                    pool.snapshot()
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    snap = dict(pool.snapshot())
    graph: nx.DiGraph[str] = nx.DiGraph()
    graph.add_edges_from((n, r) for n, d in snap.items() for r in d.referenced_names())
    assert nx.is_directed_acyclic_graph(graph)
    for n in snap:
        expected = nx.ancestors(graph, n) | {n} if n in graph else {n}
        assert set(pool.reached_by(n)) == expected
    fresh = reload(pool)
    assert dict(fresh.snapshot()) == snap


# ------------------------------------------------------------- crash safety

CHILD = textwrap.dedent(
    """
    import sys, uuid
    from pathlib import Path
    from nwfilter.conf.model import Action, Direction, FilterDef, FilterRef, Rule
    from nwfilter.pool import FilterPool

    pool = FilterPool(Path(sys.argv[1]), stock_dir=Path(sys.argv[2]))
    pool.load()
    start = int(sys.argv[3])
    print("ready", flush=True)
    i = start
    while True:
        name = f"c{i % 5}"
        rules = tuple(
            Rule(Action.ACCEPT, Direction.INOUT, priority=(i + k) % 1000) for k in range(40)
        )
        refs = (FilterRef(f"c{(i + 1) % 5}"),) if i % 5 != 4 else ()
        pool.define(FilterDef(name, uuid.uuid5(uuid.NAMESPACE_DNS, name), "ipv4", None,
                              rules + refs))
        i += 1
    """
)


def test_kill_during_writes_leaves_whole_files(pool: FilterPool, tmp_path: Path) -> None:
    rng = random.Random(1)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    for round_no in range(6):
        child = subprocess.Popen(
            [sys.executable, "-c", CHILD, str(pool.config_dir), str(pool.stock_dir),
             str(round_no * 100_000)],
            stdout=subprocess.PIPE,
            env=env,
        )
        assert child.stdout is not None
        assert child.stdout.readline().strip() == b"ready"
        time.sleep(rng.uniform(0.02, 0.25))
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
        fresh = FilterPool(pool.config_dir, stock_dir=pool.stock_dir)
        assert fresh.load() == []
        assert set(fresh.names()) <= {f"c{i}" for i in range(5)}
        for name in fresh.names():
            d = fresh.get(name)
            assert d is not None and len(d.rules) == 40
        assert not [f for f in os.listdir(pool.config_dir) if f.endswith(".tmp")]
