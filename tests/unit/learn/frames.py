"""Frames for learning tests, built with scapy."""

from __future__ import annotations

from scapy.layers.dhcp import BOOTP, DHCP
from scapy.layers.dhcp6 import DHCP6_Reply, DHCP6OptIA_NA, DHCP6OptIAAddress
from scapy.layers.inet import IP, UDP
from scapy.layers.inet6 import ICMPv6ND_NA, IPv6
from scapy.layers.l2 import ARP, Ether

GUEST = "52:54:00:aa:bb:01"
SERVER_MAC = "fe:54:00:00:00:99"


def _chaddr(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", "")) + bytes(10)


def dhcp_reply(kind: str, yiaddr: str, server: str = "10.0.0.1", *, lease: int = 60,
               chaddr: str = GUEST, src: str | None = None) -> bytes:
    opts: list[object] = [("message-type", kind), ("server_id", server)]
    if kind == "ack":
        opts.append(("lease_time", lease))
    opts.append("end")
    return bytes(Ether(src=SERVER_MAC, dst=chaddr) / IP(src=src or server, dst=yiaddr)
                 / UDP(sport=67, dport=68)
                 / BOOTP(op=2, yiaddr=yiaddr, chaddr=_chaddr(chaddr)) / DHCP(options=opts))


def dhcp_request(kind: str, ciaddr: str = "0.0.0.0", *, mac: str = GUEST) -> bytes:
    return bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / IP(src=ciaddr, dst="255.255.255.255")
                 / UDP(sport=68, dport=67)
                 / BOOTP(op=1, ciaddr=ciaddr, chaddr=_chaddr(mac))
                 / DHCP(options=[("message-type", kind), "end"]))


def arp(spa: str, *, mac: str = GUEST) -> bytes:
    return bytes(Ether(src=mac, dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=mac, psrc=spa,
                                                               pdst="10.0.0.1"))


def ipv4(src: str, *, mac: str = GUEST) -> bytes:
    return bytes(Ether(src=mac) / IP(src=src, dst="10.0.0.1") / UDP(sport=1, dport=2))


def neighbour_advert(target: str, *, mac: str = GUEST) -> bytes:
    return bytes(Ether(src=mac) / IPv6(src=target, dst="ff02::1") / ICMPv6ND_NA(tgt=target))


def dhcp6_reply(address: str, lifetime: int = 100) -> bytes:
    ia = DHCP6OptIA_NA(iaid=1, ianaopts=[DHCP6OptIAAddress(addr=address, validlft=lifetime,
                                                             preflft=lifetime)])
    return bytes(Ether(src=SERVER_MAC, dst=GUEST) / IPv6(src="fe80::1", dst="fe80::2")
                 / UDP(sport=547, dport=546) / DHCP6_Reply(trid=1) / ia)
