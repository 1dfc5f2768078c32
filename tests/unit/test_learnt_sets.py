"""Learnt addresses as set elements: what compiles to a set match, what
falls back to rules per value, and that learning changes elements only."""

from __future__ import annotations

import dataclasses
import ipaddress
import time
import uuid
from pathlib import Path

import pytest

from nwfilter.backends.memory import MemoryBackend
from nwfilter.backends.nft import render
from nwfilter.compile import Compiler
from nwfilter.compile.compiler import LearntSetUnfit
from nwfilter.conf import parse_filter
from nwfilter.conf.model import BindingDef, FilterRef, Parameter
from nwfilter.engine import Engine
from nwfilter.ir import Field, Learning, LearntAddr, LearntSet, Ruleset
from nwfilter.learn.policy import learning_rules
from nwfilter.learn.store import LearntAddress, LearntStore
from nwfilter.pool import FilterPool

STOCK = Path(__file__).resolve().parents[2] / "filters"
MAC = "52:54:00:00:00:01"
SETS = frozenset({"IP", "IPV6"})


class SetBackend(MemoryBackend):
    learnt_sets = True


def binding(filter_name: str = "clean-traffic", port: str = "vnet0") -> BindingDef:
    return BindingDef("g", uuid.uuid4(), port, MAC,
                      FilterRef(filter_name, (Parameter("DHCPSERVER", "10.0.0.1"),)))


def compiler(tmp_path: Path, *extra: str) -> Compiler:
    pool = FilterPool.for_root(tmp_path, stock_dir=STOCK)
    pool.load()
    filters = dict(pool.snapshot())
    for xml in extra:
        fdef = parse_filter(xml)
        filters[fdef.name] = fdef
    return Compiler(filters)


def set_matches(rs: Ruleset) -> set[tuple[Field, int]]:
    rules = [r for chains in rs.l2.values() for c in chains for r in c.rules]
    rules += [r for rules in rs.l3.values() for r in rules]
    return {(m.field, m.value.version) for r in rules for m in r.matches
            if isinstance(m.value, LearntSet)}


def test_clean_traffic_matches_the_learnt_set(tmp_path: Path) -> None:
    rs = compiler(tmp_path).compile(binding(), learnt_sets=SETS)
    assert set_matches(rs) == {(Field.IP_SRC, 4), (Field.ARP_SPA, 4)}
    assert rs.set_versions() == frozenset({4})


@pytest.mark.parametrize("element", [
    "<ip match='no' srcipaddr='$IP'/>",  # negated: one rule per value differs
    "<ip srcipaddr='$IP' srcipmask='24'/>",  # masked
    "<ip srcipaddr='$IP[@1]'/>",  # iterator
    "<ip srcipaddr='$IP' dstipaddr='$IP'/>",  # twice in one rule
    "<rarp arpsrcipaddr='$IP'/>",  # RARP: nft's typed arp payload would contradict it
    "<ipv6 srcipaddr='$IP'/>",  # the wrong version
])
def test_uses_a_set_cannot_express_fall_back(tmp_path: Path, element: str) -> None:
    xml = (f"<filter name='odd' chain='root'><rule action='accept' direction='out'>"
           f"{element}</rule></filter>")
    with pytest.raises(LearntSetUnfit):
        compiler(tmp_path, xml).compile(binding("odd"), learnt_sets=SETS)


def test_engine_learns_into_elements_and_keeps_the_chains(tmp_path: Path) -> None:
    engine = Engine(tmp_path / "root", SetBackend(), stock_dir=STOCK)
    engine.start()
    engine.create_bindings([binding()])
    before = engine.ruleset("vnet0")
    assert before.learn is not None and before.learn.held()
    expires = time.time() + 3600
    engine.set_learnt_many([("vnet0", "IP", (LearntAddress("10.0.0.5", "dhcp", time.time(),
                                                           expires, "10.0.0.1"),))])
    after = engine.ruleset("vnet0")
    assert after.l2 is before.l2 and after.l3 is before.l3
    assert after.learn is not None and not after.learn.held()
    assert after.learn.addresses == (LearntAddr(ipaddress.ip_address("10.0.0.5"), expires),)
    engine.set_learnt_many([("vnet0", "IP", ())])
    assert engine.ruleset("vnet0").learn == before.learn
    engine.close()


def test_engine_falls_back_to_rules_per_value(tmp_path: Path) -> None:
    xml = ("<filter name='odd' chain='root'><rule action='drop' direction='out'>"
           "<ip match='no' srcipaddr='$IP'/></rule></filter>")
    engine = Engine(tmp_path / "root", SetBackend(), stock_dir=STOCK)
    engine.start()
    engine.define_filter(xml)
    engine.create_bindings([binding("odd")])
    assert engine.ruleset("vnet0").learn is None  # the learning ruleset, as before
    engine.set_learnt("vnet0", "IP", ["10.0.0.5"])
    rs = engine.ruleset("vnet0")
    assert rs.learn is None and not set_matches(rs)
    engine.close()


def test_a_learnt_address_renders_as_elements_only(tmp_path: Path) -> None:
    b = binding()
    rs = compiler(tmp_path).compile(b, learnt_sets=SETS)
    rs = dataclasses.replace(rs, learn=Learning(learning_rules(b)))
    caps = render.Capabilities()
    first, record = render.render_port(rs, 1, None, caps, now=1000.0)
    names = {c["add"]["set"]["name"] for c in first.commands if "set" in c.get("add", {})}
    assert names == {"learn4_vnet0", "learnt_vnet0"}
    learnt = dataclasses.replace(rs, learn=dataclasses.replace(
        rs.learn, addresses=(LearntAddr(ipaddress.ip_address("10.0.0.5"), 4600.0),)))
    batch, _record = render.render_port(learnt, 1, record, caps, rs, now=1000.0)
    assert batch.commands == [
        {"flush": {"set": {"family": "bridge", "table": "nwfilter", "name": "learn4_vnet0"}}},
        {"add": {"element": {"family": "bridge", "table": "nwfilter", "name": "learn4_vnet0",
                             "elem": [{"elem": {"val": "10.0.0.5", "timeout": 3600}}]}}},
        {"flush": {"set": {"family": "bridge", "table": "nwfilter", "name": "learnt_vnet0"}}},
        {"add": {"element": {"family": "bridge", "table": "nwfilter", "name": "learnt_vnet0",
                             "elem": [{"elem": {"val": "vnet0", "timeout": 3600}}]}}},
    ]


def test_store_keeps_all_ports_in_one_file_and_reads_older_files(tmp_path: Path) -> None:
    store = LearntStore(tmp_path)
    now = time.time()
    addr = LearntAddress("10.0.0.5", "dhcp", now, now + 60, "10.0.0.1")
    store.dir.get().write("old0.json", '{"IP": [{"address": "10.0.0.9", "source": "arp", '
                          '"learnt_at": 1.0}]}')
    store.save_all({"vnet0": {"IP": (addr,)}, "vnet1": {"IP": ()}})
    assert store.dir.get().names(".json") == ["ports.json"]  # older files go
    store.dir.get().write("old0.json", '{"IP": [{"address": "10.0.0.9", "source": "arp", '
                          '"learnt_at": 1.0}]}')
    found, warnings = store.load(["vnet0", "old0"], now)
    assert not warnings
    assert found == {"vnet0": {"IP": (addr,)},
                     "old0": {"IP": (LearntAddress("10.0.0.9", "arp", 1.0),)}}
    found, _w = store.load(["vnet0", "old0"], now + 120)  # the lease ended
    assert "vnet0" not in found


def test_readback_keeps_the_learnt_elements_of_a_port() -> None:
    from nwfilter.backends.nft import readback

    text = """table bridge nwfilter {
	set learn4_vnet0 {
		type ipv4_addr
		flags timeout
		elements = { 10.0.0.5 timeout 1h expires 59m58s, 10.0.0.6 timeout 1h expires 3s }
	}

	set learnt_vnet0 {
		type ifname
		flags timeout
		elements = { "vnet0" timeout 1h expires 59m58s }
	}
}
"""
    listing = readback.parse({"bridge": text})
    assert listing.learn_elements[("bridge", "learn4_vnet0")] == {"10.0.0.5", "10.0.0.6"}
    assert not listing.sets  # not taken for connlimit or ipset sets
    record = readback.port_record(listing, "vnet0", 1)
    assert record.learn_sets == {("bridge", "learn4_vnet0"): frozenset({"10.0.0.5", "10.0.0.6"}),
                                 ("bridge", "learnt_vnet0"): frozenset({"vnet0"})}
