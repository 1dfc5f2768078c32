"""Translation of one protocol element's typed attributes into IR matches.

This module owns the per-attribute mapping of libvirt's ebiptables driver,
expressed in packet terms:

* layer 2 (ebtables: mac, vlan, stp, arp, rarp, ip, ipv6 and rules without
  a protocol): `reverse` swaps every src/dst pair, as libvirt does for the
  from-guest half of an `inout` rule;
* layer 3 (iptables/ip6tables: tcp, udp, ..., all and the -ipv6 variants):
  `swapped` is libvirt's `directionIn` argument: src/dst addresses, ranges,
  ports and ipset flags are exchanged, `srcmacaddr` is left out (iptables
  can only match the source MAC), and an instance that loses every match
  that way, or that carries `connlimit-above`, is not created at all.

`match='no'` negates each attribute of its element on its own, as libvirt
does; `negated` names the attributes so written (a match over a range or a
masked address takes the negation of its start or address).  Every
attribute of the element must be understood here; anything else is refused
with `UnsupportedError` rather than dropped.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from nwfilter.conf import schema
from nwfilter.conf.values import TcpFlagsValue
from nwfilter.errors import UnsupportedError, ValidationError
from nwfilter.ir import (
    ETH_P_8021Q,
    ETH_P_ARP,
    ETH_P_IP,
    ETH_P_IPV6,
    ETH_P_RARP,
    STP_GROUP_MAC,
    AddrRange,
    CtState,
    Family,
    Field,
    IntRange,
    IPSetMatch,
    LearntSet,
    MacMatch,
    Match,
    TcpFlag,
    TcpFlags,
)

Attrs = Mapping[str, object]
# The names of the attributes written in an element with match='no'.
Negated = AbstractSet[str]

# The ethertype every rule of a layer-2 protocol element matches.
_L2_ETHERTYPES: Mapping[str, int] = {
    "vlan": ETH_P_8021Q,
    "arp": ETH_P_ARP,
    "rarp": ETH_P_RARP,
    "ip": ETH_P_IP,
    "ipv6": ETH_P_IPV6,
}


def _ip_proto(protocol: str) -> int | None:
    base = protocol.removesuffix("-ipv6")
    return None if base == "all" else schema.IP_PROTOCOL_NAMES[base]


# The IP protocol number a layer-3 element implies (None: 'all', any protocol).
_IP_PROTOCOLS: Mapping[str, int | None] = {
    protocol: _ip_proto(protocol) for protocol in schema.IPV4_PROTOCOLS | schema.IPV6_PROTOCOLS
}
_TCP_FLAGS = {flag.name: flag for flag in TcpFlag}
_CT_STATES = {
    "NEW": CtState.NEW,
    "ESTABLISHED": CtState.ESTABLISHED,
    "RELATED": CtState.RELATED,
    "INVALID": CtState.INVALID,
    "NONE": CtState.UNTRACKED,
}


def family_of(protocol: str | None) -> Family:
    """The layer a protocol element lives in (None: a rule without one)."""
    if protocol is None or protocol in schema.ETHERNET_PROTOCOLS:
        return Family.ETHER
    if protocol in schema.IPV4_PROTOCOLS:
        return Family.IPV4
    if protocol in schema.IPV6_PROTOCOLS:
        return Family.IPV6
    raise UnsupportedError(f"unknown protocol element <{protocol}>")


def ip_proto_number(protocol: str) -> int | None:
    return _IP_PROTOCOLS.get(protocol)


def ct_states(value: object) -> frozenset[CtState]:
    """The IR form of a typed `state` value (see `nwfilter.conf.values.StateType`)."""
    if not isinstance(value, frozenset):
        raise ValidationError(f"attribute 'state' needs connection states, got {value!r}")
    return frozenset(_CT_STATES[name] for name in value)


# ------------------------------------------------------------------ values


def _int(value: object, attr: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValidationError(f"attribute '{attr}' needs a number, got {value!r}")
    return value


def _mac(value: object, attr: str) -> str:
    if not isinstance(value, str):
        raise ValidationError(f"attribute '{attr}' needs a MAC address, got {value!r}")
    return value


def _addr(value: object, attr: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    if isinstance(value, ipaddress.IPv4Address | ipaddress.IPv6Address):
        return value
    raise ValidationError(f"attribute '{attr}' needs an IP address, got {value!r}")


def _network(
    attrs: Attrs, addr_attr: str, mask_attr: str
) -> ipaddress.IPv4Network | ipaddress.IPv6Network | LearntSet:
    value = attrs[addr_attr]
    if isinstance(value, LearntSet):
        return value  # the compiler made sure there is no mask
    addr = _addr(value, addr_attr)
    mask = attrs.get(mask_attr)
    if mask is None:
        # A host network straight from the integer skips re-parsing the text.
        if addr.version == 4:
            return ipaddress.IPv4Network(int(addr))
        return ipaddress.IPv6Network(int(addr))
    prefix = _int(mask, mask_attr)
    try:
        return ipaddress.ip_network((addr, prefix), strict=False)
    except ValueError as exc:
        raise ValidationError(f"attribute '{mask_attr}': {exc}") from exc


def _range(attrs: Attrs, start: str, end: str) -> IntRange | None:
    if start not in attrs:
        if end in attrs:
            raise UnsupportedError(f"'{end}' is given without '{start}'")
        return None
    lo = _int(attrs[start], start)
    hi = _int(attrs[end], end) if end in attrs else lo
    return IntRange(lo, hi)


def _macmatch(attrs: Attrs, addr_attr: str, mask_attr: str) -> MacMatch:
    mask = attrs.get(mask_attr)
    return MacMatch(
        _mac(attrs[addr_attr], addr_attr), None if mask is None else _mac(mask, mask_attr)
    )


def _tcp_flags(value: object) -> TcpFlags:
    if not isinstance(value, TcpFlagsValue):
        raise ValidationError(f"attribute 'flags' needs a TCP flag pair, got {value!r}")
    # conf has already expanded ALL and NONE and upper-cased the names.
    return TcpFlags(
        frozenset(_TCP_FLAGS[name] for name in value.mask),
        frozenset(_TCP_FLAGS[name] for name in value.flags),
    )


def _pair(src: Field, dst: Field, swap: bool) -> tuple[Field, Field]:
    """The fields a src/dst attribute pair matches, exchanged when `swap`."""
    return (dst, src) if swap else (src, dst)


# ------------------------------------------------------------------ attributes

# Attributes of the filter language the IR has no field for.
UNSUPPORTED_ATTRS = frozenset({"option"})  # TCP options
_ALLOWED_ATTRS: Mapping[str, frozenset[str]] = {
    protocol: frozenset(spec.name for spec in specs) - UNSUPPORTED_ATTRS
    for protocol, specs in schema.PROTOCOLS.items()
}


def check_attrs(protocol: str, names: frozenset[str]) -> None:
    """Refuse attributes this compiler cannot honour exactly."""
    allowed = _ALLOWED_ATTRS.get(protocol)
    if allowed is None:
        raise UnsupportedError(f"unknown protocol element <{protocol}>")
    unknown = sorted(names - allowed)
    if unknown:
        raise UnsupportedError(
            f"attribute{'s' if len(unknown) > 1 else ''} "
            + ", ".join(f"'{a}'" for a in unknown)
            + f" of <{protocol}> cannot be expressed"
        )


# ------------------------------------------------------------------ layer 2

_STP_RANGES = (
    ("root-priority", "root-priority-hi", Field.STP_ROOT_PRIO),
    ("root-cost", "root-cost-hi", Field.STP_ROOT_COST),
    ("sender-priority", "sender-priority-hi", Field.STP_SENDER_PRIO),
    ("port", "port-hi", Field.STP_PORT),
    ("age", "age-hi", Field.STP_MSG_AGE),
    ("max-age", "max-age-hi", Field.STP_MAX_AGE),
    ("hello-time", "hello-time-hi", Field.STP_HELLO_TIME),
    ("forward-delay", "forward-delay-hi", Field.STP_FORWARD_DELAY),
)


def l2_matches(
    protocol: str | None, attrs: Attrs, negated: Negated, reverse: bool
) -> list[Match]:
    """The matches of an ebtables rule instance."""
    out: list[Match] = []
    src, dst = _pair(Field.ETH_SRC, Field.ETH_DST, reverse)
    if protocol is None:
        return out
    if protocol == "stp" and reverse and "srcmacaddr" in attrs:
        raise UnsupportedError(
            "STP filtering in the 'inout' direction with a source MAC address is not supported"
        )
    if "srcmacaddr" in attrs:
        value = _macmatch(attrs, "srcmacaddr", "srcmacmask")
        out.append(Match(src, value, "srcmacaddr" in negated))
    if "dstmacaddr" in attrs:
        value = _macmatch(attrs, "dstmacaddr", "dstmacmask")
        out.append(Match(dst, value, "dstmacaddr" in negated))
    if protocol == "mac":
        if "protocolid" in attrs:
            number = _int(attrs["protocolid"], "protocolid")
            out.append(Match(Field.ETH_TYPE, number, "protocolid" in negated))
        return out
    if protocol == "stp":
        out.append(Match(Field.ETH_DST, MacMatch(STP_GROUP_MAC)))
        if "type" in attrs:
            out.append(Match(Field.STP_TYPE, _int(attrs["type"], "type"), "type" in negated))
        if "flags" in attrs:
            out.append(Match(Field.STP_FLAGS, _int(attrs["flags"], "flags"), "flags" in negated))
        for lo, hi, fld in _STP_RANGES[:2]:
            rng = _range(attrs, lo, hi)
            if rng is not None:
                out.append(Match(fld, rng, lo in negated))
        if "root-address" in attrs:
            value = _macmatch(attrs, "root-address", "root-address-mask")
            out.append(Match(Field.STP_ROOT_ADDR, value, "root-address" in negated))
        for lo, hi, fld in _STP_RANGES[2:3]:
            rng = _range(attrs, lo, hi)
            if rng is not None:
                out.append(Match(fld, rng, lo in negated))
        if "sender-address" in attrs:
            value = _macmatch(attrs, "sender-address", "sender-address-mask")
            out.append(Match(Field.STP_SENDER_ADDR, value, "sender-address" in negated))
        for lo, hi, fld in _STP_RANGES[3:]:
            rng = _range(attrs, lo, hi)
            if rng is not None:
                out.append(Match(fld, rng, lo in negated))
        return out
    out.insert(0, Match(Field.ETH_TYPE, _L2_ETHERTYPES[protocol]))
    if protocol == "vlan":
        if "vlanid" in attrs:
            out.append(Match(Field.VLAN_ID, _int(attrs["vlanid"], "vlanid"), "vlanid" in negated))
        if "encap-protocol" in attrs:
            number = _int(attrs["encap-protocol"], "encap-protocol")
            out.append(Match(Field.VLAN_ENCAP, number, "encap-protocol" in negated))
        return out
    if protocol in ("arp", "rarp"):
        _arp(attrs, negated, reverse, out)
        return out
    _l2_ip(protocol, attrs, negated, reverse, out)
    return out


def _arp(attrs: Attrs, negated: Negated, reverse: bool, out: list[Match]) -> None:
    if "hwtype" in attrs:
        out.append(Match(Field.ARP_HTYPE, _int(attrs["hwtype"], "hwtype"), "hwtype" in negated))
    if "opcode" in attrs:
        out.append(Match(Field.ARP_OP, _int(attrs["opcode"], "opcode"), "opcode" in negated))
    if "protocoltype" in attrs:
        number = _int(attrs["protocoltype"], "protocoltype")
        out.append(Match(Field.ARP_PTYPE, number, "protocoltype" in negated))
    spa, tpa = _pair(Field.ARP_SPA, Field.ARP_TPA, reverse)
    sha, tha = _pair(Field.ARP_SHA, Field.ARP_THA, reverse)
    if "arpsrcipaddr" in attrs:
        out.append(Match(spa, _network(attrs, "arpsrcipaddr", "arpsrcipmask"),
                         "arpsrcipaddr" in negated))
    if "arpdstipaddr" in attrs:
        out.append(Match(tpa, _network(attrs, "arpdstipaddr", "arpdstipmask"),
                         "arpdstipaddr" in negated))
    if "arpsrcmacaddr" in attrs:
        out.append(Match(sha, MacMatch(_mac(attrs["arpsrcmacaddr"], "arpsrcmacaddr")),
                         "arpsrcmacaddr" in negated))
    if "arpdstmacaddr" in attrs:
        out.append(Match(tha, MacMatch(_mac(attrs["arpdstmacaddr"], "arpdstmacaddr")),
                         "arpdstmacaddr" in negated))
    # libvirt emits --arp-gratuitous only for a true value; false matches anything.
    if attrs.get("gratuitous") is True:
        out.append(Match(Field.ARP_GRATUITOUS, True, "gratuitous" in negated))


def _l2_ip(
    protocol: str, attrs: Attrs, negated: Negated, reverse: bool, out: list[Match]
) -> None:
    src, dst = _pair(Field.IP_SRC, Field.IP_DST, reverse)
    sport, dport = _pair(Field.L4_SPORT, Field.L4_DPORT, reverse)
    if "srcipaddr" in attrs:
        out.append(Match(src, _network(attrs, "srcipaddr", "srcipmask"), "srcipaddr" in negated))
    if "dstipaddr" in attrs:
        out.append(Match(dst, _network(attrs, "dstipaddr", "dstipmask"), "dstipaddr" in negated))
    if "protocol" in attrs:
        number = _int(attrs["protocol"], "protocol")
        out.append(Match(Field.IP_PROTO, number, "protocol" in negated))
    rng = _range(attrs, "srcportstart", "srcportend")
    if rng is not None:
        out.append(Match(sport, rng, "srcportstart" in negated))
    rng = _range(attrs, "dstportstart", "dstportend")
    if rng is not None:
        out.append(Match(dport, rng, "dstportstart" in negated))
    if "dscp" in attrs:
        out.append(Match(Field.IP_DSCP, _int(attrs["dscp"], "dscp"), "dscp" in negated))
    if protocol == "ipv6":
        rng = _range(attrs, "type", "typeend")
        if rng is not None:
            out.append(Match(Field.ICMP_TYPE, rng, "type" in negated))
        rng = _range(attrs, "code", "codeend")
        if rng is not None:
            out.append(Match(Field.ICMP_CODE, rng, "code" in negated))


# ------------------------------------------------------------------ layer 3


@dataclass(frozen=True)
class L3Parts:
    """The matches of one iptables rule instance, in libvirt's order.

    `core` holds the header matches; `counted` is False when the instance
    lost its only header match (libvirt then does not create it).
    """

    core: tuple[Match, ...]
    counted: bool
    connlimit: Match | None
    ipset: Match | None


def l3_parts(protocol: str, attrs: Attrs, negated: Negated, swapped: bool) -> L3Parts:
    core: list[Match] = []
    src, dst = _pair(Field.IP_SRC, Field.IP_DST, swapped)
    srange, drange = _pair(Field.IP_SRC_RANGE, Field.IP_DST_RANGE, swapped)
    sport, dport = _pair(Field.L4_SPORT, Field.L4_DPORT, swapped)
    srcmac_skipped = False
    if "srcmacaddr" in attrs:
        if swapped:
            srcmac_skipped = True
        else:
            mac = MacMatch(_mac(attrs["srcmacaddr"], "srcmacaddr"))
            core.append(Match(Field.ETH_SRC, mac, "srcmacaddr" in negated))
    header = len(core)
    if "srcipaddr" in attrs:
        core.append(Match(src, _network(attrs, "srcipaddr", "srcipmask"), "srcipaddr" in negated))
    elif "srcipfrom" in attrs:
        core.append(Match(srange, _addr_range(attrs, "srcipfrom", "srcipto"),
                          "srcipfrom" in negated))
    elif "srcipto" in attrs:
        raise UnsupportedError("'srcipto' is given without 'srcipfrom'")
    if "dstipaddr" in attrs:
        core.append(Match(dst, _network(attrs, "dstipaddr", "dstipmask"), "dstipaddr" in negated))
    elif "dstipfrom" in attrs:
        core.append(Match(drange, _addr_range(attrs, "dstipfrom", "dstipto"),
                          "dstipfrom" in negated))
    elif "dstipto" in attrs:
        raise UnsupportedError("'dstipto' is given without 'dstipfrom'")
    if "dscp" in attrs:
        core.append(Match(Field.IP_DSCP, _int(attrs["dscp"], "dscp"), "dscp" in negated))
    if "flags" in attrs:
        core.append(Match(Field.TCP_FLAGS, _tcp_flags(attrs["flags"]), "flags" in negated))
    rng = _range(attrs, "srcportstart", "srcportend")
    if rng is not None:
        core.append(Match(sport, rng, "srcportstart" in negated))
    rng = _range(attrs, "dstportstart", "dstportend")
    if rng is not None:
        core.append(Match(dport, rng, "dstportstart" in negated))
    if "type" in attrs:
        icmp_type = _int(attrs["type"], "type")
        core.append(Match(Field.ICMP_TYPE, IntRange.single(icmp_type), "type" in negated))
        if "code" in attrs:
            code = _int(attrs["code"], "code")
            core.append(Match(Field.ICMP_CODE, IntRange.single(code), "code" in negated))
    elif "code" in attrs:
        raise UnsupportedError("'code' is given without 'type'")
    counted = not srcmac_skipped or len(core) > header
    connlimit = None
    if "connlimit-above" in attrs:
        limit = _int(attrs["connlimit-above"], "connlimit-above")
        connlimit = Match(Field.CONNLIMIT_ABOVE, limit, "connlimit-above" in negated)
    ipset = None
    if "ipset" in attrs or "ipsetflags" in attrs:
        if "ipset" not in attrs or "ipsetflags" not in attrs:
            raise UnsupportedError("'ipset' and 'ipsetflags' must be given together")
        flags = _ipset_flags(attrs["ipsetflags"], swapped)
        ipset = Match(Field.IPSET, IPSetMatch(str(attrs["ipset"]), flags), "ipset" in negated)
    return L3Parts(tuple(core), counted, connlimit, ipset)


def _addr_range(attrs: Attrs, start: str, end: str) -> AddrRange:
    lo = _addr(attrs[start], start)
    hi = _addr(attrs[end], end) if end in attrs else lo
    if lo.version != hi.version:
        raise ValidationError(f"'{start}' and '{end}' are of different address families")
    return AddrRange(lo, hi)


def _ipset_flags(value: object, swapped: bool) -> tuple[str, ...]:
    if not isinstance(value, tuple):
        raise ValidationError(f"attribute 'ipsetflags' needs src/dst flags, got {value!r}")
    if swapped:
        return tuple("dst" if item == "src" else "src" for item in value)
    return value
