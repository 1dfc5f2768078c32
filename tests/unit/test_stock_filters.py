"""The 24 stock filters: libvirt's names, chains, priorities, references and
variables; they parse, round-trip, load into a pool and form no loop."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import pytest

from nwfilter.conf import format_filter, parse_filter
from nwfilter.conf.model import Action, Direction, FilterDef
from nwfilter.pool import FilterPool, default_stock_dir, effective_chain, effective_priority

STOCK = Path(__file__).resolve().parents[2] / "filters"

# name: (chain, priority, references in order, variables, rule count), as libvirt ships them
EXPECTED: dict[str, tuple[str, int, tuple[str, ...], frozenset[str], int]] = {
    "allow-arp": ("arp", -500, (), frozenset(), 1),
    "allow-dhcp": ("ipv4", -700, (), frozenset(), 2),
    "allow-dhcp-server": ("ipv4", -700, (), frozenset({"DHCPSERVER"}), 2),
    "allow-dhcpv6": ("ipv6", -600, (), frozenset(), 2),
    "allow-dhcpv6-server": ("ipv6", -600, (), frozenset({"DHCPSERVER"}), 2),
    "allow-incoming-ipv4": ("ipv4", -700, (), frozenset(), 1),
    "allow-incoming-ipv6": ("ipv6", -600, (), frozenset(), 1),
    "allow-ipv4": ("ipv4", -700, (), frozenset(), 1),
    "allow-ipv6": ("ipv6", -600, (), frozenset(), 1),
    "clean-traffic": (
        "root", 0,
        ("no-mac-spoofing", "no-ip-spoofing", "allow-incoming-ipv4", "no-arp-spoofing",
         "no-other-l2-traffic", "qemu-announce-self"),
        frozenset(), 2,
    ),
    "clean-traffic-gateway": (
        "root", 0,
        ("no-mac-spoofing", "no-ip-spoofing", "no-arp-spoofing", "no-other-l2-traffic",
         "qemu-announce-self"),
        frozenset({"GATEWAY_MAC"}), 3,
    ),
    "no-arp-ip-spoofing": ("arp-ip", -510, (), frozenset({"IP"}), 2),
    "no-arp-mac-spoofing": ("arp-mac", -520, (), frozenset({"MAC"}), 2),
    "no-arp-spoofing": ("root", 0, ("no-arp-mac-spoofing", "no-arp-ip-spoofing"), frozenset(), 0),
    "no-ip-multicast": ("ipv4", -700, (), frozenset(), 1),
    "no-ip-spoofing": ("ipv4-ip", -710, (), frozenset({"IP"}), 3),
    "no-ipv6-multicast": ("ipv6", -600, (), frozenset(), 1),
    "no-ipv6-spoofing": ("ipv6-ip", -610, (), frozenset({"IPV6"}), 3),
    "no-mac-broadcast": ("ipv4", -700, (), frozenset(), 1),
    "no-mac-spoofing": ("mac", -800, (), frozenset({"MAC"}), 2),
    "no-other-l2-traffic": ("root", 0, (), frozenset(), 1),
    "no-other-rarp-traffic": ("rarp", -400, (), frozenset(), 1),
    "qemu-announce-self": (
        "root", 0, ("qemu-announce-self-rarp", "no-other-rarp-traffic"), frozenset(), 1
    ),
    "qemu-announce-self-rarp": ("rarp", -400, (), frozenset({"MAC"}), 2),
}


def load_all() -> dict[str, FilterDef]:
    out = {}
    for path in sorted(STOCK.glob("*.xml")):
        fdef = parse_filter(path.read_bytes(), source=str(path))
        assert path.name == f"{fdef.name}.xml"
        out[fdef.name] = fdef
    return out


def variables(fdef: FilterDef) -> frozenset[str]:
    names = set()
    for rule in fdef.rules:
        if rule.match is None:
            continue
        for attr in rule.match.attrs:
            if attr.text.startswith("$"):
                names.add(attr.text[1:].split("[", 1)[0])
    return frozenset(names)


def test_default_stock_dir() -> None:
    assert default_stock_dir() == STOCK


def test_exactly_the_libvirt_set() -> None:
    assert sorted(load_all()) == sorted(EXPECTED)
    assert len(EXPECTED) == 24


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_stock_filter_shape(name: str) -> None:
    fdef = load_all()[name]
    chain, priority, refs, varnames, rule_count = EXPECTED[name]
    assert effective_chain(fdef) == chain
    assert effective_priority(fdef) == priority
    assert tuple(r.filter for r in fdef.refs) == refs
    assert variables(fdef) == varnames
    assert len(fdef.rules) == rule_count
    assert parse_filter(format_filter(fdef)) == fdef


def test_uuids_are_unique_and_fixed() -> None:
    defs = load_all()
    assert len({d.uuid for d in defs.values()}) == 24
    assert load_all() == defs  # UUIDs come from the files, not generated


def test_references_stay_inside_the_set_without_loops() -> None:
    defs = load_all()
    graph: nx.DiGraph[str] = nx.DiGraph()
    for name, fdef in defs.items():
        graph.add_node(name)
        for ref in fdef.referenced_names():
            assert ref in defs, f"{name} references unknown {ref}"
            graph.add_edge(name, ref)
    assert nx.is_directed_acyclic_graph(graph)


def test_effects_of_key_rules() -> None:
    defs = load_all()
    mac = defs["no-mac-spoofing"].rules
    assert [(r.action, r.direction) for r in mac] == [
        (Action.RETURN, Direction.OUT), (Action.DROP, Direction.OUT)
    ]
    ip = defs["no-ip-spoofing"].rules
    assert [(r.action, r.priority) for r in ip] == [
        (Action.RETURN, 100), (Action.RETURN, 500), (Action.DROP, 1000)
    ]
    ct = defs["clean-traffic"].rules
    assert [(r.action, r.direction, r.priority) for r in ct] == [
        (Action.ACCEPT, Direction.OUT, -650), (Action.ACCEPT, Direction.INOUT, -500)
    ]
    l2 = defs["no-other-l2-traffic"].rules
    assert [(r.action, r.direction, r.priority, r.match) for r in l2] == [
        (Action.DROP, Direction.INOUT, 1000, None)
    ]
    dhcp = defs["allow-dhcp"].rules[0]
    assert dhcp.match is not None and dhcp.match.protocol == "ip"
    assert {a.name: a.text for a in dhcp.match.attrs} == {
        "srcipaddr": "0.0.0.0", "dstipaddr": "255.255.255.255", "protocol": "udp",
        "srcportstart": "68", "dstportstart": "67",
    }


def test_stock_loads_into_a_pool(tmp_path: Path) -> None:
    pool = FilterPool(tmp_path / "cfg", stock_dir=STOCK)
    assert pool.load() == []
    assert pool.names() == sorted(EXPECTED)
    assert pool.reached_by("no-mac-spoofing") == {
        "no-mac-spoofing", "clean-traffic", "clean-traffic-gateway"
    }
    assert pool.reaches("clean-traffic") == {
        "no-mac-spoofing", "no-ip-spoofing", "allow-incoming-ipv4", "no-arp-spoofing",
        "no-arp-mac-spoofing", "no-arp-ip-spoofing", "no-other-l2-traffic",
        "qemu-announce-self", "qemu-announce-self-rarp", "no-other-rarp-traffic",
    }
    for info in pool.list_info():
        assert (info.chain, info.priority, info.rule_count) == (
            EXPECTED[info.name][0], EXPECTED[info.name][1], EXPECTED[info.name][4]
        )


LIBVIRT_DIR = Path("/etc/libvirt/nwfilter")


@pytest.mark.skipif(
    not (LIBVIRT_DIR / "clean-traffic.xml").is_file(), reason="libvirt's filters not installed"
)
def test_same_definitions_as_installed_libvirt() -> None:
    for name, ours in load_all().items():
        path = LIBVIRT_DIR / f"{name}.xml"
        if not path.is_file():
            continue
        theirs = parse_filter(path.read_bytes(), source=str(path))
        assert (ours.chain, ours.priority, ours.entries) == (
            theirs.chain, theirs.priority, theirs.entries
        ), name
