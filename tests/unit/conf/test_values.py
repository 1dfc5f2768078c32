"""Typed values: text → typed literal → canonical text, and refusals."""

from __future__ import annotations

import ipaddress

import pytest

from nwfilter.conf import schema
from nwfilter.conf.model import VarRef
from nwfilter.conf.values import (
    TcpFlagsValue,
    check_ifname,
    check_object_name,
    parse_unicast_mac,
    parse_varref,
)
from nwfilter.errors import ValidationError

V4 = ipaddress.IPv4Address
V6 = ipaddress.IPv6Address

OK = [
    # (protocol, attribute, text, value, canonical text)
    ("tcp", "dstportstart", "22", 22, "22"),
    ("tcp", "dstportstart", "0x16", 22, "0x16"),
    ("tcp", "dstportstart", "0X1F", 31, "0x1f"),
    ("tcp", "dstportstart", "022", 22, "22"),
    ("tcp", "dstportstart", "65535", 65535, "65535"),
    ("udp", "dscp", "0x3f", 63, "0x3f"),
    ("udp", "connlimit-above", "0x10", 16, "0x10"),
    ("mac", "srcmacaddr", "AA:b:0C:00:1:ff", "aa:0b:0c:00:01:ff", "aa:0b:0c:00:01:ff"),
    ("mac", "srcmacmask", "ff:ff:ff:00:00:00", "ff:ff:ff:00:00:00", "ff:ff:ff:00:00:00"),
    ("mac", "srcmacmask", "0:0:0:0:0:0", "00:00:00:00:00:00", "00:00:00:00:00:00"),
    ("mac", "protocolid", "ipv4", 0x800, "ipv4"),
    ("mac", "protocolid", "IPv6", 0x86DD, "ipv6"),
    ("mac", "protocolid", "0x0806", 0x806, "arp"),
    ("mac", "protocolid", "33024", 0x8100, "vlan"),
    ("mac", "protocolid", "0x88cc", 0x88CC, "0x88cc"),
    ("mac", "protocolid", "1536", 1536, "1536"),
    ("vlan", "encap-protocol", "60", 60, "60"),
    ("vlan", "vlanid", "0xfff", 4095, "0xfff"),
    ("ip", "protocol", "TCP", 6, "tcp"),
    ("ip", "protocol", "0x11", 17, "udp"),
    ("ip", "protocol", "58", 58, "icmpv6"),
    ("ip", "protocol", "0x21", 33, "0x21"),
    ("arp", "opcode", "request", 1, "Request"),
    ("arp", "opcode", "0x2", 2, "Reply"),
    ("arp", "opcode", "0x16", 22, "22"),
    ("arp", "gratuitous", "yes", True, "true"),
    ("arp", "gratuitous", "1", True, "true"),
    ("arp", "gratuitous", "no", False, "false"),
    ("arp", "arpsrcipmask", "255.255.255.0", 24, "24"),
    ("ip", "srcipaddr", "10.0.0.1", V4("10.0.0.1"), "10.0.0.1"),
    ("ip", "srcipmask", "0", 0, "0"),
    ("ipv6", "srcipaddr", "FE80::0:1", V6("fe80::1"), "fe80::1"),
    ("ipv6", "srcipaddr", "::ffff:1.2.3.4", V6("::ffff:1.2.3.4"), "::ffff:1.2.3.4"),
    ("ipv6", "srcipmask", "ffff:ff00::", 24, "24"),
    ("ipv6", "srcipmask", "128", 128, "128"),
    ("tcp-ipv6", "dstipto", "2001:db8::1", V6("2001:db8::1"), "2001:db8::1"),
    ("tcp", "state", "new,Established", frozenset({"NEW", "ESTABLISHED"}), "NEW,ESTABLISHED"),
    (
        "tcp",
        "state",
        "INVALID,RELATED,NEW",
        frozenset({"NEW", "RELATED", "INVALID"}),
        "NEW,RELATED,INVALID",
    ),
    ("tcp", "state", "NONE,NEW", frozenset({"NONE"}), "NONE"),
    (
        "tcp",
        "flags",
        "SYN,ACK/SYN",
        TcpFlagsValue(frozenset({"SYN", "ACK"}), frozenset({"SYN"})),
        "SYN,ACK/SYN",
    ),
    (
        "tcp",
        "flags",
        "ack,syn,fin,rst,psh,urg/none",
        TcpFlagsValue(frozenset({"SYN", "ACK", "FIN", "RST", "PSH", "URG"}), frozenset()),
        "ALL/NONE",
    ),
    (
        "tcp-ipv6",
        "flags",
        "ALL/FIN,NONE",
        TcpFlagsValue(frozenset({"SYN", "ACK", "FIN", "RST", "PSH", "URG"}), frozenset({"FIN"})),
        "ALL/FIN",
    ),
    ("all", "ipsetflags", "SRC,dst", ("src", "dst"), "src,dst"),
    ("all", "ipset", "my set-1.a:b+", "my set-1.a:b+", "my set-1.a:b+"),
    ("all", "comment", "$x & <y>", "$x & <y>", "$x & <y>"),
    ("stp", "root-cost", "4294967295", 4294967295, "4294967295"),
    ("icmp", "type", "0xff", 255, "0xff"),
]


@pytest.mark.parametrize(("proto", "attr", "text", "value", "canonical"), OK)
def test_parse_ok(proto: str, attr: str, text: str, value: object, canonical: str) -> None:
    vtype = schema.attr_spec(proto, attr).type
    assert vtype.parse(text) == value
    assert vtype.canonical(text) == canonical
    # canonical text is itself a fixed point
    assert vtype.canonical(canonical) == canonical
    assert vtype.parse(canonical) == value


BAD = [
    ("tcp", "dstportstart", "70000", "port must be 0-65535"),
    ("tcp", "dstportstart", "ff", "0x"),
    ("tcp", "dstportstart", "+1", "0x"),
    ("tcp", "dstportstart", "1 ", "0x"),
    ("tcp", "dstportstart", "", "0x"),
    ("tcp", "dstportstart", "-1", "0x"),
    ("tcp", "dstportstart", "1e3", "0x"),
    ("tcp", "srcipaddr", "0x7f.1", "dotted-quad"),
    ("tcp", "srcipaddr", "127.1", "dotted-quad"),
    ("tcp", "srcipaddr", "1.2.3.04", "dotted-quad"),
    ("tcp", "srcipaddr", "1.2.3.256", "dotted-quad"),
    ("tcp", "srcipaddr", "aa:bb:cc:dd:ee:ff", "dotted-quad"),
    ("tcp-ipv6", "srcipaddr", "fe80::1%eth0", "zone"),
    ("tcp-ipv6", "srcipaddr", "1.2.3.4", "IPv6"),
    ("tcp-ipv6", "srcipaddr", ":::", "IPv6"),
    ("mac", "srcmacaddr", "10.0.0.1", "six hex bytes"),
    ("mac", "srcmacaddr", "aa-bb-cc-dd-ee-ff", "six hex bytes"),
    ("mac", "srcmacaddr", "aa:bb:cc:dd:ee", "six hex bytes"),
    ("mac", "srcmacaddr", "aaa:bb:cc:dd:ee:ff", "six hex bytes"),
    ("mac", "srcmacmask", "ff:ff:00:ff:00:00", "run of 1 bits"),
    ("mac", "protocolid", "0x5ff", "1536-65535"),
    ("mac", "protocolid", "ip", "one of"),
    ("vlan", "vlanid", "4096", "0-4095"),
    ("vlan", "encap-protocol", "59", "60-65535"),
    ("udp", "dscp", "64", "0-63"),
    ("arp", "gratuitous", "Yes", "one of"),
    ("arp", "gratuitous", "TRUE", "one of"),
    ("arp", "gratuitous", "", "one of"),
    ("arp", "opcode", "65536", "0-65535"),
    ("arp", "arpsrcipmask", "255.0.255.0", "run of 1 bits"),
    ("ip", "srcipmask", "33", "0-32"),
    ("ipv6", "srcipmask", "129", "0-128"),
    ("ipv6", "srcipmask", "255.255.255.0", "IPv6 netmask"),
    ("tcp", "state", "", "empty"),
    ("tcp", "state", ",", "empty"),
    ("tcp", "state", "NEW,,ESTABLISHED", "empty"),
    ("tcp", "state", "NEW ESTABLISHED", "unknown state"),
    ("tcp", "state", "OLD", "unknown state"),
    ("tcp", "flags", "SYN", "mask/flags"),
    ("tcp", "flags", "SYN/SYN/SYN", "mask/flags"),
    ("tcp", "flags", "SYNACK/SYN", "unknown TCP flag"),
    ("tcp", "flags", "/SYN", "empty"),
    ("all", "ipsetflags", "", "src/dst"),
    ("all", "ipsetflags", "src,src,src,src,src,src,src", "1 to 6"),
    ("all", "ipsetflags", "srcdst", "src/dst"),
    ("all", "ipset", "", "empty"),
    ("all", "ipset", "x" * 32, "longer than 31"),
    ("all", "ipset", "a;b", "invalid characters"),
    ("all", "comment", "é" * 257, "longer than 256"),
    ("stp", "root-cost", "4294967296", "root-cost must be 0-4294967295"),
    ("icmp", "code", "256", "code must be 0-255"),
]


@pytest.mark.parametrize(("proto", "attr", "text", "reason"), BAD)
def test_parse_refused(proto: str, attr: str, text: str, reason: str) -> None:
    with pytest.raises(ValidationError, match=None) as info:
        schema.attr_spec(proto, attr).type.parse(text)
    assert reason in str(info.value)


def test_comment_of_256_characters_is_fine() -> None:
    text = "é" * 256
    assert schema.attr_spec("all", "comment").type.parse(text) == text


def test_format_default_forms() -> None:
    assert schema.attr_spec("tcp", "dstportstart").type.format(22) == "22"
    assert schema.attr_spec("mac", "protocolid").type.format(0x800) == "ipv4"
    assert schema.attr_spec("mac", "protocolid").type.format(0x88CC) == "0x88cc"
    assert schema.attr_spec("arp", "opcode").type.format(22) == "22"
    assert schema.attr_spec("arp", "opcode").type.format(1) == "Request"
    assert schema.attr_spec("ip", "protocol").type.format(6) == "tcp"
    assert schema.attr_spec("ipv6", "srcipaddr").type.format(V6("::ffff:1.2.3.4")) == (
        "::ffff:1.2.3.4"
    )
    assert schema.attr_spec("tcp", "state").type.format(frozenset({"RELATED", "NEW"})) == (
        "NEW,RELATED"
    )
    with pytest.raises(ValidationError):
        schema.attr_spec("tcp", "dstportstart").type.format(70000)
    with pytest.raises(ValidationError):
        schema.attr_spec("tcp", "state").type.format(frozenset())


@pytest.mark.parametrize(
    ("text", "ref"),
    [
        ("$IP", VarRef("IP")),
        ("$IP[@0]", VarRef("IP")),
        ("$IP[@2]", VarRef("IP", iterator=2)),
        ("$IP[3]", VarRef("IP", index=3)),
        ("$IP[ 3 ]", VarRef("IP", index=3)),
        ("$a_B9", VarRef("a_B9")),
    ],
)
def test_varref_ok(text: str, ref: VarRef) -> None:
    assert parse_varref(text) == ref


@pytest.mark.parametrize(
    "text", ["$", "$IP-X", "$IP[", "$IP[]", "$IP[@]", "$IP[-1]", "$IP[@1001]", "$IP[1]x", "IP"]
)
def test_varref_refused(text: str) -> None:
    with pytest.raises(ValidationError):
        parse_varref(text)


@pytest.mark.parametrize("name", ["clean-traffic", "a b", "x.y", "é", "A" * 200])
def test_object_name_ok(name: str) -> None:
    check_object_name(name, "filter name")


@pytest.mark.parametrize(
    "name", ["", "a/b", "../x", ".", "..", ".x", "a\x00b", "a\nb", " a", "a ", "é" * 101]
)
def test_object_name_refused(name: str) -> None:
    with pytest.raises(ValidationError):
        check_object_name(name, "filter name")


@pytest.mark.parametrize("name", ["a\udcff", "\ud800x", "x\udfff"])
def test_object_name_with_surrogates_refused(name: str) -> None:
    # A file name decoded with surrogateescape must not become a filter name.
    with pytest.raises(ValidationError, match="not valid Unicode"):
        check_object_name(name, "filter name")


def test_unicast_mac() -> None:
    assert parse_unicast_mac("52:54:00:AA:b:01") == "52:54:00:aa:0b:01"
    with pytest.raises(ValidationError, match="unicast"):
        parse_unicast_mac("01:00:5e:00:00:01")
    with pytest.raises(ValidationError, match="six hex bytes"):
        parse_unicast_mac("52:54:00:aa:bb")


@pytest.mark.parametrize("name", ["vnet0", "a" * 15, "br-lan.10", "x_y@z"])
def test_ifname_ok(name: str) -> None:
    check_ifname(name, "dev")


@pytest.mark.parametrize("name", ["", "a" * 16, ".", "..", "a/b", "a:b", "a b", "é"])
def test_ifname_refused(name: str) -> None:
    with pytest.raises(ValidationError):
        check_ifname(name, "dev")
