"""Structure of filter documents: defaults, order, errors, fixed point."""

from __future__ import annotations

import ipaddress
import uuid

import pytest

from nwfilter.conf import (
    Action,
    AttrValue,
    Direction,
    FilterDef,
    FilterRef,
    Parameter,
    ProtocolMatch,
    Rule,
    VarRef,
    format_filter,
    parse_filter,
    schema,
)
from nwfilter.errors import ErrorCode, NwfilterError, ValidationError, XMLError


def rule(body: str, attrs: str = "action='accept' direction='in'") -> str:
    return f"<filter name='f'><rule {attrs}>{body}</rule></filter>"


def test_minimal_filter_defaults() -> None:
    fdef = parse_filter("<filter name='f'/>")
    assert fdef.chain == "root"
    assert fdef.priority == 0
    assert isinstance(fdef.uuid, uuid.UUID)
    assert fdef.entries == ()
    text = format_filter(fdef)
    assert text == f"<filter name='f' chain='root'>\n  <uuid>{fdef.uuid}</uuid>\n</filter>\n"


def test_generated_uuid_differs() -> None:
    assert parse_filter("<filter name='f'/>").uuid != parse_filter("<filter name='f'/>").uuid


def test_uuid_kept_lowercase() -> None:
    fdef = parse_filter(
        "<filter name='f'><uuid> 0A1B2C3D-0000-4000-8000-000000000001 </uuid></filter>"
    )
    assert str(fdef.uuid) == "0a1b2c3d-0000-4000-8000-000000000001"


@pytest.mark.parametrize(
    ("chain", "priority"),
    [
        ("root", 0),
        ("mac", -800),
        ("mac-x", -800),
        ("vlan", -750),
        ("stp", 0),
        ("stp-x", 0),
        ("arp", -500),
        ("rarp", -400),
        ("rarp-y", -400),
        ("ipv4", -700),
        ("ipv6", -600),
        ("ipv6.a:b_c", -600),
    ],
)
def test_chain_default_priority(chain: str, priority: int) -> None:
    fdef = parse_filter(f"<filter name='f' chain='{chain}'/>")
    assert fdef.chain == chain
    assert fdef.priority == priority
    assert schema.chain_priority(fdef) == priority
    out = format_filter(fdef)
    assert (f"priority='{priority}'" in out) == (priority != 0)


def test_explicit_zero_priority_on_custom_chain() -> None:
    fdef = parse_filter("<filter name='f' chain='arp-x' priority='0'/>")
    assert fdef.priority == 0
    assert parse_filter(format_filter(fdef)).priority == 0


def test_chain_helpers() -> None:
    assert schema.chain_kind("arp-xyz") == "arp"
    assert schema.chain_kind("rarp") == "rarp"
    assert schema.chain_kind("root") == "root"
    for bad in ("rootx", "tcp", "", "mac-abcdefghi", "mac x"):
        with pytest.raises(ValidationError):
            schema.chain_kind(bad)
    hand = FilterDef("f", uuid.uuid4(), chain=None, priority=None)
    assert schema.chain_priority(hand) == 0


def test_entries_keep_document_order() -> None:
    fdef = parse_filter(
        "<filter name='f'>"
        "<filterref filter='a'/>"
        "<rule action='drop' direction='out' priority='-5'/>"
        "<filterref filter='b'><parameter name='X' value='2'/>"
        "<parameter name='A' value='1'/><parameter name='X' value='1'/></filterref>"
        "</filter>"
    )
    assert [type(e).__name__ for e in fdef.entries] == ["FilterRef", "Rule", "FilterRef"]
    ref = fdef.entries[2]
    assert isinstance(ref, FilterRef)
    assert ref.params == (Parameter("A", "1"), Parameter("X", "2"), Parameter("X", "1"))
    assert ref.param_dict() == {"A": ["1"], "X": ["2", "1"]}
    assert fdef.referenced_names() == frozenset({"a", "b"})


def test_rule_fields() -> None:
    fdef = parse_filter(
        rule(
            "<tcp match='no' dstportstart='22' srcipaddr='$IP[@1]'/>",
            "action='reject' direction='inout' priority='-1000' statematch='FALSE'",
        )
    )
    (r,) = fdef.rules
    assert r.action is Action.REJECT
    assert r.direction is Direction.INOUT
    assert r.priority == -1000
    assert r.statematch is False
    assert r.match is not None
    assert r.match.protocol == "tcp"
    assert r.match.negate is True
    assert [a.name for a in r.match.attrs] == ["srcipaddr", "dstportstart"]
    src = r.match.get("srcipaddr")
    assert src is not None and src.is_variable and src.value == VarRef("IP", iterator=1)
    port = r.match.get("dstportstart")
    assert port is not None and port.value == 22 and port.text == "22"


def test_match_no_without_attributes_is_dropped() -> None:
    fdef = parse_filter(rule("<tcp match='no'/>"))
    assert fdef.rules[0].match == ProtocolMatch("tcp", ())


def test_lone_ipset_gets_src_flag_except_on_all() -> None:
    tcp = parse_filter(rule("<tcp ipset='s'/>")).rules[0].match
    assert tcp is not None and tcp.get("ipsetflags") == AttrValue("ipsetflags", ("src",), "src")
    all_ = parse_filter(rule("<all ipset='s'/>")).rules[0].match
    assert all_ is not None and all_.get("ipsetflags") is None


def test_continue_allowed_on_layer2_and_bare_rules() -> None:
    parse_filter(rule("<mac srcmacaddr='$MAC'/>", "action='continue' direction='in'"))
    parse_filter(rule("", "action='continue' direction='in'"))
    with pytest.raises(ValidationError, match="continue"):
        parse_filter(rule("<all/>", "action='continue' direction='in'"))
    with pytest.raises(ValidationError, match="continue"):
        parse_filter(rule("<icmpv6/>", "action='continue' direction='in'"))


@pytest.mark.parametrize("proto", ["tcp", "udp", "sctp", "33", "0x6", "0x84"])
def test_ip_ports_need_port_protocol(proto: str) -> None:
    parse_filter(rule(f"<ip protocol='{proto}' dstportstart='1'/>"))
    parse_filter(rule(f"<ipv6 protocol='{proto}' srcportstart='1'/>"))


def test_variables_in_ranges_are_not_ordered() -> None:
    parse_filter(rule("<tcp dstportstart='$P' dstportend='1'/>"))


def test_error_names_rule_position_and_source() -> None:
    doc = (
        "<filter name='f'><rule action='accept' direction='in'/>"
        "<filterref filter='x'/><rule action='accept' direction='in'/>"
        "<rule action='accept' direction='in'><tcp dstportstart='70000'/></rule></filter>"
    )
    with pytest.raises(ValidationError) as info:
        parse_filter(doc, source="my.xml")
    assert str(info.value) == "my.xml: rule 3 <tcp dstportstart='70000'>: port must be 0-65535"
    assert info.value.code is ErrorCode.INVALID


def test_format_refuses_broken_model() -> None:
    bad = FilterDef(
        "f",
        uuid.uuid4(),
        entries=(
            Rule(
                Action.ACCEPT,
                Direction.IN,
                match=ProtocolMatch("tcp", (AttrValue("dstportstart", 70000, "70000"),)),
            ),
        ),
    )
    with pytest.raises(ValidationError, match="cannot be printed"):
        format_filter(bad)


def test_hand_built_model_formats_canonically() -> None:
    fdef = FilterDef(
        "hand",
        uuid.UUID("0a1b2c3d-0000-4000-8000-000000000001"),
        chain="ipv4",
        priority=None,
        entries=(
            Rule(
                Action.ACCEPT,
                Direction.OUT,
                match=ProtocolMatch(
                    "ip",
                    (
                        AttrValue("protocol", 17, "udp"),
                        AttrValue("srcipaddr", ipaddress.IPv4Address("10.0.0.1"), "10.0.0.1"),
                    ),
                ),
            ),
        ),
    )
    text = format_filter(fdef)
    assert "priority='-700'" in text
    assert "<ip srcipaddr='10.0.0.1' protocol='udp'/>" in text


@pytest.mark.parametrize(
    "doc",
    [
        "",
        "<filter",
        "<filter name='f'>text</filter>",
        "<filter name='f'><rule action='accept' direction='in'>x</rule></filter>",
        "<filter name='f'><rule action='accept' direction='in'><tcp>x</tcp></rule></filter>",
        "<filter name='f'><rule action='accept' direction='in'><tcp><udp/></tcp></rule></filter>",
        "<filter name='f' xmlns:x='urn:x' x:a='1'/>",
        "<f:filter xmlns:f='urn:x' name='f'/>",
        "<filter name='f' foo='bar'/>",
        b"\xff\xfe<\x00f\x00",
        "<?xml version='1.0' encoding='ISO-8859-1'?><filter name='f'/>",
    ],
)
def test_malformed_documents(doc: str | bytes) -> None:
    with pytest.raises(NwfilterError) as info:
        parse_filter(doc)
    assert isinstance(info.value, XMLError | ValidationError)


def test_bytes_and_declaration_accepted() -> None:
    doc = "<?xml version='1.0' encoding='UTF-8'?>\n<filter name='é'/>".encode()
    assert parse_filter(doc).name == "é"
    assert parse_filter("\ufeff<filter name='f'/>".encode()).name == "f"


def test_comments_and_pis_are_ignored() -> None:
    fdef = parse_filter(
        "<!-- c --><filter name='f'><!-- x --><?pi y?>"
        "<rule action='accept' direction='in'><!-- z --></rule></filter>"
    )
    assert len(fdef.rules) == 1


def test_protocol_sets_are_consistent() -> None:
    for proto in schema.PROTOCOLS:
        kinds = [
            schema.is_ethernet_protocol(proto),
            schema.is_ipv4_protocol(proto),
            schema.is_ipv6_protocol(proto),
        ]
        assert kinds.count(True) == 1, proto
        names = [s.name for s in schema.PROTOCOLS[proto]]
        assert len(names) == len(set(names))
        assert names[-1] == "comment"
        for spec in schema.PROTOCOLS[proto]:
            assert spec.requires is None or spec.requires in names
            assert schema.attr_spec(proto, spec.name) is spec
    with pytest.raises(ValidationError):
        schema.attr_spec("tcp", "nope")
    with pytest.raises(ValidationError):
        schema.attr_spec("nope", "srcipaddr")
    assert "IP" in schema.RESERVED_VARIABLES and "MAC" in schema.RESERVED_VARIABLES


def test_output_uses_single_quotes_and_escapes_every_quote() -> None:
    fdef = parse_filter(
        "<filter name='q'><rule action='accept' direction='in'>"
        "<tcp comment=\"it's &quot;quoted&quot; &amp; &lt;tagged&gt;\"/></rule></filter>"
    )
    text = format_filter(fdef)
    assert "comment='it&apos;s &quot;quoted&quot; &amp; &lt;tagged&gt;'" in text
    assert parse_filter(text) == fdef


# --- several elements of one protocol (libvirt's split form) -------------------


def test_split_elements_form_one_rule_with_per_attribute_match() -> None:
    (r,) = parse_filter(
        rule("<tcp dstportstart='22'/><tcp match='no' srcipaddr='10.1.2.3' srcipmask='24'/>")
    ).rules
    assert r.match is not None and r.match.protocol == "tcp"
    assert [(a.name, a.negate) for a in r.match.attrs] == [
        ("srcipaddr", True), ("srcipmask", True), ("dstportstart", False)]
    assert r.match.negated == frozenset({"srcipaddr", "srcipmask"})
    assert r.match.negate is False


def test_split_form_prints_as_libvirt_runs_of_equal_match() -> None:
    text = format_filter(parse_filter(rule(
        "<tcp match='no' srcmacaddr='1:2:3:4:5:6' dstipaddr='10.0.0.1'/>"
        "<tcp srcipaddr='10.1.2.0' srcipmask='24' state='NEW' dstportstart='22'/>"
        "<tcp match='no' flags='SYN/SYN' comment='c'/>")))
    assert (
        "    <tcp match='no' srcmacaddr='01:02:03:04:05:06'/>\n"
        "    <tcp srcipaddr='10.1.2.0' srcipmask='24'/>\n"
        "    <tcp match='no' dstipaddr='10.0.0.1'/>\n"
        "    <tcp state='NEW' dstportstart='22'/>\n"
        "    <tcp match='no' flags='SYN/SYN' comment='c'/>\n"
    ) in text


def test_one_element_with_match_no_negates_every_attribute() -> None:
    (r,) = parse_filter(rule("<udp match='no' srcipaddr='10.0.0.1' dstportstart='53'/>")).rules
    assert r.match is not None and r.match.negate is True
    assert "<udp match='no' srcipaddr='10.0.0.1' dstportstart='53'/>" in format_filter(
        parse_filter(rule("<udp match='no' srcipaddr='10.0.0.1' dstportstart='53'/>")))


def test_split_elements_with_the_same_attribute_are_refused() -> None:
    with pytest.raises(ValidationError) as info:
        parse_filter(rule("<tcp dstportstart='22'/><tcp match='no' dstportstart='23'/>"))
    assert str(info.value) == (
        "rule 1 <tcp dstportstart='23'>: dstportstart is also given in an earlier <tcp>"
        " element of this rule")


def test_split_elements_of_different_protocols_are_refused() -> None:
    with pytest.raises(ValidationError, match="one protocol, found <tcp>, <udp>"):
        parse_filter(rule("<tcp dstportstart='22'/><udp dstportstart='23'/>"))


def test_mask_and_address_in_elements_of_different_match_are_refused() -> None:
    with pytest.raises(ValidationError, match="srcipmask must have the same match as srcipaddr"):
        parse_filter(rule("<tcp srcipaddr='10.0.0.0'/><tcp match='no' srcipmask='8'/>"))


def test_split_elements_may_complete_each_other() -> None:
    (r,) = parse_filter(rule("<tcp srcportstart='10'/><tcp srcportend='20'/>")).rules
    assert r.match is not None
    assert [a.name for a in r.match.attrs] == ["srcportstart", "srcportend"]


def test_lone_ipset_flag_takes_the_match_of_its_ipset() -> None:
    (r,) = parse_filter(rule("<tcp dstportstart='1'/><tcp match='no' ipset='s'/>")).rules
    assert r.match is not None
    flags = r.match.get("ipsetflags")
    assert flags is not None and flags.negate is True


# --- variable references with white space (libvirt's own test inputs) ----------


@pytest.mark.parametrize(
    ("text", "printed"),
    [
        ("$A[ 0]", "$A[0]"),
        ("$B[  @0 ] ", "$B"),
        ("$B[ @2 ]", "$B[@2]"),
        ("$B[@ 1]", "$B[@1]"),
        ("$A[1 ]", "$A[1]"),
        ("$A[&#9;0&#9;]&#9;", "$A[0]"),
        ("$A[&#10;0&#13;]", "$A[0]"),
        ("$A[01]", "$A[1]"),
    ],
)
def test_variable_white_space_as_libvirt(text: str, printed: str) -> None:
    fdef = parse_filter(rule(f"<ip srcipaddr='{text}'/>"))
    assert f"<ip srcipaddr='{printed}'/>" in format_filter(fdef)


@pytest.mark.parametrize(
    "text", ["$A ", " $A", "$A&#9;", "$A [0]", "$A[0]x", "$A[0] x", "$A[+1]", "$A[-0]",
             "$A[0x1]", "$", "$A[]"],
)
def test_variable_forms_libvirt_refuses_or_garbage_are_refused(text: str) -> None:
    with pytest.raises(ValidationError):
        parse_filter(rule(f"<ip srcipaddr='{text}'/>"))


# --- filter priority on the root chain ----------------------------------------


def test_priority_without_chain_is_dropped_as_libvirt_does() -> None:
    fdef = parse_filter("<filter name='f' priority='-500'/>")
    assert fdef.priority == 0
    assert format_filter(fdef).startswith("<filter name='f' chain='root'>")


def test_priority_on_explicit_root_chain_is_printed_as_libvirt_does() -> None:
    text = format_filter(parse_filter("<filter name='f' chain='root' priority='-500'/>"))
    assert text.startswith("<filter name='f' chain='root' priority='-500'>")
