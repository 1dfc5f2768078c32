"""The static schema of libvirt's filter language.

For each protocol element: its attributes in libvirt's canonical order (the
order `virNWFilterRuleDefDetailsFormat` prints them in) with their value
types and the attribute each one depends on; chain names, their default
priorities and the protocol families.  Pure data plus small lookups.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType

from nwfilter.conf.model import FilterDef
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
from nwfilter.errors import ValidationError


@dataclass(frozen=True)
class AttrSpec:
    """One attribute of a protocol element.

    `requires`: the attribute this one only makes sense with (a mask needs
    its address, an end its start); libvirt silently ignores the lone one,
    we refuse it.  `variable_ok`: whether `$NAME` is a variable here (a
    comment is always literal text).
    """

    name: str
    type: ValueType
    requires: str | None = None
    variable_ok: bool = True


# --- value types, shared -------------------------------------------------------

MAC_ADDR = MacAddrType()
MAC_MASK = MacMaskType()
IPV4_ADDR = IPv4AddrType()
IPV6_ADDR = IPv6AddrType()
IPV4_MASK = IPMaskType(4)
IPV6_MASK = IPMaskType(6)
PORT = UIntType(0xFFFF, "port")
ICMP_TYPE = UIntType(0xFF, "type")
ICMP_CODE = UIntType(0xFF, "code")
DSCP = UIntType(63, "dscp")
VLAN_ID = UIntType(4095, "vlanid")
CONNLIMIT = UIntType(0xFFFF, "connlimit-above")
TCP_OPTION = UIntType(0xFF, "option")
GRATUITOUS = BoolType()
STATE = StateType()
TCP_FLAGS = TcpFlagsType()
IPSET_NAME = IpsetNameType()
IPSET_FLAGS = IpsetFlagsType()
COMMENT = CommentType()

#: ethertype names libvirt knows (macProtoMap)
ETHERTYPE_NAMES: Mapping[str, int] = MappingProxyType(
    {"arp": 0x0806, "rarp": 0x8035, "ipv4": 0x0800, "ipv6": 0x86DD, "vlan": 0x8100}
)
#: IP protocol names libvirt knows (ipProtoMap)
IP_PROTOCOL_NAMES: Mapping[str, int] = MappingProxyType(
    {
        "tcp": 6,
        "udp": 17,
        "udplite": 136,
        "esp": 50,
        "ah": 51,
        "icmp": 1,
        "igmp": 2,
        "sctp": 132,
        "icmpv6": 58,
    }
)
#: ARP opcode names (as `ebtables -h arp` spells them)
ARP_OPCODE_NAMES: Mapping[str, int] = MappingProxyType(
    {
        "Request": 1,
        "Reply": 2,
        "Request_Reverse": 3,
        "Reply_Reverse": 4,
        "DRARP_Request": 5,
        "DRARP_Reply": 6,
        "DRARP_Error": 7,
        "InARP_Request": 8,
        "ARP_NAK": 9,
    }
)

# libvirt refuses numeric ethertypes below 0x600 (those are 802.3 lengths)
MAC_PROTOCOL_ID = NamedNumberType(ETHERTYPE_NAMES, 0xFFFF, "protocolid", numeric_minimum=0x600)
# ... and below 0x3c for the encapsulated protocol of a VLAN frame
VLAN_ENCAP = NamedNumberType(ETHERTYPE_NAMES, 0xFFFF, "encap-protocol", numeric_minimum=0x3C)
IP_PROTOCOL = NamedNumberType(IP_PROTOCOL_NAMES, 0xFF, "protocol")
ARP_OPCODE = NamedNumberType(ARP_OPCODE_NAMES, 0xFFFF, "opcode", decimal_only_output=True)

#: IP protocols a port match makes sense for (tcp, udp, dccp, sctp)
PORT_PROTOCOLS = frozenset({6, 17, 33, 132})


def _a(name: str, vtype: ValueType, requires: str | None = None) -> AttrSpec:
    return AttrSpec(name, vtype, requires)


def _u(name: str, maximum: int, requires: str | None = None) -> AttrSpec:
    return AttrSpec(name, UIntType(maximum, name), requires)


_COMMENT = AttrSpec("comment", COMMENT, None, variable_ok=False)

_L2_MAC = (
    _a("srcmacaddr", MAC_ADDR),
    _a("srcmacmask", MAC_MASK, "srcmacaddr"),
    _a("dstmacaddr", MAC_ADDR),
    _a("dstmacmask", MAC_MASK, "dstmacaddr"),
)

_PORTS = (
    _a("srcportstart", PORT),
    _a("srcportend", PORT, "srcportstart"),
    _a("dstportstart", PORT),
    _a("dstportend", PORT, "dstportstart"),
)


def _l3_common(addr: ValueType, mask: ValueType) -> tuple[AttrSpec, ...]:
    return (
        _a("srcmacaddr", MAC_ADDR),
        _a("srcipaddr", addr),
        _a("srcipmask", mask, "srcipaddr"),
        _a("dstipaddr", addr),
        _a("dstipmask", mask, "dstipaddr"),
        _a("srcipfrom", addr),
        _a("srcipto", addr, "srcipfrom"),
        _a("dstipfrom", addr),
        _a("dstipto", addr, "dstipfrom"),
        _a("dscp", DSCP),
        _a("connlimit-above", CONNLIMIT),
        _a("state", STATE),
        _a("ipset", IPSET_NAME),
        _a("ipsetflags", IPSET_FLAGS, "ipset"),
    )


_V4 = _l3_common(IPV4_ADDR, IPV4_MASK)
_V6 = _l3_common(IPV6_ADDR, IPV6_MASK)

_ARP = (
    *_L2_MAC,
    _u("hwtype", 0xFFFF),
    _u("protocoltype", 0xFFFF),
    _a("opcode", ARP_OPCODE),
    _a("arpsrcmacaddr", MAC_ADDR),
    _a("arpdstmacaddr", MAC_ADDR),
    _a("arpsrcipaddr", IPV4_ADDR),
    _a("arpsrcipmask", IPV4_MASK, "arpsrcipaddr"),
    _a("arpdstipaddr", IPV4_ADDR),
    _a("arpdstipmask", IPV4_MASK, "arpdstipaddr"),
    _a("gratuitous", GRATUITOUS),
    _COMMENT,
)


def _stp_range(name: str, maximum: int) -> tuple[AttrSpec, AttrSpec]:
    return _u(name, maximum), _u(f"{name}-hi", maximum, name)


_STP = (
    _a("srcmacaddr", MAC_ADDR),
    _a("srcmacmask", MAC_MASK, "srcmacaddr"),
    _u("type", 0xFF),
    _u("flags", 0xFF),
    *_stp_range("root-priority", 0xFFFF),
    _a("root-address", MAC_ADDR),
    _a("root-address-mask", MAC_MASK, "root-address"),
    *_stp_range("root-cost", 0xFFFFFFFF),
    *_stp_range("sender-priority", 0xFFFF),
    _a("sender-address", MAC_ADDR),
    _a("sender-address-mask", MAC_MASK, "sender-address"),
    *_stp_range("port", 0xFFFF),
    *_stp_range("age", 0xFFFF),
    *_stp_range("max-age", 0xFFFF),
    *_stp_range("hello-time", 0xFFFF),
    *_stp_range("forward-delay", 0xFFFF),
    _COMMENT,
)

_ICMP = (_a("type", ICMP_TYPE), _a("code", ICMP_CODE, "type"))

_PROTOCOLS: dict[str, tuple[AttrSpec, ...]] = {
    "mac": (*_L2_MAC, _a("protocolid", MAC_PROTOCOL_ID), _COMMENT),
    "vlan": (*_L2_MAC, _a("vlanid", VLAN_ID), _a("encap-protocol", VLAN_ENCAP), _COMMENT),
    "stp": _STP,
    "arp": _ARP,
    "rarp": _ARP,
    "ip": (
        *_L2_MAC,
        _a("srcipaddr", IPV4_ADDR),
        _a("srcipmask", IPV4_MASK, "srcipaddr"),
        _a("dstipaddr", IPV4_ADDR),
        _a("dstipmask", IPV4_MASK, "dstipaddr"),
        _a("protocol", IP_PROTOCOL),
        *_PORTS,
        _a("dscp", DSCP),
        _COMMENT,
    ),
    "ipv6": (
        *_L2_MAC,
        _a("srcipaddr", IPV6_ADDR),
        _a("srcipmask", IPV6_MASK, "srcipaddr"),
        _a("dstipaddr", IPV6_ADDR),
        _a("dstipmask", IPV6_MASK, "dstipaddr"),
        _a("protocol", IP_PROTOCOL),
        *_PORTS,
        _a("type", ICMP_TYPE),
        _a("typeend", ICMP_TYPE, "type"),
        _a("code", ICMP_CODE),
        _a("codeend", ICMP_CODE, "code"),
        _COMMENT,
    ),
    "tcp": (*_V4, *_PORTS, _a("option", TCP_OPTION), _a("flags", TCP_FLAGS), _COMMENT),
    "udp": (*_V4, *_PORTS, _COMMENT),
    "udplite": (*_V4, _COMMENT),
    "esp": (*_V4, _COMMENT),
    "ah": (*_V4, _COMMENT),
    "sctp": (*_V4, *_PORTS, _COMMENT),
    "icmp": (*_V4, *_ICMP, _COMMENT),
    "igmp": (*_V4, _COMMENT),
    "all": (*_V4, _COMMENT),
    # libvirt has no `flags` on tcp-ipv6 and silently drops it; we keep it
    "tcp-ipv6": (*_V6, *_PORTS, _a("option", TCP_OPTION), _a("flags", TCP_FLAGS), _COMMENT),
    "udp-ipv6": (*_V6, *_PORTS, _COMMENT),
    "udplite-ipv6": (*_V6, _COMMENT),
    "esp-ipv6": (*_V6, _COMMENT),
    "ah-ipv6": (*_V6, _COMMENT),
    "sctp-ipv6": (*_V6, *_PORTS, _COMMENT),
    "icmpv6": (*_V6, *_ICMP, _COMMENT),
    "all-ipv6": (*_V6, _COMMENT),
}

#: element name → its attributes in libvirt's canonical order
PROTOCOLS: Mapping[str, tuple[AttrSpec, ...]] = MappingProxyType(_PROTOCOLS)

_SPEC_INDEX: Mapping[str, Mapping[str, AttrSpec]] = MappingProxyType(
    {p: MappingProxyType({s.name: s for s in specs}) for p, specs in _PROTOCOLS.items()}
)

#: element name → attribute name → its position in libvirt's canonical order
ATTR_ORDER: Mapping[str, Mapping[str, int]] = MappingProxyType(
    {
        p: MappingProxyType({s.name: i for i, s in enumerate(specs)})
        for p, specs in _PROTOCOLS.items()
    }
)

ETHERNET_PROTOCOLS = frozenset({"mac", "vlan", "stp", "arp", "rarp", "ip", "ipv6"})
IPV4_PROTOCOLS = frozenset({"tcp", "udp", "udplite", "esp", "ah", "sctp", "icmp", "igmp", "all"})
IPV6_PROTOCOLS = frozenset(
    {
        "tcp-ipv6",
        "udp-ipv6",
        "udplite-ipv6",
        "esp-ipv6",
        "ah-ipv6",
        "sctp-ipv6",
        "icmpv6",
        "all-ipv6",
    }
)
#: protocols whose ipset without ipsetflags libvirt completes with 'src'
IPSET_DEFAULT_FLAGS_PROTOCOLS = frozenset((IPV4_PROTOCOLS | IPV6_PROTOCOLS) - {"all", "all-ipv6"})


def attr_spec(protocol: str, name: str) -> AttrSpec:
    """The spec of attribute `name` of element `protocol`; ValidationError if none."""
    try:
        specs = _SPEC_INDEX[protocol]
    except KeyError:
        raise ValidationError(f"unknown protocol element <{protocol}>") from None
    try:
        return specs[name]
    except KeyError:
        raise ValidationError(f"<{protocol}> has no attribute {name!r}") from None


def is_ethernet_protocol(protocol: str) -> bool:
    """Layer-2 protocols (libvirt's ebtables rules)."""
    return protocol in ETHERNET_PROTOCOLS


def is_ipv4_protocol(protocol: str) -> bool:
    """Layer-3 IPv4 protocols (libvirt's iptables rules)."""
    return protocol in IPV4_PROTOCOLS


def is_ipv6_protocol(protocol: str) -> bool:
    """Layer-3 IPv6 protocols (libvirt's ip6tables rules)."""
    return protocol in IPV6_PROTOCOLS


# --- chains --------------------------------------------------------------------

#: chain-name prefixes, in the order libvirt tests them
CHAIN_KINDS = ("root", "mac", "vlan", "stp", "arp", "rarp", "ipv4", "ipv6")
MAX_CHAIN_NAME_LENGTH = 12  # 32 (ebtables chain) - len("FO-") - 15 (ifname) - len("-") - NUL
_CHAIN_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_.:-")

#: the priority a filter of that chain kind gets when it gives none.  libvirt
#: defines -810 for stp but leaves it out of its lookup table, so an 'stp'
#: chain gets the midpoint 0 at define time; we match what it stores.
CHAIN_DEFAULT_PRIORITIES: Mapping[str, int] = MappingProxyType(
    {
        "root": 0,
        "stp": 0,
        "mac": -800,
        "vlan": -750,
        "ipv4": -700,
        "ipv6": -600,
        "arp": -500,
        "rarp": -400,
    }
)
MIN_PRIORITY = -1000
MAX_PRIORITY = 1000
DEFAULT_RULE_PRIORITY = 500


def chain_kind(chain_name: str) -> str:
    """The protocol family of a chain: 'arp-xyz' → 'arp', 'root' → 'root'.

    Raises ValidationError for names libvirt does not allow.
    """
    if len(chain_name) > MAX_CHAIN_NAME_LENGTH:
        raise ValidationError(f"chain name is longer than {MAX_CHAIN_NAME_LENGTH} characters")
    if not chain_name or not set(chain_name) <= _CHAIN_CHARS:
        raise ValidationError("chain name must be letters, digits, '_', '.', ':' and '-'")
    if chain_name == "root":
        return "root"
    if chain_name.startswith("root"):
        raise ValidationError("'root' is allowed as a whole chain name only, not as a prefix")
    for kind in CHAIN_KINDS[1:]:
        if chain_name.startswith(kind):
            return kind
    raise ValidationError(
        "chain name must be 'root' or start with one of " + ", ".join(CHAIN_KINDS[1:])
    )


def chain_priority(fdef: FilterDef) -> int:
    """The effective priority of a filter's chain."""
    if fdef.priority is not None:
        return fdef.priority
    return CHAIN_DEFAULT_PRIORITIES[chain_kind(fdef.chain or "root")]


#: variables the engine defines itself (libvirt's reserved names)
RESERVED_VARIABLES = frozenset(
    {"IP", "MAC", "IPV6", "DHCPSERVER", "DHCPSERVERV6", "CTRL_IP_LEARNING"}
)
