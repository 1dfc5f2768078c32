"""The pure nft renderer: golden outputs, field mapping, refusals, replacement diffs."""

from __future__ import annotations

import dataclasses
import ipaddress
import json
import os
import re
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nwfilter.backends.nft import render
from nwfilter.backends.nft.render import Capabilities
from nwfilter.errors import UnsupportedError, ValidationError
from nwfilter.ir import (
    AddrRange,
    Chain,
    CtState,
    Family,
    Field,
    Hook,
    IntRange,
    IPSetMatch,
    MacMatch,
    Match,
    Origin,
    Port,
    Rule,
    Ruleset,
    TcpFlag,
    TcpFlags,
    Verdict,
    drop_all,
)
from tests.nft_rulesets import clean_traffic, l3_rule, with_l3

GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "nft"
CAPS = Capabilities()


# A port stamp covers the renderer's own source (render.renderer_salt): the
# golden files hold it as a placeholder; tests below check stamps themselves.
_STAMP_TEXT = re.compile(r"nwfilter stamp [0-9a-f]+\.[0-9a-f]+ #d=[0-9a-f]+")


def _golden(name: str, value: Any) -> None:
    path = GOLDEN / name
    text = _STAMP_TEXT.sub("nwfilter stamp STAMP", json.dumps(value, indent=1, sort_keys=True))
    text += "\n"
    if os.environ.get("NWFILTER_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"missing golden file {path} (set NWFILTER_UPDATE_GOLDEN=1)"
    assert json.loads(path.read_text()) == json.loads(text)


def _l2(*rules: Rule, hook: Hook = Hook.FROM_VM, portdev: str = "vnet0") -> Ruleset:
    return Ruleset(port=Port(portdev, "52:54:00:00:00:00"),
                   l2={hook: (Chain("root", 0, tuple(rules)),)})


def _rule(*matches: Match, verdict: Verdict = Verdict.ACCEPT, family: Family = Family.ETHER,
          target: str | None = None) -> Rule:
    return Rule(family, tuple(matches), verdict, target=target, origin=Origin("f", 1))


def _exprs(ruleset: Ruleset, caps: Capabilities = CAPS) -> list[list[dict[str, Any]]]:
    batch, _ = render.render_port(ruleset, 1, None, caps)
    return [c["add"]["rule"]["expr"] for c in batch.commands
            if "add" in c and "rule" in c["add"]
            and not c["add"]["rule"]["chain"].endswith("/stamp")
            and not c["add"]["rule"]["comment"].startswith(render.ENTRY_TEXT)]


def test_golden_base() -> None:
    _golden("base.json", render.render_base().document())


def test_golden_clean_traffic() -> None:
    rs = with_l3(clean_traffic("vnet0", "52:54:00:00:00:00", "10.77.0.10"), to_vm=(
        l3_rule([Match(Field.CT_STATE, frozenset({CtState.ESTABLISHED, CtState.RELATED}))],
                Verdict.ACCEPT),
        l3_rule([Match(Field.IP_PROTO, 6), Match(Field.L4_DPORT, IntRange(8000, 8080))],
                Verdict.ACCEPT, idx=2),
        l3_rule([], Verdict.REJECT, idx=3),
    ))
    batch, record = render.render_port(rs, 7, None, CAPS)
    _golden("clean_traffic.json", batch.document())
    assert record.l2_hooks == {Hook.FROM_VM, Hook.TO_VM}
    assert record.l3_hooks == {Hook.TO_VM}
    _golden("clean_traffic_remove.json", render.render_remove(record).document())


def test_deterministic() -> None:
    rs = clean_traffic("vnet0", "52:54:00:00:00:00", "10.77.0.10")
    a = render.render_port(rs, 1, None, CAPS)[0].document()
    b = render.render_port(rs, 1, None, CAPS)[0].document()
    assert a == b


def test_names_are_injective_and_capped() -> None:
    names = {render.l2_chain_name(p, Hook.FROM_VM, c) for p, c in [
        ("a-b", "c"), ("a", "b-c"), ("a.b", "c"), ("x61", "root"), ("a", "root"),
        ("é", "root"), ("_c3a9", "root"), ("1abc", "root")]}
    assert len(names) == 8
    assert render.l2_chain_name("é", Hook.TO_VM, "root") == "_c3a9/to/root"
    with pytest.raises(UnsupportedError):
        render.l2_chain_name("vnet0", Hook.FROM_VM, "x" * 200)
    for bad in ("", "a/b", "a:b", "a b", "x" * 16, "..", "*", "v*", "v\\*", "@v", 'v"x'):
        with pytest.raises(ValidationError, match="port name"):
            render.check_ruleset(drop_all(Port(bad, "52:54:00:00:00:01")), Capabilities())


@given(st.lists(st.tuples(st.text(min_size=1, max_size=15), st.text(min_size=1, max_size=20)),
                max_size=30))
def test_chain_and_set_names_are_injective_and_nft_strings(
    pairs: list[tuple[str, str]],
) -> None:
    # nft's scanner reads an unquoted name as one string when it starts with a
    # letter, '_' or '.' and goes on with letters, digits and '/', '-', '_', '.'.
    nft_string = re.compile(r"[A-Za-z_.][A-Za-z0-9/_.-]*")
    chains = {}
    for p, c in set(pairs):
        try:
            chains[(p, c)] = render.l2_chain_name(p, Hook.FROM_VM, c)
        except UnsupportedError:
            assert len(f"{p}{c}".encode()) * 2 + 10 > render.MAX_NAME  # too long only
    assert len(set(chains.values())) == len(chains)
    sets = {p: render.ipset_name(p, Family.IPV4) for p, _ in pairs}
    assert len(set(sets.values())) == len(sets)
    for name in [*chains.values(), *sets.values(), *(render.l3_chain_name(p, Hook.TO_VM)
                                                     for p, _ in pairs)]:
        assert nft_string.fullmatch(name), name


@given(st.text(max_size=40), st.text(max_size=40))
def test_comments_escape_injectively_into_printable_utf8(a: str, b: str) -> None:
    ca, cb = render.comment_text(a), render.comment_text(b)
    if a != b and len(a) <= 20 and len(b) <= 20:
        assert ca != cb
    for text in (ca, cb):
        assert text.encode("utf-8").decode() == text
        assert '"' not in text and not any(ord(c) < 0x20 or 0x7F <= ord(c) <= 0x9F for c in text)


def test_comment_escapes_and_cut() -> None:
    assert render.comment_text('say "hi"\n\\') == "say \\u0022hi\\u0022\\u000a\\\\"
    assert render.comment_text("caf\u00e9 \udcff") == "caf\u00e9 \\udcff"
    cut = render.comment_text("\x00" * 100)
    assert cut == "\\u0000" * (render.MAX_COMMENT_BYTES // 6)


def test_mac_with_mask_and_negation() -> None:
    rs = _l2(_rule(Match(Field.ETH_SRC, MacMatch("52:54:00:12:34:56", "ff:ff:ff:00:00:00"),
                         negate=True)))
    assert _exprs(rs)[0][0] == {"match": {"op": "!=", "left": {"&": [
        {"payload": {"protocol": "ether", "field": "saddr"}}, "ff:ff:ff:00:00:00"]},
        "right": "52:54:00:00:00:00"}}


def test_rarp_uses_raw_payloads_with_guards() -> None:
    rs = _l2(_rule(Match(Field.ETH_TYPE, 0x8035), Match(Field.ARP_OP, 3),
                   Match(Field.ARP_SHA, MacMatch("52:54:00:00:00:01")),
                   Match(Field.ARP_TPA, ipaddress.IPv4Network("0.0.0.0/32"))))
    exprs = _exprs(rs)[0]
    text = json.dumps(exprs)
    assert '"protocol": "arp"' not in text
    assert {"match": {"op": "==", "left": {"payload": {"base": "nh", "offset": 48, "len": 16}},
                      "right": 3}} in exprs
    # hlen 6 / htype 1 and plen 4 / ptype IPv4, as ebtables' arp match checks.
    assert {"match": {"op": "==", "left": {"payload": {"base": "nh", "offset": 32, "len": 8}},
                      "right": 6}} in exprs
    assert {"match": {"op": "==", "left": {"payload": {"base": "nh", "offset": 40, "len": 8}},
                      "right": 4}} in exprs


def test_stp_config_fields_split_like_ebt_stp() -> None:
    rs = _l2(_rule(Match(Field.STP_TYPE, 0), Match(Field.STP_ROOT_PRIO, IntRange(0, 4096))),
             _rule(Match(Field.STP_ROOT_COST, IntRange.single(4)), verdict=Verdict.DROP))
    rules = _exprs(rs)
    assert len(rules) == 3  # 1 for the first rule, 2 for the config-only rule
    non_config, config = rules[1], rules[2]
    assert non_config[-3] == {"match": {"op": "!=", "left": {"payload": {
        "base": "nh", "offset": 48, "len": 8}}, "right": 0}}
    assert {"match": {"op": "==", "left": {"payload": {"base": "nh", "offset": 128, "len": 32}},
                      "right": 4}} in config
    assert rules[0][0]["match"]["right"] == "01:80:c2:00:00:00"


def test_l3_fields() -> None:
    rs = with_l3(_l2(), from_vm=(
        l3_rule([Match(Field.IP_SRC_RANGE, AddrRange(ipaddress.ip_address("10.0.0.1"),
                                                     ipaddress.ip_address("10.0.0.9"))),
                 Match(Field.IP_PROTO, 6), Match(Field.IP_DSCP, 10),
                 Match(Field.TCP_FLAGS, TcpFlags(frozenset({TcpFlag.SYN, TcpFlag.ACK}),
                                                 frozenset({TcpFlag.SYN}))),
                 Match(Field.L4_SPORT, IntRange(1024, 65535), negate=True)], Verdict.DROP),
        l3_rule([Match(Field.IP_DST, ipaddress.IPv6Network("2001:db8::/32")),
                 Match(Field.IP_PROTO, 58), Match(Field.ICMP_TYPE, IntRange(128, 129))],
                Verdict.RETURN, family=Family.IPV6),
        l3_rule([Match(Field.IPSET, IPSetMatch("blocked", ("src",)))], Verdict.REJECT),
        l3_rule([Match(Field.IP_PROTO, 6), Match(Field.CONNLIMIT_ABOVE, 4)], Verdict.DROP),
        l3_rule([Match(Field.CT_STATE, frozenset({CtState.INVALID}), negate=True)],
                Verdict.CONTINUE),
    ))
    batch, record = render.render_port(rs, 3, None, CAPS)
    text = json.dumps(batch.document())
    assert '{"range": ["10.0.0.1", "10.0.0.9"]}' in text
    assert '{"&": [{"payload": {"protocol": "tcp", "field": "flags"}}, 18]}, "right": 2' in text
    assert '"op": "!=", "left": {"payload": {"protocol": "th", "field": "sport"}}' in text
    assert '"protocol": "icmpv6", "field": "type"}}, "right": {"range": [128, 129]}' in text
    assert '"right": "@ipset4_blocked"' in text
    assert '"ct count": {"val": 4, "inv": true}' in text
    assert '{"continue": null}' in text
    assert any(n.startswith("cl4_vnet0_") for n in record.sets)
    assert record.l3_hooks == {Hook.FROM_VM}
    # The root chain stamps the port id into the low half of the mark.
    root = [c for c in batch.commands if "add" in c and "rule" in c["add"]
            and c["add"]["rule"]["chain"] == "vnet0/from/root"]
    assert root[0]["add"]["rule"]["expr"] == [render.COUNTER]  # the entry counter
    assert root[1]["add"]["rule"]["expr"][0]["mangle"]["value"]["|"][1] == 3


@pytest.mark.parametrize("ruleset, why", [
    (_l2(_rule(Match(Field.ETH_TYPE, 0x806), Match(Field.ARP_GRATUITOUS, True))), "gratuitous"),
    (_l2(_rule(Match(Field.CT_STATE, frozenset({CtState.NEW})))), "conntrack"),
    (_l2(_rule(verdict=Verdict.REJECT)), "reject"),
    (_l2(_rule(verdict=Verdict.JUMP, target="nope")), "unknown chain"),
    (_l2(_rule(Match(Field.ARP_OP, 1))), "without ethertype"),
    (_l2(_rule(Match(Field.IP_SRC, ipaddress.IPv4Network("10.0.0.0/8")))), "ethertype"),
    (with_l3(_l2(), to_vm=(l3_rule([Match(Field.L4_DPORT, IntRange.single(1))],
                                   Verdict.DROP),)), "port match"),
    (with_l3(_l2(), to_vm=(l3_rule([Match(Field.IPSET, IPSetMatch("s", ("src", "dst")))],
                                   Verdict.DROP),)), "one-dimensional"),
    (with_l3(_l2(), to_vm=(l3_rule([Match(Field.IP_SRC, ipaddress.IPv6Network("::1/128"))],
                                   Verdict.DROP),)), "IPv6 address in an IPv4"),
    (with_l3(_l2(), to_vm=(l3_rule([Match(Field.ETH_DST, MacMatch("52:54:00:00:00:01"))],
                                   Verdict.DROP),)), "layer-3 rule"),
])
def test_refusals(ruleset: Ruleset, why: str) -> None:
    with pytest.raises(UnsupportedError, match=why):
        render.check_ruleset(ruleset, CAPS)


def test_l3_rule_matches_the_source_mac() -> None:
    rs = with_l3(_l2(), to_vm=(l3_rule([Match(Field.ETH_SRC, MacMatch("52:54:00:00:00:01"),
                                              negate=True)], Verdict.DROP),))
    render.check_ruleset(rs, CAPS)
    batch, _ = render.render_port(rs, 1, None, CAPS)
    l3 = [c["add"]["rule"]["expr"] for c in batch.commands
          if "rule" in c.get("add", {}) and c["add"]["rule"]["family"] == "inet"]
    assert {"match": {"op": "!=", "left": {"payload": {"protocol": "ether", "field": "saddr"}},
                      "right": "52:54:00:00:00:01"}} in l3[0]


def test_l2_reject_with_bridge_reject_support() -> None:
    caps = Capabilities(bridge_reject=True)
    assert _exprs(_l2(_rule(verdict=Verdict.REJECT)), caps)[0][-1] == {
        "reject": {"type": "icmpx", "expr": "port-unreachable"}}
    with pytest.raises(UnsupportedError):
        render.check_ruleset(_l2(_rule(verdict=Verdict.REJECT), hook=Hook.TO_VM), caps)


def test_replacement_flushes_kept_deletes_gone_and_swaps_elements() -> None:
    first = with_l3(clean_traffic("vnet0", "52:54:00:00:00:00", "10.0.0.1"),
                    from_vm=(l3_rule([], Verdict.ACCEPT),))
    _, record = render.render_port(first, 5, None, CAPS)
    second = Ruleset(port=first.port, l2={Hook.FROM_VM: (first.l2[Hook.FROM_VM][0],
                                                         first.l2[Hook.FROM_VM][1])})
    # root still jumps to chains that no longer exist; keep a consistent tree
    root = Chain("root", 0, (_rule(verdict=Verdict.JUMP, target="mac"),))
    second = Ruleset(port=first.port, l2={Hook.FROM_VM: (root, first.l2[Hook.FROM_VM][1])})
    batch, new = render.render_port(second, 5, record, CAPS)
    verbs = [(next(iter(c)), next(iter(c[next(iter(c))]))) for c in batch.commands]
    cmds = batch.commands
    assert {"flush": {"chain": {"family": "bridge", "table": "nwfilter",
                                "name": "vnet0/from/root"}}} in cmds
    assert {"delete": {"chain": {"family": "bridge", "table": "nwfilter",
                                 "name": "vnet0/from/arp-ip"}}} in cmds
    assert {"delete": {"element": {"family": "bridge", "table": "nwfilter", "name": "to_vm",
                                   "elem": ["vnet0"]}}} in cmds
    assert {"delete": {"element": {"family": "inet", "table": "nwfilter", "name": "l3_from",
                                   "elem": [5]}}} in cmds
    assert ("add", "chain") not in verbs  # nothing new: only flushes and refills
    assert new.bridge_chains == {"vnet0/from/root", "vnet0/from/mac", "vnet0/stamp"}
    assert new.l2_hooks == {Hook.FROM_VM} and not new.l3_hooks
    # deletes come after every flush of the same chain
    idx_flush = cmds.index({"flush": {"chain": {"family": "bridge", "table": "nwfilter",
                                                "name": "vnet0/from/arp-ip"}}})
    idx_del = cmds.index({"delete": {"chain": {"family": "bridge", "table": "nwfilter",
                                               "name": "vnet0/from/arp-ip"}}})
    assert idx_flush < idx_del


def test_comments_are_cut_at_character_boundaries() -> None:
    rule = Rule(Family.ETHER, (), Verdict.DROP, origin=Origin("é" * 200, 1))
    expr = render.render_port(_l2(rule), 1, None, CAPS)[0].commands
    comments = [c["add"]["rule"].get("comment") for c in expr if "rule" in c.get("add", {})]
    assert comments and all(len(x.encode()) <= render.MAX_COMMENT_BYTES for x in comments)
    assert all(x.encode().decode() == x for x in comments)


def test_kept_layer3_chain_keeps_its_connlimit_set() -> None:
    limit = l3_rule([Match(Field.IP_PROTO, 6), Match(Field.CONNLIMIT_ABOVE, 4)], Verdict.DROP)
    first = with_l3(clean_traffic("vnet0", "52:54:00:00:00:00", "10.0.0.1"), to_vm=(limit,))
    _, record = render.render_port(first, 2, None, CAPS)
    (cl_set,) = record.sets
    assert cl_set.startswith("cl4_vnet0_")
    # Only a layer-2 chain changes: the layer-3 chain stays as it is.
    mac = Chain("mac", -800, (_rule(Match(Field.ETH_SRC, MacMatch("52:54:00:00:00:01")),
                                    verdict=Verdict.RETURN),))
    second = Ruleset(port=first.port, l3=first.l3, l2={
        Hook.FROM_VM: tuple(mac if c.name == "mac" else c for c in first.l2[Hook.FROM_VM]),
        Hook.TO_VM: first.l2[Hook.TO_VM]})
    batch, new = render.render_port(second, 2, record, CAPS, first)
    assert not any("delete" in c for c in batch.commands)
    assert not any(c.get("add", {}).get("rule", {}).get("chain") == "vnet0/to"
                   for c in batch.commands)
    assert new.sets == record.sets
    # ... and a later replacement that drops the rule still deletes the set.
    batch, last = render.render_port(clean_traffic("vnet0", "52:54:00:00:00:00", "10.0.0.1"),
                                     2, new, CAPS, second)
    assert {"delete": {"set": {"family": "inet", "table": "nwfilter", "name": cl_set}}} \
        in batch.commands
    assert not last.sets


def test_port_matches_need_a_protocol_libvirt_gives_ports() -> None:
    udplite = with_l3(_l2(), to_vm=(l3_rule([Match(Field.IP_PROTO, 136),
                                             Match(Field.L4_DPORT, IntRange.single(5))],
                                            Verdict.DROP),))
    with pytest.raises(UnsupportedError, match="port match"):
        render.check_ruleset(udplite, CAPS)
    for proto in (6, 17, 33, 132):
        render.check_ruleset(with_l3(_l2(), to_vm=(
            l3_rule([Match(Field.IP_PROTO, proto), Match(Field.L4_DPORT, IntRange.single(5))],
                    Verdict.DROP),)), CAPS)


def test_every_rule_of_a_port_counts_packets() -> None:
    """Each rule of the port's chains (but the stamp, which no packet walks)
    has a counter before its verdict, and each root chain begins with a
    counter of every frame entering it; the digests cover the statement."""
    rs = with_l3(clean_traffic("vnet0", "52:54:00:00:00:01", "10.0.0.1"), from_vm=(
        l3_rule([Match(Field.IP_PROTO, 6), Match(Field.CONNLIMIT_ABOVE, 4)], Verdict.DROP),))
    batch, record = render.render_port(rs, 1, None, CAPS)
    rules = [c["add"]["rule"] for c in batch.commands if "rule" in c.get("add", {})]
    assert rules
    roots = set()
    for rule in rules:
        exprs = rule["expr"]
        if rule["chain"].endswith("/stamp"):
            assert render.COUNTER not in exprs
            continue
        assert exprs.count(render.COUNTER) == 1, rule
        if rule["comment"].startswith(render.ENTRY_TEXT):
            roots.add(rule["chain"])
            assert exprs == [render.COUNTER]
        elif "mangle" not in exprs[0]:
            assert exprs[-2] == render.COUNTER, rule
    assert roots == {"vnet0/from/root", "vnet0/to/root"}
    for (_family, name), rendered in record.contents.items():
        if name.endswith("/root"):
            assert rendered[0] == ([render.COUNTER], render.ENTRY_TEXT)


def test_a_rewritten_chain_keeps_the_counts_of_its_unchanged_rules() -> None:
    """A record read back from the kernel carries each rule's counter values;
    rendering a changed chain against it starts every rule whose digest the
    chain held at its old values, and a new rule at zero."""
    rs = clean_traffic("vnet0", "52:54:00:00:00:01", "10.0.0.1")
    _batch, first = render.render_port(rs, 1, None, CAPS)
    key = ("bridge", "vnet0/from/mac")
    held = first.digests[key]
    counts = {k: tuple((7 * i + 1, 100 * i + 60) for i, _ in enumerate(v))
              for k, v in first.digests.items()}
    kernel = dataclasses.replace(first, contents={}, counts=counts)
    mac = next(c for c in rs.chains(Hook.FROM_VM) if c.name == "mac")
    extra = Rule(Family.ETHER, (Match(Field.ETH_TYPE, 0x88B5),), Verdict.DROP,
                 origin=Origin("extra", 1))
    changed = Ruleset(port=rs.port, l2={**rs.l2, Hook.FROM_VM: tuple(
        Chain(c.name, c.priority, (extra, *c.rules)) if c is mac else c
        for c in rs.chains(Hook.FROM_VM))})
    batch, record = render.render_port(changed, 1, kernel, CAPS)
    written = [c["add"]["rule"] for c in batch.commands if "rule" in c.get("add", {})]
    assert {r["chain"] for r in written} == {"vnet0/from/mac", "vnet0/stamp"}
    mac_rules = [r for r in written if r["chain"] == "vnet0/from/mac"]
    found = [next(e["counter"] for e in r["expr"] if "counter" in e) for r in mac_rules]
    assert found == [None, {"packets": 1, "bytes": 60}, {"packets": 8, "bytes": 160}]
    # The digests are those of the rules, whatever their counts.
    assert record.digests[key][1:] == held
    assert [render.digest_of(r["comment"]) for r in mac_rules] == list(record.digests[key])
    assert record.counts == {}
