"""A root's recorded host: used when none is given, other values refused,
moved only on purpose; ownership with the memory backend."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from nwfilter import hostrecord
from nwfilter.backends.memory import MemoryBackend, MemoryHost
from nwfilter.backends.nft.preconditions import mark_writers
from nwfilter.cli import main
from nwfilter.engine import Engine
from nwfilter.errors import ConflictError, StorageError
from tests.unit.test_engine import STOCK, make


def test_first_use_records_and_later_commands_follow(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "r"
    assert main(["--root", str(root), "--backend", "memory", "--netns", "lab",
                 "nwfilter-define", str(STOCK / "allow-arp.xml")]) == 0
    record = hostrecord.load(root)
    assert record is not None and (record.backend, record.netns) == ("memory", "lab")
    assert len(record.root_id) == 32
    # Not given: the recorded ones.
    assert hostrecord.resolve(root, None, None) == ("memory", "lab")
    capsys.readouterr()
    assert main(["--root", str(root), "nwfilter-list"]) == 0
    # Given and different: refused, naming both and the way to move.
    for args in (["--netns", "other"], ["--backend", "nft"]):
        capsys.readouterr()
        assert main(["--root", str(root), *args, "nwfilter-list"]) == 4
        err = capsys.readouterr().err
        assert "namespace 'lab'" in err and "host-move" in err
    monkeypatch.setenv("NWFILTER_NETNS", "other")
    assert main(["--root", str(root), "nwfilter-list"]) == 4
    monkeypatch.delenv("NWFILTER_NETNS")
    assert main(["--root", str(root), "host-move", "--netns", "other"]) == 0
    moved = hostrecord.load(root)
    assert moved is not None and moved.netns == "other" and moved.root_id == record.root_id
    assert main(["--root", str(root), "--netns", "other", "nwfilter-list"]) == 0
    assert main(["--root", str(root), "host-move", "--host-netns"]) == 0
    assert hostrecord.resolve(root, None, None) == ("memory", None)


def test_read_only_use_records_nothing_and_a_bad_record_is_named(tmp_path: Path) -> None:
    root = tmp_path / "r"
    assert main(["--root", str(root), "--backend", "memory", "nwfilter-list"]) == 0
    assert hostrecord.load(root) is None
    hostrecord.record_path(root).write_text("[]")
    with pytest.raises(StorageError, match=r"host\.json"):
        hostrecord.load(root)


def test_engine_refuses_a_backend_of_another_namespace(tmp_path: Path) -> None:
    first = Engine(tmp_path, MemoryBackend("a"), stock_dir=STOCK)
    first.start()
    first.close()
    with pytest.raises(ConflictError, match="namespace 'a'"):
        Engine(tmp_path, MemoryBackend("b"), stock_dir=STOCK).start()


def test_two_roots_on_one_memory_host(tmp_path: Path) -> None:
    host = MemoryHost()
    first = Engine(tmp_path / "a", MemoryBackend(host=host), stock_dir=STOCK)
    first.start()
    first.create_bindings([make("vnet0")])
    second = Engine(tmp_path / "b", MemoryBackend(host=host), stock_dir=STOCK)
    with pytest.raises(ConflictError, match=str(tmp_path / "a")):
        second.start()
    assert host.owner is not None and host.owner == first.owner
    first.delete_binding("vnet0")
    assert host.owner is None
    second.close()
    second.start()


def test_first_starts_race_to_one_owner(tmp_path: Path) -> None:
    host = MemoryHost()
    engines = [Engine(tmp_path / f"r{n}", MemoryBackend(host=host), stock_dir=STOCK)
               for n in range(4)]
    for engine in engines:
        engine.start()
    barrier = threading.Barrier(len(engines))
    won: list[int] = []

    def bind(n: int) -> None:
        barrier.wait()
        try:
            engines[n].create_bindings([make(f"vnet{n}")])
            won.append(n)
        except ConflictError:
            pass

    threads = [threading.Thread(target=bind, args=(n,)) for n in range(len(engines))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert len(won) == 1 and host.owner == engines[won[0]].owner


def test_broken_preconditions_make_layer3_ports_unenforced(tmp_path: Path) -> None:
    host = MemoryHost()
    engine = Engine(tmp_path, MemoryBackend(host=host), stock_dir=STOCK)
    engine.start()
    engine.define_filter(
        "<filter name='l3' chain='root'><rule action='drop' direction='out'>"
        "<udp dstportstart='53'/></rule></filter>"
    )
    engine.create_bindings([make("vnet0"), make("vnet1", filter_name="l3")])
    assert engine.enforcement() == {}
    host.broken.append("net.bridge.bridge-nf-call-iptables is 0")
    assert engine.enforcement() == {
        "vnet1": "its layer-3 rules are bypassed: net.bridge.bridge-nf-call-iptables is 0"
    }


def _chain(name: str, hook: str | None = None, prio: int = 0) -> dict[str, object]:
    chain: dict[str, object] = {"family": "bridge", "table": "t", "name": name}
    if hook:
        chain.update(hook=hook, prio=prio, type="filter")
    return {"chain": chain}


def _rule(chain: str, *expr: object) -> dict[str, object]:
    return {"rule": {"family": "bridge", "table": "t", "chain": chain, "expr": list(expr)}}


SET_MARK = {"mangle": {"key": {"meta": {"key": "mark"}}, "value": 0}}


def test_mark_writers_by_hook_priority_and_reach() -> None:
    table = {"table": {"family": "bridge", "name": "t"}}
    early = [table, _chain("c", "prerouting", -400), _rule("c", SET_MARK)]
    assert mark_writers(early) == []  # before our stamping: overwritten by us
    window = [table, _chain("c", "prerouting", -250), _chain("sub"),
              _rule("c", {"jump": {"target": "sub"}}), _rule("sub", SET_MARK)]
    (found,) = mark_writers(window)
    assert "table bridge t chain c (hook prerouting, priority -250)" in found
    assert "in chain sub" in found
    ours = [{"table": {"family": "bridge", "name": "nwfilter"}}, *window[1:]]
    assert mark_writers(ours) == []
    ct_only = [table, _chain("c", "forward", -100),
               _rule("c", {"mangle": {"key": {"ct": {"key": "mark"}}, "value": 1}})]
    assert mark_writers(ct_only) == []
