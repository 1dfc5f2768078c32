"""Property tests: generated valid filters are a fixed point of
parse∘format, and arbitrary input raises nothing but NwfilterError."""

from __future__ import annotations

import contextlib
import os
from xml.sax.saxutils import quoteattr

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nwfilter.conf import (
    format_binding,
    format_domain,
    format_filter,
    parse_binding,
    parse_domain,
    parse_filter,
    schema,
)
from nwfilter.conf.values import (
    BoolType,
    CommentType,
    IPMaskType,
    IpsetFlagsType,
    IpsetNameType,
    IPv4AddrType,
    IPv6AddrType,
    MacAddrType,
    MacMaskType,
    NamedNumberType,
    StateType,
    TcpFlagsType,
    UIntType,
    ValueType,
)
from nwfilter.errors import NwfilterError

SETTINGS = settings(
    max_examples=int(os.environ.get("NWFILTER_HYPOTHESIS_EXAMPLES", "150")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)


def _number(lo: int, hi: int) -> st.SearchStrategy[str]:
    return st.integers(lo, hi).flatmap(lambda n: st.sampled_from([str(n), f"0x{n:x}", f"0X{n:X}"]))


def _flag_set(names: tuple[str, ...]) -> st.SearchStrategy[str]:
    return st.lists(st.sampled_from(names), min_size=1, max_size=4).map(",".join)


_XML_CHARS = st.characters(blacklist_categories=("Cs", "Cc"), blacklist_characters="\ufffe\uffff")


def text_for(vtype: ValueType) -> st.SearchStrategy[str]:
    if isinstance(vtype, NamedNumberType):
        return st.one_of(
            st.sampled_from(sorted(vtype.names))
            .map(lambda s: st.sampled_from([s, s.lower(), s.upper()]))
            .flatmap(lambda x: x),
            _number(vtype.minimum, vtype.maximum),
        )
    if isinstance(vtype, UIntType):
        return _number(vtype.minimum, vtype.maximum)
    if isinstance(vtype, MacMaskType):
        return st.integers(0, 48).map(
            lambda p: ":".join(
                f"{b:02x}" for b in (((1 << 48) - (1 << (48 - p))).to_bytes(6, "big"))
            )
        )
    if isinstance(vtype, MacAddrType):
        return st.binary(min_size=6, max_size=6).map(lambda b: ":".join(f"{x:X}" for x in b))
    if isinstance(vtype, IPv4AddrType):
        return st.ip_addresses(v=4).map(str)
    if isinstance(vtype, IPv6AddrType):
        return st.ip_addresses(v=6).map(lambda a: a.exploded)
    if isinstance(vtype, IPMaskType):
        return st.integers(0, vtype.width).map(str)
    if isinstance(vtype, BoolType):
        return st.sampled_from(sorted(BoolType.TRUE | BoolType.FALSE))
    if isinstance(vtype, StateType):
        return _flag_set(("NEW", "ESTABLISHED", "RELATED", "INVALID", "NONE", "new"))
    if isinstance(vtype, TcpFlagsType):
        names = ("SYN", "ACK", "URG", "PSH", "FIN", "RST", "ALL", "NONE", "syn")
        return st.tuples(_flag_set(names), _flag_set(names)).map("/".join)
    if isinstance(vtype, IpsetFlagsType):
        return st.lists(st.sampled_from(["src", "dst", "SRC"]), min_size=1, max_size=6).map(
            ",".join
        )
    if isinstance(vtype, IpsetNameType):
        return st.text(alphabet="abcXYZ019_.:-+ ", min_size=1, max_size=31)
    if isinstance(vtype, CommentType):
        return st.text(alphabet=_XML_CHARS, max_size=256).map(lambda s: s.strip())
    raise AssertionError(vtype)


VARIABLE = st.sampled_from(["$IP", "$MAC", "$X[1]", "$Y[@2]", "$Z[@0]"])


@st.composite
def protocol_element(draw: st.DrawFn) -> tuple[str, str]:
    protocol = draw(st.sampled_from(sorted(schema.PROTOCOLS)))
    specs = schema.PROTOCOLS[protocol]
    chosen = draw(st.sets(st.sampled_from([s.name for s in specs]), max_size=6))
    by_name = {s.name: s for s in specs}
    for name in list(chosen):
        req = by_name[name].requires
        if req is not None:
            chosen.add(req)
    texts: dict[str, str] = {}
    for spec in specs:
        if spec.name not in chosen:
            continue
        if spec.requires is not None and spec.name.endswith(("end", "-hi", "ipto")):
            texts[spec.name] = texts[spec.requires]
            continue
        if spec.variable_ok and draw(st.integers(0, 5)) == 0:
            texts[spec.name] = draw(VARIABLE)
        else:
            texts[spec.name] = draw(text_for(spec.type))
    if protocol in ("ip", "ipv6") and any("port" in n for n in texts):
        texts["protocol"] = draw(st.sampled_from(["tcp", "udp", "sctp", "0x21"]))
    if draw(st.booleans()):
        texts["match"] = draw(st.sampled_from(["yes", "no"]))
    attrs = " ".join(f"{k}={quoteattr(v)}" for k, v in texts.items())
    return protocol, f"<{protocol} {attrs}/>"


@st.composite
def filter_document(draw: st.DrawFn) -> str:
    chain = draw(st.sampled_from(["root", "mac", "stp-a", "arp-x", "ipv4", "ipv6.1", "rarp"]))
    prio = draw(st.one_of(st.none(), st.integers(-1000, 1000)))
    head = f"<filter name='gen' chain='{chain}'" + (
        f" priority='{prio}'>" if prio is not None else ">"
    )
    parts = [head]
    for _ in range(draw(st.integers(0, 4))):
        if draw(st.integers(0, 4)) == 0:
            params = draw(
                st.lists(
                    st.tuples(
                        st.sampled_from(["IP", "MAC", "A_1"]),
                        st.from_regex(r"[a-z0-9.:_]{1,8}", fullmatch=True),
                    ),
                    max_size=3,
                )
            )
            body = "".join(f"<parameter name='{n}' value='{v}'/>" for n, v in params)
            parts.append(f"<filterref filter='ref-{draw(st.integers(0, 9))}'>{body}</filterref>")
            continue
        element = draw(st.one_of(st.none(), protocol_element()))
        actions = ["drop", "accept", "reject", "return"]
        if element is None or schema.is_ethernet_protocol(element[0]):
            actions.append("continue")
        action = draw(st.sampled_from(actions))
        direction = draw(st.sampled_from(["in", "out", "inout"]))
        attrs = f"action='{action}' direction='{direction}'"
        if draw(st.booleans()):
            attrs += f" priority='{draw(st.integers(-1000, 1000))}'"
        if draw(st.booleans()):
            attrs += f" statematch='{draw(st.sampled_from(['true', 'false', '0', '1', 'FALSE']))}'"
        parts.append(f"<rule {attrs}>{element[1] if element else ''}</rule>")
    parts.append("</filter>")
    return "".join(parts)


@SETTINGS
@given(filter_document())
def test_generated_filters_are_a_fixed_point(doc: str) -> None:
    fdef = parse_filter(doc)
    text = format_filter(fdef)
    again = parse_filter(text)
    assert again == fdef
    assert format_filter(again) == text


@SETTINGS
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300)))
def test_arbitrary_input_raises_only_nwfilter_errors(data: str | bytes) -> None:
    for parse in (parse_filter, parse_binding, parse_domain):
        with contextlib.suppress(NwfilterError):
            parse(data)


ANY_VALUE = st.one_of(
    st.text(max_size=20).filter(lambda s: "'" not in s and "<" not in s and "&" not in s),
    st.sampled_from(["$", "$X[", "0x", "-1", "4294967296", "::", "1.2.3.4", "ALL/", ","]),
)


@SETTINGS
@given(
    st.sampled_from(sorted(schema.PROTOCOLS)).flatmap(
        lambda p: st.tuples(
            st.just(p),
            st.sampled_from([s.name for s in schema.PROTOCOLS[p]] + ["match", "bogus"]),
            ANY_VALUE,
        )
    )
)
def test_any_attribute_value_is_accepted_or_refused_cleanly(case: tuple[str, str, str]) -> None:
    protocol, attr, value = case
    doc = (
        f"<filter name='f'><rule action='accept' direction='in'>"
        f"<{protocol} {attr}='{value}'/></rule></filter>"
    )
    try:
        fdef = parse_filter(doc)
    except NwfilterError as exc:
        assert "\n" not in str(exc)
        return
    assert parse_filter(format_filter(fdef)) == fdef


@SETTINGS
@given(
    st.from_regex(r"[a-zA-Z0-9_.-]{1,20}", fullmatch=True),
    st.binary(min_size=6, max_size=6),
    st.lists(st.ip_addresses(), max_size=3),
)
def test_domain_and_binding_round_trip(name: str, mac: bytes, ips: list[object]) -> None:
    if name.startswith("."):
        name = "x" + name
    mac_text = ":".join(f"{b:02x}" for b in (bytes([mac[0] & 0xFE]) + mac[1:]))
    ip_xml = "".join(f"<ip address='{ip}'/>" for ip in ips)
    doc = (
        f"<domain type='test'><name>{name}</name><devices><interface type='ethernet'>"
        f"<mac address='{mac_text}'/>{ip_xml}<target dev='v{name[:14]}'/>"
        "</interface></devices></domain>"
    )
    try:
        dom = parse_domain(doc)
    except NwfilterError:
        # ifnames with '.' forms such as 'v..' are fine; only '.'/'..' are refused
        return
    assert parse_domain(format_domain(dom)) == dom
    binding = (
        f"<filterbinding><owner><name>{name}</name>"
        f"<uuid>{dom.uuid}</uuid></owner><portdev name='v{name[:14]}'/>"
        f"<mac address='{mac_text}'/><filterref filter='f'/></filterbinding>"
    )
    b = parse_binding(binding)
    assert parse_binding(format_binding(b)) == b
