"""Frames for the explainer: built from a description, read from pcap,
and looked at the way the kernel's nft expressions look at them.

`build_frame` makes the raw bytes of an Ethernet frame from a
`PacketSpec` (what `nwfilter explain` takes on its command line), with
correct checksums, so that the same bytes can be sent through a kernel;
`Frame` parses raw bytes once and answers the fields the IR matches on,
as nft reads them: `None` where nft's expression would find no such field
(a payload beyond the packet, `meta l4proto` of a frame that is not IP),
which makes the match fail, negated or not.
"""

from __future__ import annotations

import functools
import ipaddress
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cached_property

from nwfilter.errors import ValidationError
from nwfilter.ir import ETH_P_8021Q, ETH_P_ARP, ETH_P_IP, ETH_P_IPV6, ETH_P_RARP, IPAddress

PROTOCOLS = {"tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58, "sctp": 132, "dccp": 33,
             "udplite": 136, "esp": 50, "ah": 51, "igmp": 2}
ETHERTYPES = {"ipv4": ETH_P_IP, "ip": ETH_P_IP, "ipv6": ETH_P_IPV6, "arp": ETH_P_ARP,
              "rarp": ETH_P_RARP}
TCP_FLAG_BITS = {"fin": 0x01, "syn": 0x02, "rst": 0x04, "psh": 0x08, "ack": 0x10, "urg": 0x20}
_IPV6_EXT = frozenset({0, 43, 60})  # hop-by-hop, routing, destination options
_IPV6_FRAG = 44
_IPV6_AH = 51
_IPV6_NONE = 59
_SCTP_INIT = 1


def _crc32c_table() -> tuple[int, ...]:
    table = []
    for n in range(256):
        crc = n
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 if crc & 1 else 0)
        table.append(crc)
    return tuple(table)


_CRC32C = _crc32c_table()


def sctp_checksum(segment: bytes) -> bytes:
    """The CRC32c of an SCTP packet (its checksum field taken as zero), as
    the 4 bytes the header carries (RFC 4960 appendix B: least significant
    byte first)."""
    crc = 0xFFFFFFFF
    for byte in segment[:8] + b"\0\0\0\0" + segment[12:]:
        crc = _CRC32C[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return struct.pack("<I", crc ^ 0xFFFFFFFF)


@dataclass(frozen=True)
class PacketSpec:
    """A frame described by its fields (unset ones get harmless defaults)."""

    src_mac: str = "52:54:00:00:00:00"
    dst_mac: str = "ff:ff:ff:ff:ff:ff"
    proto: str = "udp"  # tcp|udp|icmp|icmpv6|sctp|... (IP), arp|rarp, or ether:0xNNNN
    src_ip: str | None = None
    dst_ip: str | None = None
    sport: int = 0
    dport: int = 0
    icmp_type: int = 8
    icmp_code: int = 0
    icmp_id: int = 1  # echo identifier: conntrack tells ICMP flows apart by it
    tcp_flags: str = "syn"
    dscp: int = 0
    arp_op: int = 1
    arp_sha: str | None = None  # default: src_mac
    arp_tha: str = "00:00:00:00:00:00"
    vlan: int | None = None
    ipv6: bool | None = None  # for tcp/udp/...: None = by the addresses given
    payload: bytes = b""


# Cached: an audit builds probes from the same few addresses again and again.
@functools.lru_cache(maxsize=4096)
def _mac(text: str, what: str) -> bytes:
    parts = text.replace("-", ":").split(":")
    try:
        if len(parts) != 6:
            raise ValueError
        return bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValidationError(f"{what} {text!r} is not a MAC address") from None


@functools.lru_cache(maxsize=4096)
def _addr(text: str, what: str) -> IPAddress:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        raise ValidationError(f"{what} {text!r} is not an IP address") from None


def _checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total > 0xFFFF:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def _pseudo(src: IPAddress, dst: IPAddress, proto: int, length: int) -> bytes:
    if src.version == 4:
        return src.packed + dst.packed + struct.pack("!BBH", 0, proto, length)
    return src.packed + dst.packed + struct.pack("!I3xB", length, proto)


def _transport(spec: PacketSpec, number: int, src: IPAddress, dst: IPAddress) -> bytes:
    body = spec.payload
    if number == 6:
        flags = 0
        for word in filter(None, spec.tcp_flags.lower().split(",")):
            if word not in TCP_FLAG_BITS:
                raise ValidationError(f"unknown TCP flag {word!r} (use {','.join(TCP_FLAG_BITS)})")
            flags |= TCP_FLAG_BITS[word]
        head = struct.pack("!HHIIBBHHH", spec.sport, spec.dport, 1, 0, 5 << 4, flags, 64240,
                           0, 0)
        seg = head + body
        csum = _checksum(_pseudo(src, dst, 6, len(seg)) + seg)
        return seg[:16] + struct.pack("!H", csum) + seg[18:]
    if number in (17, 136):
        seg = struct.pack("!HHHH", spec.sport, spec.dport, 8 + len(body), 0) + body
        csum = _checksum(_pseudo(src, dst, number, len(seg)) + seg) or 0xFFFF
        return seg[:6] + struct.pack("!H", csum) + seg[8:]
    if number in (1, 58):
        seg = struct.pack("!BBHHH", spec.icmp_type, spec.icmp_code, 0, spec.icmp_id & 0xFFFF,
                          1) + body
        pseudo = _pseudo(src, dst, 58, len(seg)) if number == 58 else b""
        csum = _checksum(pseudo + seg)
        return seg[:2] + struct.pack("!H", csum) + seg[4:]
    if number == 132:
        # The first packet of an association: an INIT chunk (the payload
        # after its fixed part), verification tag 0, a correct CRC32c;
        # conntrack refuses anything else as the start of a flow.
        init = struct.pack("!IIHHI", 0x4E575446, 65535, 1, 1, 1) + body
        chunk = struct.pack("!BBH", _SCTP_INIT, 0, 4 + len(init)) + init
        seg = struct.pack("!HHII", spec.sport, spec.dport, 0, 0) + chunk + b"\0" * (-len(chunk) % 4)
        return seg[:8] + sctp_checksum(seg) + seg[12:]
    if number == 33:
        # Ports first, as in every port-carrying protocol.
        return struct.pack("!HHII", spec.sport, spec.dport, 0, 0) + body
    return body


def build_frame(spec: PacketSpec) -> bytes:
    """The bytes of the frame `spec` describes (ValidationError if it is not one)."""
    dst_mac = _mac(spec.dst_mac, "destination MAC")
    src_mac = _mac(spec.src_mac, "source MAC")
    proto = spec.proto.lower()
    if proto in ("arp", "rarp"):
        ethertype = ETHERTYPES[proto]
        spa = _addr(spec.src_ip or "0.0.0.0", "sender IP")
        tpa = _addr(spec.dst_ip or "0.0.0.0", "target IP")
        if spa.version != 4 or tpa.version != 4:
            raise ValidationError("ARP addresses must be IPv4")
        sha = _mac(spec.arp_sha or spec.src_mac, "sender MAC")
        tha = _mac(spec.arp_tha, "target MAC")
        l3 = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, spec.arp_op) + sha + spa.packed \
            + tha + tpa.packed + spec.payload
    elif proto.startswith("ether:"):
        try:
            ethertype = int(proto[6:], 0)
        except ValueError:
            raise ValidationError(f"ethertype {proto[6:]!r} is not a number") from None
        l3 = spec.payload
    else:
        if proto in PROTOCOLS:
            number = PROTOCOLS[proto]
        else:
            try:
                number = int(proto, 0)
            except ValueError:
                raise ValidationError(
                    f"unknown protocol {spec.proto!r} (use {', '.join(PROTOCOLS)}, arp, rarp, "
                    "a number, or ether:0xNNNN)") from None
        six = spec.ipv6
        if six is None:
            given = spec.src_ip or spec.dst_ip
            six = number == 58 or (given is not None and ":" in given)
        src = _addr(spec.src_ip or ("::" if six else "0.0.0.0"), "source IP")
        dst = _addr(spec.dst_ip or ("ff02::1" if six else "255.255.255.255"), "destination IP")
        if src.version != dst.version or (src.version == 6) != six:
            raise ValidationError("source and destination IP must be of one version")
        seg = _transport(spec, number, src, dst)
        if six:
            ethertype = ETH_P_IPV6
            first = (6 << 28) | ((spec.dscp << 2) << 20)
            l3 = struct.pack("!IHBB", first, len(seg), number, 64) + src.packed + dst.packed + seg
        else:
            ethertype = ETH_P_IP
            head = struct.pack("!BBHHHBBH", 0x45, spec.dscp << 2, 20 + len(seg), 1, 0, 64,
                               number, 0) + src.packed + dst.packed
            head = head[:10] + struct.pack("!H", _checksum(head)) + head[12:]
            l3 = head + seg
    tag = b"" if spec.vlan is None else struct.pack("!HH", ETH_P_8021Q, spec.vlan & 0xFFF)
    frame = dst_mac + src_mac + tag + struct.pack("!H", ethertype) + l3
    return frame + b"\0" * max(0, 60 - len(frame))


def read_pcap(data: bytes) -> Iterator[bytes]:
    """The frames of a classic pcap file (Ethernet link type)."""
    if len(data) < 24:
        raise ValidationError("pcap file too short")
    magic = data[:4]
    if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
        order = "<"
    elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
        order = ">"
    else:
        raise ValidationError("not a pcap file (pcapng is not read; convert with editcap -F pcap)")
    linktype = struct.unpack(order + "I", data[20:24])[0]
    if linktype != 1:
        raise ValidationError(f"pcap link type {linktype} is not Ethernet (1)")
    pos = 24
    while pos + 16 <= len(data):
        incl = struct.unpack(order + "I", data[pos + 8:pos + 12])[0]
        pos += 16
        yield data[pos:pos + incl]
        pos += incl


def _mac_text(raw: bytes) -> str:
    return ":".join(f"{b:02x}" for b in raw)


class Frame:
    """One raw Ethernet frame, read as nft reads it on a bridge port."""

    def __init__(self, data: bytes) -> None:
        if len(data) < 14:
            raise ValidationError(f"a frame of {len(data)} bytes has no Ethernet header")
        self.data = bytes(data)
        self.dst_mac = int.from_bytes(data[0:6], "big")
        self.src_mac = int.from_bytes(data[6:12], "big")
        self.ethertype = int.from_bytes(data[12:14], "big")
        self.vlan_id: int | None = None
        self.vlan_encap: int | None = None
        nh = 14
        if self.ethertype == ETH_P_8021Q and len(data) >= 18:
            self.vlan_id = int.from_bytes(data[14:16], "big") & 0xFFF
            self.vlan_encap = int.from_bytes(data[16:18], "big")
            nh = 18
        # The network header, where nft's `@nh` payloads start (a VLAN tag
        # is taken out of the frame by the receiving device).
        self.nh = self.data[nh:]
        # The protocol the kernel's bridge hooks see (after the tag).
        self.l3_type = self.vlan_encap if self.vlan_encap is not None else self.ethertype

    def raw(self, bit_offset: int, bit_length: int) -> int | None:
        """`@nh,offset,length` (both multiples of 8 here), or None past the end."""
        start, size = bit_offset // 8, bit_length // 8
        if start + size > len(self.nh):
            return None
        return int.from_bytes(self.nh[start:start + size], "big")

    @cached_property
    def ip(self) -> tuple[int, IPAddress, IPAddress, int, int | None, int] | None:
        """(version, source, destination, dscp, l4proto or None, transport offset)
        of an untagged IPv4/IPv6 frame (what br_netfilter and nft's bridge
        family see as IP), else None."""
        if self.vlan_id is not None:
            return None
        b = self.nh
        if self.ethertype == ETH_P_IP and len(b) >= 20 and b[0] >> 4 == 4:
            ihl = (b[0] & 0xF) * 4
            frag = int.from_bytes(b[6:8], "big") & 0x1FFF
            src = ipaddress.IPv4Address(b[12:16])
            dst = ipaddress.IPv4Address(b[16:20])
            # A non-first fragment has no transport header (nft: no l4proto).
            return (4, src, dst, b[1] >> 2, None if frag else b[9], ihl)
        if self.ethertype == ETH_P_IPV6 and len(b) >= 40 and b[0] >> 4 == 6:
            src6 = ipaddress.IPv6Address(b[8:24])
            dst6 = ipaddress.IPv6Address(b[24:40])
            dscp = ((int.from_bytes(b[0:2], "big") >> 4) & 0xFF) >> 2
            # nft (ipv6_find_hdr with IP6_FH_F_AUTH) and ip6tables stop at
            # an authentication header: AH is the protocol (measured).
            nxt, off = b[6], 40
            while nxt in _IPV6_EXT or nxt == _IPV6_FRAG:
                if off + 8 > len(b):
                    return (6, src6, dst6, dscp, None, off)
                if nxt == _IPV6_FRAG:
                    if int.from_bytes(b[off + 2:off + 4], "big") & 0xFFF8:
                        return (6, src6, dst6, dscp, None, off)
                    nxt, off = b[off], off + 8
                else:
                    nxt, off = b[off], off + (b[off + 1] + 1) * 8
            return (6, src6, dst6, dscp, nxt, off)
        return None

    @cached_property
    def ebt_l4(self) -> tuple[int | None, int | None]:
        """(protocol, transport offset) as ebtables' ip and ip6 matches
        (ebt_ip, ebt_ip6) read them, None where they find none: IPv4 gives
        the protocol of any fragment but ports of the first only; IPv6
        skips every extension header, AH too (ipv6_skip_exthdr), stops at a
        fragment that is not the first, and finds nothing after 'no next
        header'."""
        ip = self.ip
        if ip is None:
            return None, None
        b = self.nh
        if ip[0] == 4:
            first = not int.from_bytes(b[6:8], "big") & 0x1FFF
            return b[9], ip[5] if first else None
        nxt, off = b[6], 40
        while nxt in _IPV6_EXT or nxt in (_IPV6_FRAG, _IPV6_AH, _IPV6_NONE):
            if nxt == _IPV6_NONE or off + 8 > len(b):
                return None, None
            if nxt == _IPV6_FRAG:
                if int.from_bytes(b[off + 2:off + 4], "big") & 0xFFF8:
                    break
                nxt, off = b[off], off + 8
            elif nxt == _IPV6_AH:
                nxt, off = b[off], off + (b[off + 1] + 2) * 4
            else:
                nxt, off = b[off], off + (b[off + 1] + 1) * 8
        return nxt, off

    def ebt_transport(self, offset: int, length: int) -> int | None:
        """Bytes of the transport header where ebtables' ip/ip6 matches find it."""
        start = self.ebt_l4[1]
        if start is None or start + offset + length > len(self.nh):
            return None
        return int.from_bytes(self.nh[start + offset:start + offset + length], "big")

    def transport(self, offset: int, length: int) -> int | None:
        """Bytes of the transport header (`th`), or None."""
        ip = self.ip
        if ip is None or ip[4] is None:
            return None
        start = ip[5] + offset
        if start + length > len(self.nh):
            return None
        return int.from_bytes(self.nh[start:start + length], "big")

    def describe(self) -> str:
        """A one-line summary, for people."""
        text = f"{_mac_text(self.data[6:12])} > {_mac_text(self.data[0:6])}"
        if self.vlan_id is not None:
            text += f" vlan {self.vlan_id}"
        ip = self.ip
        if ip is not None:
            names = {v: k for k, v in PROTOCOLS.items()}
            proto = ip[4]
            text += f" ipv{ip[0]} {ip[1]} > {ip[2]}"
            if proto is not None:
                text += f" {names.get(proto, str(proto))}"
                if proto in (6, 17, 33, 132, 136):
                    text += f" {self.transport(0, 2)} > {self.transport(2, 2)}"
                elif proto in (1, 58):
                    text += f" type {self.transport(0, 1)} code {self.transport(1, 1)}"
        elif self.l3_type in (ETH_P_ARP, ETH_P_RARP):
            kind = "arp" if self.l3_type == ETH_P_ARP else "rarp"
            op, spa, tpa = self.raw(48, 16), self.raw(112, 32), self.raw(192, 32)
            text += f" {kind} op {op}"
            if spa is not None and tpa is not None:
                text += f" {ipaddress.IPv4Address(spa)} > {ipaddress.IPv4Address(tpa)}"
        else:
            text += f" ethertype 0x{self.l3_type:04x}"
        return text
