"""What learning reads from a frame: DHCP (v4 and v6), ARP, IPv4 sources
and IPv6 neighbour advertisements.

Pure parsing of untrusted bytes: every length is checked before it is
used, and anything that does not parse raises `Malformed` (the listener
counts and drops it).  Only the fields learning needs are read.
"""

from __future__ import annotations

import ipaddress
import struct
from dataclasses import dataclass

from nwfilter.ir import ETH_P_ARP, ETH_P_IP, ETH_P_IPV6

DHCP_MAGIC = b"\x63\x82\x53\x63"
BOOTREQUEST, BOOTREPLY = 1, 2
# DHCP message types (RFC 2132, option 53)
DISCOVER, OFFER, REQUEST, DECLINE, ACK, NAK, RELEASE, INFORM = range(1, 9)
DHCP6_REPLY = 7
_OPT_LEASE, _OPT_TYPE, _OPT_SERVER = 51, 53, 54
_ICMP6_NA = 136
_ZERO4 = ipaddress.IPv4Address(0)


class Malformed(ValueError):
    """A frame learning looked at but could not parse."""


def _mac(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


@dataclass(frozen=True)
class Dhcp:
    """A DHCPv4 message: BOOTP header and the options learning uses."""

    eth_src: str
    ip_src: ipaddress.IPv4Address
    op: int
    ciaddr: ipaddress.IPv4Address
    yiaddr: ipaddress.IPv4Address
    chaddr: str
    msg_type: int | None
    server_id: ipaddress.IPv4Address | None
    lease: int | None  # seconds; 0xffffffff is infinite


@dataclass(frozen=True)
class Arp:
    eth_src: str
    sha: str
    spa: ipaddress.IPv4Address


@dataclass(frozen=True)
class Ipv4:
    eth_src: str
    src: ipaddress.IPv4Address


@dataclass(frozen=True)
class NeighbourAdvert:
    eth_src: str
    target: ipaddress.IPv6Address


@dataclass(frozen=True)
class Dhcp6Reply:
    eth_src: str
    ip_src: ipaddress.IPv6Address
    addresses: tuple[tuple[ipaddress.IPv6Address, int], ...]  # (address, valid lifetime)


Seen = Dhcp | Arp | Ipv4 | NeighbourAdvert | Dhcp6Reply


def parse_frame(frame: bytes) -> Seen | None:
    """What `frame` tells learning; None if nothing; `Malformed` if it lies."""
    if len(frame) < 14:
        raise Malformed("frame shorter than an Ethernet header")
    eth_src = _mac(frame[6:12])
    ethertype = struct.unpack_from("!H", frame, 12)[0]
    if ethertype == ETH_P_IP:
        return _ipv4(frame, 14, eth_src)
    if ethertype == ETH_P_ARP:
        return _arp(frame, 14, eth_src)
    if ethertype == ETH_P_IPV6:
        return _ipv6(frame, 14, eth_src)
    return None


def _arp(frame: bytes, off: int, eth_src: str) -> Arp:
    if len(frame) < off + 28:
        raise Malformed("truncated ARP")
    htype, ptype, hlen, plen = struct.unpack_from("!HHBB", frame, off)
    if (htype, ptype, hlen, plen) != (1, ETH_P_IP, 6, 4):
        raise Malformed("ARP not for Ethernet/IPv4")
    return Arp(eth_src, _mac(frame[off + 8:off + 14]),
               ipaddress.IPv4Address(frame[off + 14:off + 18]))


def _ipv4(frame: bytes, off: int, eth_src: str) -> Seen:
    if len(frame) < off + 20:
        raise Malformed("truncated IPv4 header")
    vihl = frame[off]
    ihl = (vihl & 0x0F) * 4
    if vihl >> 4 != 4 or ihl < 20 or len(frame) < off + ihl:
        raise Malformed("bad IPv4 header")
    total = struct.unpack_from("!H", frame, off + 2)[0]
    if total < ihl or off + total > len(frame):
        raise Malformed("IPv4 length beyond the frame")
    src = ipaddress.IPv4Address(frame[off + 12:off + 16])
    frag = struct.unpack_from("!H", frame, off + 6)[0] & 0x1FFF
    if frame[off + 9] != 17 or frag:
        return Ipv4(eth_src, src)
    udp = off + ihl
    if total < ihl + 8:
        raise Malformed("truncated UDP header")
    sport, dport = struct.unpack_from("!HH", frame, udp)
    if {sport, dport} != {67, 68}:
        return Ipv4(eth_src, src)
    return _dhcp(frame[udp + 8:off + total], eth_src, src)


def _dhcp(payload: bytes, eth_src: str, src: ipaddress.IPv4Address) -> Dhcp:
    if len(payload) < 240 or payload[236:240] != DHCP_MAGIC:
        raise Malformed("not a DHCP message")
    op, htype, hlen = payload[0], payload[1], payload[2]
    if op not in (BOOTREQUEST, BOOTREPLY) or htype != 1 or hlen != 6:
        raise Malformed("BOOTP header not for Ethernet")
    ciaddr = ipaddress.IPv4Address(payload[12:16])
    yiaddr = ipaddress.IPv4Address(payload[16:20])
    chaddr = _mac(payload[28:34])
    msg_type: int | None = None
    server: ipaddress.IPv4Address | None = None
    lease: int | None = None
    i = 240
    while i < len(payload):
        code = payload[i]
        if code == 255:
            break
        if code == 0:
            i += 1
            continue
        if i + 2 > len(payload) or i + 2 + payload[i + 1] > len(payload):
            raise Malformed("DHCP option runs past the message")
        size = payload[i + 1]
        value = payload[i + 2:i + 2 + size]
        if code == _OPT_TYPE and size == 1:
            msg_type = value[0]
        elif code == _OPT_SERVER and size == 4:
            server = ipaddress.IPv4Address(value)
        elif code == _OPT_LEASE and size == 4:
            lease = struct.unpack("!I", value)[0]
        i += 2 + size
    if msg_type is None:
        raise Malformed("DHCP message without a message type")
    return Dhcp(eth_src, src, op, ciaddr, yiaddr, chaddr, msg_type, server, lease)


def _ipv6(frame: bytes, off: int, eth_src: str) -> Seen | None:
    if len(frame) < off + 40:
        raise Malformed("truncated IPv6 header")
    if frame[off] >> 4 != 6:
        raise Malformed("bad IPv6 version")
    length = struct.unpack_from("!H", frame, off + 4)[0]
    nxt = frame[off + 6]
    src = ipaddress.IPv6Address(frame[off + 8:off + 24])
    body = frame[off + 40:off + 40 + length]
    if len(body) != length:
        raise Malformed("IPv6 payload beyond the frame")
    if nxt == 58:
        if len(body) < 24 or body[0] != _ICMP6_NA:
            return None
        return NeighbourAdvert(eth_src, ipaddress.IPv6Address(body[8:24]))
    if nxt == 17 and len(body) >= 8:
        sport, dport = struct.unpack_from("!HH", body, 0)
        if (sport, dport) == (547, 546):
            return _dhcp6(body[8:], eth_src, src)
    return None


def _dhcp6(msg: bytes, eth_src: str, src: ipaddress.IPv6Address) -> Dhcp6Reply | None:
    if len(msg) < 4:
        raise Malformed("truncated DHCPv6 message")
    if msg[0] != DHCP6_REPLY:
        return None
    found: list[tuple[ipaddress.IPv6Address, int]] = []
    for code, value in _options6(msg[4:]):
        if code == 3 and len(value) >= 12:  # IA_NA: IAID, T1, T2, then options
            for sub, subval in _options6(value[12:]):
                if sub == 5 and len(subval) >= 24:  # IAADDR
                    lifetime = struct.unpack_from("!I", subval, 20)[0]
                    found.append((ipaddress.IPv6Address(subval[:16]), lifetime))
    return Dhcp6Reply(eth_src, src, tuple(found))


def _options6(data: bytes) -> list[tuple[int, bytes]]:
    out = []
    i = 0
    while i < len(data):
        if i + 4 > len(data):
            raise Malformed("truncated DHCPv6 option")
        code, size = struct.unpack_from("!HH", data, i)
        if i + 4 + size > len(data):
            raise Malformed("DHCPv6 option runs past the message")
        out.append((code, data[i + 4:i + 4 + size]))
        i += 4 + size
    return out


def is_unspecified(addr: ipaddress.IPv4Address) -> bool:
    return addr == _ZERO4
