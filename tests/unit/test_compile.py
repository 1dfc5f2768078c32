"""The compiler: parameters, variables, ordering, directions and errors."""

from __future__ import annotations

import dataclasses
import ipaddress
import uuid
from collections.abc import Sequence
from pathlib import Path

import pytest

from nwfilter.compile import compile_binding, compile_many, port_of
from nwfilter.compile.matches import UNSUPPORTED_ATTRS, check_attrs, ip_proto_number
from nwfilter.conf import parse_filter, schema
from nwfilter.conf.model import (
    Action,
    AttrValue,
    BindingDef,
    Direction,
    FilterDef,
    FilterRef,
    Parameter,
    ProtocolMatch,
    Rule,
    VarRef,
)
from nwfilter.errors import LoopError, UnresolvedError, UnsupportedError, ValidationError
from nwfilter.ir import (
    ETH_P_8021Q,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    ETH_P_RARP,
    STP_GROUP_MAC,
    CtState,
    Family,
    Field,
    Hook,
    IntRange,
    MacMatch,
    Match,
    Verdict,
)
from nwfilter.render_text import render_lines, render_text

MAC = "52:54:00:00:00:01"
STOCK = Path(__file__).resolve().parents[2] / "filters"


def attr(name: str, value: object) -> AttrValue:
    text = str(value)
    if isinstance(value, str) and value.startswith("$"):
        body = value[1:]
        if "[@" in body:
            n, it = body[:-1].split("[@")
            return AttrValue(name, VarRef(n, iterator=int(it)), value)
        if "[" in body:
            n, ix = body[:-1].split("[")
            return AttrValue(name, VarRef(n, index=int(ix)), value)
        return AttrValue(name, VarRef(body), value)
    return AttrValue(name, value, text)


def rule(
    protocol: str | None,
    *attrs: AttrValue,
    action: Action = Action.ACCEPT,
    direction: Direction = Direction.OUT,
    priority: int = 500,
    statematch: bool = True,
    negate: bool = False,
) -> Rule:
    if negate:
        attrs = tuple(dataclasses.replace(a, negate=True) for a in attrs)
    match = None if protocol is None else ProtocolMatch(protocol, tuple(attrs))
    return Rule(action, direction, priority, statematch, match)


def fdef(name: str, *entries: Rule | FilterRef, chain: str | None = None,
         priority: int | None = None) -> FilterDef:
    return FilterDef(name, uuid.uuid5(uuid.NAMESPACE_DNS, name), chain, priority, entries)


def ref(name: str, **params: str | Sequence[str]) -> FilterRef:
    out: list[Parameter] = []
    for key, value in params.items():
        for v in [value] if isinstance(value, str) else value:
            out.append(Parameter(key, v))
    return FilterRef(name, tuple(out))


def binding(filter_name: str, portdev: str = "vnet0", **params: str | Sequence[str]) -> BindingDef:
    return BindingDef("vm1", uuid.UUID(int=1), portdev, MAC, ref(filter_name, **params))


def build(filters: Sequence[FilterDef], b: BindingDef, **kw: object) -> object:
    return compile_binding(b, {f.name: f for f in filters}, **kw)  # type: ignore[arg-type]


def values_of(rs: object, hook: Hook, fld: Field, chain: str = "root") -> list[object]:
    out = []
    for c in rs.chains(hook):  # type: ignore[attr-defined]
        if c.name == chain:
            for r in c.rules:
                out.extend(m.value for m in r.matches if m.field is fld)
    return out


# ---------------------------------------------------------------- parameters


def test_binding_params_override_filterref_params() -> None:
    inner = fdef("inner", rule("mac", attr("srcmacaddr", "$X")))
    outer = fdef("outer", ref("inner", X="02:00:00:00:00:02"))
    rs = build([inner, outer], binding("outer"))
    assert values_of(rs, Hook.FROM_VM, Field.ETH_SRC) == [MacMatch("02:00:00:00:00:02")]
    rs = build([inner, outer], binding("outer", X="02:00:00:00:00:09"))
    assert values_of(rs, Hook.FROM_VM, Field.ETH_SRC) == [MacMatch("02:00:00:00:00:09")]


def test_outer_filterref_params_override_inner_ones() -> None:
    leaf = fdef("leaf", rule("mac", attr("srcmacaddr", "$X")))
    mid = fdef("mid", ref("leaf", X="02:00:00:00:00:03"))
    top = fdef("top", ref("mid", X="02:00:00:00:00:04"))
    rs = build([leaf, mid, top], binding("top"))
    assert values_of(rs, Hook.FROM_VM, Field.ETH_SRC) == [MacMatch("02:00:00:00:00:04")]


def test_mac_defaults_to_port_mac_unless_given() -> None:
    f = fdef("f", rule("mac", attr("srcmacaddr", "$MAC")))
    assert values_of(build([f], binding("f")), Hook.FROM_VM, Field.ETH_SRC) == [MacMatch(MAC)]
    rs = build([f], binding("f", MAC="02:00:00:00:00:07"))
    assert values_of(rs, Hook.FROM_VM, Field.ETH_SRC) == [MacMatch("02:00:00:00:00:07")]


def test_ip_from_learnt_and_missing_ip_is_unresolved() -> None:
    f = fdef("f", rule("ip", attr("srcipaddr", "$IP")))
    rs = build([f], binding("f"), learnt={"IP": ["10.0.0.9"]})
    assert values_of(rs, Hook.FROM_VM, Field.IP_SRC) == [ipaddress.ip_network("10.0.0.9/32")]
    rs = build([f], binding("f", IP="10.0.0.1"), learnt={"IP": ["10.0.0.9"]})
    assert values_of(rs, Hook.FROM_VM, Field.IP_SRC) == [ipaddress.ip_network("10.0.0.1/32")]
    with pytest.raises(UnresolvedError) as err:
        build([f], binding("f"))
    assert "'IP'" in str(err.value) and "filter 'f' rule 1" in str(err.value)


def test_bad_variable_value_names_rule() -> None:
    f = fdef("f", rule("ip", attr("srcipaddr", "$IP")))
    with pytest.raises(ValidationError) as err:
        build([f], binding("f", IP="not-an-address"))
    text = str(err.value)
    assert "'IP'" in text and "srcipaddr" in text and "filter 'f' rule 1" in text


def test_missing_filter_and_loop() -> None:
    with pytest.raises(UnresolvedError, match=r"'nope'.*'top'"):
        build([fdef("top", ref("nope"))], binding("top"))
    with pytest.raises(UnresolvedError, match="'absent'"):
        build([], binding("absent"))
    a, b = fdef("a", ref("b")), fdef("b", ref("a"))
    with pytest.raises(LoopError):
        build([a, b], binding("a"))


# ----------------------------------------------------------------- iterators


def _dports(rs: object, hook: Hook = Hook.FROM_VM) -> list[tuple[object, ...]]:
    out = []
    for r in rs.l3_rules(hook):  # type: ignore[attr-defined]
        d = {m.field: m.value for m in r.matches}
        out.append((d.get(Field.IP_DST), d.get(Field.L4_DPORT)))
    return out


A = ["10.0.0.1", "10.0.0.2"]
P = ["80", "443"]


def _net(s: str) -> object:
    return ipaddress.ip_network(s + "/32")


def test_plain_lists_iterate_in_parallel() -> None:
    f = fdef("f", rule("tcp", attr("dstipaddr", "$A"), attr("dstportstart", "$P")))
    rs = build([f], binding("f", A=A, P=P))
    assert _dports(rs) == [
        (_net("10.0.0.1"), IntRange(80, 80)),
        (_net("10.0.0.2"), IntRange(443, 443)),
    ]


def test_parallel_lists_of_different_length_are_refused() -> None:
    f = fdef("f", rule("tcp", attr("dstipaddr", "$A"), attr("dstportstart", "$P")))
    with pytest.raises(ValidationError, match="different numbers of values"):
        build([f], binding("f", A=A, P=["1", "2", "3"]))


def test_distinct_iterators_give_cross_product_first_fastest() -> None:
    f = fdef("f", rule("tcp", attr("dstipaddr", "$A[@1]"), attr("dstportstart", "$P[@2]")))
    rs = build([f], binding("f", A=A, P=P))
    assert _dports(rs) == [
        (_net("10.0.0.1"), IntRange(80, 80)),
        (_net("10.0.0.2"), IntRange(80, 80)),
        (_net("10.0.0.1"), IntRange(443, 443)),
        (_net("10.0.0.2"), IntRange(443, 443)),
    ]


def test_plain_list_changes_fastest_against_named_iterator() -> None:
    f = fdef("f", rule("tcp", attr("dstipaddr", "$A[@1]"), attr("dstportstart", "$P")))
    rs = build([f], binding("f", A=A, P=P))
    assert [p for _, p in _dports(rs)] == [IntRange(80, 80), IntRange(443, 443)] * 2


def test_shared_iterator_id_advances_together() -> None:
    f = fdef("f", rule("tcp", attr("dstipaddr", "$A[@3]"), attr("dstportstart", "$P[@3]")))
    rs = build([f], binding("f", A=A, P=P))
    assert len(_dports(rs)) == 2


def test_element_access_and_out_of_range() -> None:
    f = fdef("f", rule("tcp", attr("dstipaddr", "$A[1]"), attr("dstportstart", "$P")))
    rs = build([f], binding("f", A=A, P=P))
    assert _dports(rs) == [
        (_net("10.0.0.2"), IntRange(80, 80)),
        (_net("10.0.0.2"), IntRange(443, 443)),
    ]
    g = fdef("g", rule("tcp", attr("dstipaddr", "$A[2]")))
    with pytest.raises(UnresolvedError, match="no element 2"):
        build([g], binding("g", A=A))


def test_duplicate_combinations_are_skipped() -> None:
    f = fdef("f", rule("tcp", attr("dstipaddr", "$A"), attr("dstportstart", "$P")))
    rs = build([f], binding("f", A=["10.0.0.1", "10.0.0.2", "10.0.0.1"], P=["1", "3", "1"]))
    assert len(_dports(rs)) == 2


# ------------------------------------------------------------------ ordering


def test_chains_ordered_by_priority_with_protocol_restricted_jumps() -> None:
    filters = [
        fdef("top", ref("a"), ref("m"), ref("v4"), ref("s"),
             rule(None, action=Action.DROP, priority=1000),
             rule("mac", attr("protocolid", 0x0806), priority=-500)),
        fdef("a", rule("arp", action=Action.RETURN), chain="arp"),
        fdef("m", rule("mac", action=Action.RETURN), chain="mac"),
        fdef("v4", rule("ip", action=Action.RETURN), chain="ipv4-x"),
        # libvirt's table of default chain priorities has no 'stp' entry, so
        # an stp filter without a priority sits at 0; -810 must be explicit.
        fdef("s", rule("stp", action=Action.DROP), chain="stp", priority=-810),
    ]
    rs = build(filters, binding("top"))
    chains = rs.chains(Hook.FROM_VM)  # type: ignore[attr-defined]
    assert [c.name for c in chains] == ["root", "stp", "mac", "ipv4-x", "arp"]
    root = chains[0].rules
    assert [(r.verdict, r.target, r.priority) for r in root] == [
        (Verdict.JUMP, "stp", -810),
        (Verdict.JUMP, "mac", -800),
        (Verdict.JUMP, "ipv4-x", -700),
        (Verdict.JUMP, "arp", -500),  # a jump goes before a root rule of equal priority
        (Verdict.ACCEPT, None, -500),
        (Verdict.DROP, None, 1000),
    ]
    assert root[0].matches == (Match(Field.ETH_DST, MacMatch("01:80:c2:00:00:00")),)
    assert root[1].matches == ()
    assert root[2].matches == (Match(Field.ETH_TYPE, 0x0800),)
    assert root[3].matches == (Match(Field.ETH_TYPE, 0x0806),)


def test_rules_ordered_by_priority_then_document_order_and_chains_shared() -> None:
    filters = [
        fdef("top", ref("x"), ref("y")),
        fdef("x", rule("arp", attr("opcode", 1), priority=600),
             rule("arp", attr("opcode", 2), priority=100), chain="arp"),
        fdef("y", rule("arp", attr("opcode", 3), priority=600), chain="arp"),
    ]
    rs = build(filters, binding("top"))
    chains = rs.chains(Hook.FROM_VM)  # type: ignore[attr-defined]
    assert [c.name for c in chains] == ["root", "arp"]
    assert values_of(rs, Hook.FROM_VM, Field.ARP_OP, "arp") == [2, 1, 3]
    assert len(chains[0].rules) == 1


def test_l3_rules_root_first_then_priority() -> None:
    filters = [
        fdef("top", ref("sub"), rule("tcp", attr("dstportstart", 1), priority=900)),
        fdef("sub", rule("tcp", attr("dstportstart", 2), priority=-900), chain="ipv4"),
    ]
    rs = build(filters, binding("top"))
    assert [p for _, p in _dports(rs)] == [IntRange(1, 1), IntRange(2, 2)]


# ---------------------------------------------------------------- directions


def test_l2_directions_and_inout_reversal() -> None:
    f = fdef("f", rule("mac", attr("srcmacaddr", "02:00:00:00:00:05"), direction=Direction.INOUT))
    rs = build([f], binding("f"))
    assert values_of(rs, Hook.FROM_VM, Field.ETH_DST) == [MacMatch("02:00:00:00:00:05")]
    assert values_of(rs, Hook.TO_VM, Field.ETH_SRC) == [MacMatch("02:00:00:00:00:05")]
    g = fdef("g", rule("mac", attr("srcmacaddr", "02:00:00:00:00:05"), direction=Direction.IN))
    rs = build([g], binding("g"))
    assert rs.chains(Hook.FROM_VM) == ()  # type: ignore[attr-defined]
    assert values_of(rs, Hook.TO_VM, Field.ETH_SRC) == [MacMatch("02:00:00:00:00:05")]


def _l3(rs: object, hook: Hook) -> list[dict[Field, object]]:
    return [
        {**{m.field: m.value for m in r.matches}, "verdict": r.verdict}  # type: ignore[dict-item]
        for r in rs.l3_rules(hook)  # type: ignore[attr-defined]
    ]


NEW_EST = frozenset({CtState.NEW, CtState.ESTABLISHED})
EST = frozenset({CtState.ESTABLISHED})


def test_l3_out_rule_gets_implicit_state_and_reply_rule() -> None:
    f = fdef("f", rule("tcp", attr("dstipaddr", ipaddress.ip_address("10.1.1.1")),
                       attr("dstportstart", 22)))
    rs = build([f], binding("f"))
    out, = _l3(rs, Hook.FROM_VM)
    back, = _l3(rs, Hook.TO_VM)
    assert out[Field.IP_DST] == _net("10.1.1.1") and out[Field.L4_DPORT] == IntRange(22, 22)
    assert out[Field.CT_STATE] == NEW_EST and out["verdict"] is Verdict.RETURN  # type: ignore[index]
    assert out[Field.IP_PROTO] == 6
    assert back[Field.IP_SRC] == _net("10.1.1.1") and back[Field.L4_SPORT] == IntRange(22, 22)
    assert back[Field.CT_STATE] == EST and back["verdict"] is Verdict.ACCEPT  # type: ignore[index]


def test_l3_in_rule_matches_as_written_towards_the_guest() -> None:
    f = fdef("f", rule("tcp", attr("srcipaddr", ipaddress.ip_address("10.1.1.1")),
                       attr("dstportstart", 22), direction=Direction.IN))
    rs = build([f], binding("f"))
    to_vm, = _l3(rs, Hook.TO_VM)
    from_vm, = _l3(rs, Hook.FROM_VM)
    assert to_vm[Field.IP_SRC] == _net("10.1.1.1") and to_vm[Field.L4_DPORT] == IntRange(22, 22)
    assert to_vm[Field.CT_STATE] == NEW_EST
    assert from_vm[Field.IP_DST] == _net("10.1.1.1") and from_vm[Field.L4_SPORT] == IntRange(22, 22)
    assert from_vm[Field.CT_STATE] == EST


def test_state_only_on_accept_and_not_for_inout_or_statematch_false() -> None:
    d = fdef("d", rule("udp", action=Action.DROP))
    assert all(Field.CT_STATE not in r for r in _l3(build([d], binding("d")), Hook.FROM_VM))
    io = fdef("io", rule("udp", direction=Direction.INOUT))
    rs = build([io], binding("io"))
    assert all(Field.CT_STATE not in r for h in Hook for r in _l3(rs, h))
    nf = fdef("nf", rule("udp", statematch=False))
    rs = build([nf], binding("nf"))
    assert all(Field.CT_STATE not in r for h in Hook for r in _l3(rs, h))


def test_explicit_state_creates_only_the_asked_direction() -> None:
    f = fdef("f", rule("tcp", attr("state", frozenset({"NEW"})), action=Action.DROP))
    rs = build([f], binding("f"))
    out, = _l3(rs, Hook.FROM_VM)
    assert out[Field.CT_STATE] == frozenset({CtState.NEW}) and out["verdict"] is Verdict.DROP  # type: ignore[index]
    assert _l3(rs, Hook.TO_VM) == []


def test_srcmac_only_rule_has_no_reply_instance() -> None:
    f = fdef("f", rule("all", attr("srcmacaddr", MAC)))
    rs = build([f], binding("f"))
    assert len(_l3(rs, Hook.FROM_VM)) == 1 and _l3(rs, Hook.TO_VM) == []


def test_icmp_type_has_no_reply_instance() -> None:
    f = fdef("f", rule("icmp", attr("type", 8)))
    rs = build([f], binding("f"))
    assert len(_l3(rs, Hook.FROM_VM)) == 1 and _l3(rs, Hook.TO_VM) == []


def test_reject_on_layer2_is_drop_and_continue_on_layer3_is_unsupported() -> None:
    f = fdef("f", rule("mac", action=Action.REJECT))
    rs = build([f], binding("f"))
    assert rs.chains(Hook.FROM_VM)[0].rules[0].verdict is Verdict.DROP  # type: ignore[attr-defined]
    g = fdef("g", rule("tcp", action=Action.CONTINUE))
    with pytest.raises(UnsupportedError) as err:
        build([g], binding("g"))
    assert "continue" in str(err.value) and "filter 'g' rule 1" in str(err.value)


def test_negation_is_per_attribute() -> None:
    f = fdef("f", rule("mac", attr("srcmacaddr", "$MAC"), negate=True, action=Action.DROP))
    rs = build([f], binding("f"))
    (r,) = rs.chains(Hook.FROM_VM)[0].rules  # type: ignore[attr-defined]
    assert r.matches == (Match(Field.ETH_SRC, MacMatch(MAC), negate=True),)
    assert "eth-src != 52:54:00:00:00:01 -> drop  # f rule 1" in render_text(rs)


def test_split_elements_negate_only_their_own_attributes() -> None:
    f = parse_filter(
        "<filter name='f'><rule action='drop' direction='out'>"
        "<tcp dstportstart='22'/><tcp match='no' srcipaddr='10.1.2.0' srcipmask='24'/>"
        "</rule><rule action='drop' direction='out'>"
        "<mac protocolid='ipv4'/><mac match='no' srcmacaddr='$MAC'/></rule></filter>"
    )
    rs = build([f], binding("f"))
    (l2,) = rs.chains(Hook.FROM_VM)[0].rules  # type: ignore[attr-defined]
    assert set(l2.matches) == {Match(Field.ETH_SRC, MacMatch(MAC), negate=True),
                               Match(Field.ETH_TYPE, 0x0800)}
    (l3,) = rs.l3_rules(Hook.FROM_VM)  # type: ignore[attr-defined]
    assert Match(Field.IP_SRC, ipaddress.IPv4Network("10.1.2.0/24"), negate=True) in l3.matches
    assert Match(Field.L4_DPORT, IntRange.single(22)) in l3.matches


def test_sub_chains_end_in_accept_as_libvirts_chain_policy() -> None:
    sub = fdef("sub", rule("mac", attr("protocolid", 0x88B5), action=Action.RETURN),
               chain="mac-t")
    closed = fdef("closed", rule("arp", attr("opcode", 1), action=Action.RETURN),
                  rule(None, action=Action.DROP), chain="arp-t")
    top = fdef("top", ref("sub"), ref("closed"))
    rs = build([sub, closed, top], binding("top"))
    chains = {c.name: c for c in rs.chains(Hook.FROM_VM)}  # type: ignore[attr-defined]
    last = chains["mac-t"].rules[-1]
    assert (last.matches, last.verdict) == ((), Verdict.ACCEPT)
    assert "libvirt's chain policy ACCEPT" in str(last.origin)
    # a chain whose last rule stops every frame gets nothing more
    assert [r.verdict for r in chains["arp-t"].rules] == [Verdict.RETURN, Verdict.DROP]


def test_compile_many_shares_work_and_keys_by_port() -> None:
    f = fdef("f", rule("mac", attr("srcmacaddr", "$MAC")))
    bs = [
        BindingDef("vm", uuid.UUID(int=2), f"vnet{i}", f"52:54:00:00:00:{i:02x}", ref("f"))
        for i in range(3)
    ]
    out = compile_many(bs, {"f": f})
    assert sorted(out) == ["vnet0", "vnet1", "vnet2"]
    assert values_of(out["vnet2"], Hook.FROM_VM, Field.ETH_SRC) == [MacMatch("52:54:00:00:00:02")]


# --------------------------------------------------------------- stock filters


def _stock() -> dict[str, FilterDef]:
    out = {}
    for path in STOCK.glob("*.xml"):
        f = parse_filter(path.read_bytes(), source=str(path))
        out[f.name] = f
    return out


def test_clean_traffic_gives_the_expected_rules() -> None:
    rs = compile_binding(binding("clean-traffic", IP="10.0.0.5"), _stock())
    lines = render_lines(rs)
    root = [line for line in lines if line.startswith("from-vm root:")]
    assert root[:2] == [
        "from-vm root: -800 jump mac",
        "from-vm root: -710 eth-type == 0x0800 jump ipv4-ip",
    ]
    assert root[-1] == "from-vm root: 1000 -> drop  # no-other-l2-traffic rule 1"
    text = "\n".join(lines)
    # MAC anti-spoofing
    assert "from-vm mac: 500 eth-src == 52:54:00:00:00:01 -> return" in text
    assert "from-vm mac: 500 -> drop" in text
    # IP anti-spoofing, with DHCP from 0.0.0.0 allowed
    assert (
        "from-vm ipv4-ip: 100 eth-type == 0x0800 ip-src == 0.0.0.0 ip-proto == 17 -> return" in text
    )
    assert "from-vm ipv4-ip: 500 eth-type == 0x0800 ip-src == 10.0.0.5 -> return" in text
    assert "from-vm ipv4-ip: 1000 -> drop" in text
    # ARP anti-spoofing
    assert "from-vm arp-mac: 350 eth-type == 0x0806 arp-sha == 52:54:00:00:00:01 -> return" in text
    assert "from-vm arp-ip: 400 eth-type == 0x0806 arp-spa == 10.0.0.5 -> return" in text
    assert "to-vm root: -500 eth-type == 0x0806 -> accept" in text
    # RARP self-announcement only
    assert "from-vm rarp: 1000 -> drop" in text
    assert "to-vm ipv4: 500 -> accept  # allow-incoming-ipv4 rule 1" in text
    assert rs.l3 == {}
    assert all(r.family is Family.ETHER for c in rs.chains(Hook.TO_VM) for r in c.rules)


def test_clean_traffic_with_ip_list_expands_and_needs_ip() -> None:
    filters = _stock()
    rs = compile_binding(binding("clean-traffic", IP=["10.0.0.5", "10.0.0.6"]), filters)
    assert values_of(rs, Hook.FROM_VM, Field.ARP_SPA, "arp-ip") == [
        _net("10.0.0.5"), _net("10.0.0.6"),
    ]
    with pytest.raises(UnresolvedError, match="'IP'"):
        compile_binding(binding("clean-traffic"), filters)


def test_stp_chain_default_priority_is_libvirts() -> None:
    filters = [
        fdef("top", ref("s"), rule(None, action=Action.DROP, priority=1)),
        fdef("s", rule("stp", action=Action.DROP), chain="stp"),
    ]
    root = build(filters, binding("top")).chains(Hook.FROM_VM)[0].rules
    assert [(r.verdict, r.priority) for r in root] == [(Verdict.JUMP, 0), (Verdict.DROP, 1)]


# --------------------------------------------------------------- tables


def test_ip_protocol_numbers_come_from_the_schema() -> None:
    expected = {
        "tcp": 6, "udp": 17, "udplite": 136, "esp": 50, "ah": 51, "sctp": 132,
        "icmp": 1, "igmp": 2, "all": None, "tcp-ipv6": 6, "udp-ipv6": 17,
        "udplite-ipv6": 136, "esp-ipv6": 50, "ah-ipv6": 51, "sctp-ipv6": 132,
        "icmpv6": 58, "all-ipv6": None,
    }
    assert {p: ip_proto_number(p) for p in expected} == expected


def test_every_schema_attribute_but_tcp_option_is_understood() -> None:
    for protocol, specs in schema.PROTOCOLS.items():
        names = frozenset(s.name for s in specs) - UNSUPPORTED_ATTRS
        check_attrs(protocol, names)
    for protocol in ("tcp", "tcp-ipv6"):
        with pytest.raises(UnsupportedError, match="'option'"):
            check_attrs(protocol, frozenset({"option"}))


def test_layer2_protocols_match_their_ethertype_and_jumps_their_chain() -> None:
    expected = {
        "ip": ETH_P_IP, "ipv6": ETH_P_IPV6, "arp": ETH_P_ARP, "rarp": ETH_P_RARP,
        "vlan": ETH_P_8021Q,
    }
    for protocol, ethertype in expected.items():
        rs = build([fdef("f", rule(protocol))], binding("f"))
        (r,) = rs.chains(Hook.FROM_VM)[0].rules  # type: ignore[attr-defined]
        assert r.matches == (Match(Field.ETH_TYPE, ethertype),)
    filters = [fdef("top", ref("s")), fdef("s", rule("stp"), chain="stp")]
    (jump,) = build(filters, binding("top")).chains(Hook.FROM_VM)[0].rules  # type: ignore[attr-defined]
    assert jump.matches == (Match(Field.ETH_DST, MacMatch(STP_GROUP_MAC)),)


def test_port_of_gives_the_rulesets_port() -> None:
    b = binding("f")
    rs = build([fdef("f", rule("mac"))], b)
    assert rs.port == port_of(b)  # type: ignore[attr-defined]
    assert (rs.port.portdev, rs.port.mac, rs.port.owner_uuid) == (  # type: ignore[attr-defined]
        "vnet0", MAC, str(uuid.UUID(int=1)),
    )
