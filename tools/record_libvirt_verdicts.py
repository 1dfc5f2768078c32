"""Record libvirt 9.0's verdicts on real frames, for the differential test.

Builds a bridge lab (`tests.integration.conftest.build_bridge_lab`: a host
namespace with br0, guests g0 on vnet0 and g1 on vnet1, ARP and IPv6 off in
the guests), starts a private libvirtd inside the lab's host namespace
(`tools/libvirtref.py`), and for every case below: defines the case's
filters, binds vnet0 (MAC 52:54:00:00:00:00) to the last one with the
case's parameters, replays the case's frames (`tests.integration.replay`)
and records which arrived; then deletes the binding and checks that every
frame arrives without it.  The frames (hex) and libvirt's verdicts go to
tests/golden/libvirt/verdicts.json; tests/integration/test_libvirt_verdicts.py
replays them through nwfilter without libvirt.

Cases whose filter nwfilter refuses on purpose carry ``refused``: the reason
nwfilter gives (a substring of its error); libvirt's verdicts are recorded
for them all the same.

Run as root on Debian 12 from the repository root (installs libvirt-daemon
when missing; everything happens in throwaway namespaces)::

    .venv/bin/python tools/record_libvirt_verdicts.py
"""

from __future__ import annotations

import json
import sys
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoRequest, IPv6
from scapy.layers.l2 import ARP, LLC, STP, Dot1Q, Dot3, Ether
from scapy.packet import Packet, Raw

sys.path.insert(0, str(Path(__file__).resolve().parent))

from libvirtref import ReferenceDaemon

from nwfilter.netlab import NetLab
from tests.integration.conftest import build_bridge_lab
from tests.integration.replay import MARKER, Frame, quiet_guests, replay

OUTPUT = Path(__file__).resolve().parents[1] / "tests" / "golden" / "libvirt" / "verdicts.json"

G0_MAC, G1_MAC = "52:54:00:00:00:00", "52:54:00:00:00:01"
G0_IP, G1_IP = "10.77.0.10", "10.77.0.11"
G0_IP6, G1_IP6 = "fd77::10", "fd77::11"
OTHER_MAC = "52:54:00:aa:bb:cc"

Build = Callable[[], Packet]


@dataclass(frozen=True)
class Case:
    id: str
    filters: tuple[str, ...]  # defined in order; vnet0 is bound to the last
    probes: tuple[tuple[str, bool, Build], ...]  # label, inbound, packet (no payload)
    params: tuple[tuple[str, str], ...] = ()
    refused: str | None = None
    note: str = ""
    stock: tuple[str, ...] = field(default=())


def out_eth(src: str = G0_MAC, dst: str = G1_MAC, type: int | None = None) -> Ether:
    return Ether(src=src, dst=dst) if type is None else Ether(src=src, dst=dst, type=type)


def in_eth(src: str = G1_MAC, dst: str = G0_MAC, type: int | None = None) -> Ether:
    return Ether(src=src, dst=dst) if type is None else Ether(src=src, dst=dst, type=type)


def udp_out(sport: int = 40000, dport: int = 5000, src: str = G0_IP,
            mac: str = G0_MAC) -> Build:
    return lambda: out_eth(src=mac) / IP(src=src, dst=G1_IP) / UDP(sport=sport, dport=dport)


def udp_in(sport: int = 40000, dport: int = 5000, mac: str = G1_MAC) -> Build:
    return lambda: in_eth(src=mac) / IP(src=G1_IP, dst=G0_IP) / UDP(sport=sport, dport=dport)


def tcp_out(dport: int, flags: str) -> Build:
    return lambda: (out_eth() / IP(src=G0_IP, dst=G1_IP)
                    / TCP(sport=41000, dport=dport, flags=flags, seq=1000, ack=1))


def icmp_out(type_: int, code: int) -> Build:
    return lambda: out_eth() / IP(src=G0_IP, dst=G1_IP) / ICMP(type=type_, code=code, id=7)


def arp_out(op: int = 1, psrc: str = G0_IP, pdst: str = G1_IP, hwsrc: str = G0_MAC) -> Build:
    dst = "ff:ff:ff:ff:ff:ff" if op == 1 else G1_MAC
    return lambda: out_eth(dst=dst) / ARP(op=op, hwsrc=hwsrc, psrc=psrc, pdst=pdst,
                                          hwdst="00:00:00:00:00:00" if op == 1 else G1_MAC)


def ether_out(ethertype: int, dst: str = G1_MAC) -> Build:
    return lambda: out_eth(dst=dst, type=ethertype)


def ether_in(ethertype: int) -> Build:
    return lambda: in_eth(type=ethertype)


def udp6_out(src: str = G0_IP6, dport: int = 5000) -> Build:
    return lambda: out_eth() / IPv6(src=src, dst=G1_IP6) / UDP(sport=40000, dport=dport)


def icmp6_out(src: str = G0_IP6) -> Build:
    return lambda: out_eth() / IPv6(src=src, dst=G1_IP6) / ICMPv6EchoRequest(id=7)


def vlan_out(vid: int) -> Build:
    return lambda: (out_eth() / Dot1Q(vlan=vid) / IP(src=G0_IP, dst=G1_IP)
                    / UDP(sport=40000, dport=5000))


def bpdu_out(bpdutype: int) -> Build:
    return lambda: (Dot3(src=G0_MAC, dst="01:80:c2:00:00:00") / LLC(dsap=0x42, ssap=0x42, ctrl=3)
                    / STP(bpdutype=bpdutype))


def rarp_out(op: int) -> Build:
    return lambda: out_eth(dst="ff:ff:ff:ff:ff:ff", type=0x8035) / ARP(
        op=op, hwsrc=G0_MAC, hwdst=G0_MAC, psrc="0.0.0.0", pdst="0.0.0.0")


def root(name: str, body: str) -> str:
    return f"<filter name='{name}' chain='root'>{body}</filter>"


def drop_out(name: str, element: str) -> str:
    return root(name, f"<rule action='drop' direction='out'>{element}</rule>")


CASES: tuple[Case, ...] = (
    Case("clean-traffic", (), (
        ("udp-own", False, udp_out()),
        ("udp-spoofed-ip", False, udp_out(src="10.77.0.99")),
        ("udp-spoofed-mac", False, udp_out(mac=OTHER_MAC)),
        ("dhcp-from-0.0.0.0", False, lambda: out_eth(dst="ff:ff:ff:ff:ff:ff")
         / IP(src="0.0.0.0", dst="255.255.255.255") / UDP(sport=68, dport=67)),
        ("arp-own", False, arp_out()),
        ("arp-spoofed-ip", False, arp_out(psrc="10.77.0.99")),
        ("arp-spoofed-sha", False, arp_out(hwsrc=OTHER_MAC)),
        ("ipv6-udp", False, udp6_out()),
        ("ether-88b5", False, ether_out(0x88B5)),
        ("rarp-announce", False, rarp_out(3)),
        ("udp-in", True, udp_in()),
        ("arp-in", True, lambda: in_eth(dst="ff:ff:ff:ff:ff:ff")
         / ARP(op=1, hwsrc=G1_MAC, psrc=G1_IP, pdst=G0_IP)),
        ("ether-88b5-in", True, ether_in(0x88B5)),
    ), params=(("IP", G0_IP),), stock=("clean-traffic",)),
    Case("mac-protocolid", (drop_out("d-mac", "<mac protocolid='0x88b5'/>"),), (
        ("88b5", False, ether_out(0x88B5)),
        ("88b6", False, ether_out(0x88B6)),
        ("88b5-in", True, ether_in(0x88B5)),
    )),
    Case("mac-match-no", (drop_out("d-mac-no", "<mac match='no' srcmacaddr='$MAC'/>"),), (
        ("own", False, udp_out()),
        ("spoofed", False, udp_out(mac=OTHER_MAC)),
        ("in", True, udp_in()),
    )),
    Case("vlan-id", (drop_out("d-vlan", "<vlan vlanid='42'/>"),), (
        ("vid-42", False, vlan_out(42)),
        ("vid-43", False, vlan_out(43)),
        ("untagged", False, udp_out()),
    )),
    Case("stp-type", (drop_out("d-stp", "<stp type='0x80'/>"),), (
        ("tcn", False, bpdu_out(0x80)),
        ("config", False, bpdu_out(0)),
    )),
    Case("arp-opcode-ip", (root("d-arp", (
        "<rule action='drop' direction='out'><arp opcode='Reply'/></rule>"
        "<rule action='drop' direction='out'>"
        "<arp arpsrcipaddr='10.77.0.96' arpsrcipmask='28'/></rule>")),), (
        ("request", False, arp_out()),
        ("reply", False, arp_out(op=2)),
        ("spa-99", False, arp_out(psrc="10.77.0.99")),
        ("spa-112", False, arp_out(psrc="10.77.0.112")),
    )),
    Case("arp-gratuitous", (drop_out("d-garp", "<arp gratuitous='true'/>"),), (
        ("gratuitous", False, arp_out(psrc=G0_IP, pdst=G0_IP)),
        ("request", False, arp_out()),
    ), refused="gratuitous",
        note="nft compares a field with a constant only; sender IP == target IP has no"
             " nft expression (nft 1.0.6)"),
    Case("rarp-opcode", (drop_out("d-rarp", "<rarp opcode='Request_Reverse'/>"),), (
        ("rarp-3", False, rarp_out(3)),
        ("rarp-4", False, rarp_out(4)),
    )),
    Case("ip-src-proto", (root("d-ip", (
        "<rule action='drop' direction='out'>"
        "<ip srcipaddr='10.77.0.64' srcipmask='255.255.255.192'/></rule>"
        "<rule action='drop' direction='out'><ip protocol='icmp'/></rule>")),), (
        ("src-own", False, udp_out()),
        ("src-70", False, udp_out(src="10.77.0.70")),
        ("src-128", False, udp_out(src="10.77.0.128")),
        ("icmp", False, icmp_out(8, 0)),
    )),
    Case("ipv6-src-prefix", (drop_out("d-ipv6", "<ipv6 srcipaddr='fd77:0:0:1::' "
                                                "srcipmask='64'/>"),), (
        ("src-own", False, udp6_out()),
        ("src-other-prefix", False, udp6_out(src="fd77:0:0:1::5")),
        ("ipv4", False, udp_out()),
    )),
    Case("tcp-flags", (drop_out("d-tcp", "<tcp flags='SYN,ACK/SYN' dstportstart='8020'/>"),), (
        ("syn", False, tcp_out(8020, "S")),
        ("syn-ack", False, tcp_out(8020, "SA")),
        ("syn-8021", False, tcp_out(8021, "S")),
    )),
    Case("udp-port-reply", (drop_out("d-udp", "<udp dstportstart='5353'/>"),), (
        ("out-5353", False, udp_out(dport=5353)),
        ("out-5354", False, udp_out(dport=5354)),
        ("in-sport-5353", True, udp_in(sport=5353)),
        ("in-dport-5353", True, udp_in(dport=5353)),
    )),
    Case("icmp-type-code", (drop_out("d-icmp", "<icmp type='8' code='0'/>"),), (
        ("echo", False, icmp_out(8, 0)),
        ("echo-code1", False, icmp_out(8, 1)),
        ("timestamp", False, icmp_out(13, 0)),
    )),
    Case("udp-ipv6", (drop_out("d-udp6", "<udp-ipv6 dstportstart='5000'/>"),), (
        ("udp6-5000", False, udp6_out(dport=5000)),
        ("udp6-5001", False, udp6_out(dport=5001)),
        ("udp4-5000", False, udp_out(dport=5000)),
    )),
    Case("icmpv6", (drop_out("d-icmp6", "<icmpv6 type='128'/>"),), (
        ("echo6", False, icmp6_out()),
        ("udp6", False, udp6_out()),
    )),
    Case("all-ipv6-src", (drop_out("d-all6", "<all-ipv6 srcipaddr='fd77:0:0:1::' "
                                             "srcipmask='64'/>"),), (
        ("src-own", False, udp6_out()),
        ("src-other-prefix", False, udp6_out(src="fd77:0:0:1::5")),
    )),
    Case("split-match", (drop_out("d-split", "<udp dstportstart='5000'/>"
                                             "<udp match='no' srcipaddr='$IP'/>"),), (
        ("own-5000", False, udp_out(dport=5000)),
        ("spoofed-5000", False, udp_out(dport=5000, src="10.77.0.99")),
        ("spoofed-5001", False, udp_out(dport=5001, src="10.77.0.99")),
    ), params=(("IP", G0_IP),)),
    Case("l3-udp-srcmac", (drop_out("d-l3mac", "<udp srcmacaddr='52:54:00:aa:bb:cc'/>"),), (
        ("spoofed-mac", False, udp_out(mac=OTHER_MAC)),
        ("own-mac", False, udp_out()),
        ("in", True, udp_in()),
    )),
    Case("ipt-no-macspoof", (root("d-nomacspoof", (
        "<rule action='drop' direction='inout'>"
        "<all match='no' srcmacaddr='$MAC'/></rule>")),), (
        ("own-mac", False, udp_out()),
        ("spoofed-mac", False, udp_out(mac=OTHER_MAC)),
        ("in", True, udp_in()),
    )),
    Case("subchain-fall-through", (
        "<filter name='d-sub' chain='mac-t'>"
        "<rule action='return' direction='out' priority='100'>"
        "<mac protocolid='0x88b5' dstmacaddr='02:00:00:00:00:aa'/></rule>"
        "<rule action='drop' direction='out' priority='200'>"
        "<mac protocolid='0x88b5' dstmacaddr='02:00:00:00:00:bb'/></rule></filter>",
        root("d-sub-top", "<filterref filter='d-sub'/>"
             "<rule action='drop' direction='out' priority='500'>"
             "<mac protocolid='0x88b5'/></rule>"),
    ), (
        ("returned-aa", False, ether_out(0x88B5, dst="02:00:00:00:00:aa")),
        ("dropped-bb", False, ether_out(0x88B5, dst="02:00:00:00:00:bb")),
        ("fell-off-cc", False, ether_out(0x88B5, dst="02:00:00:00:00:cc")),
    )),
    Case("subchain-continue", (
        "<filter name='d-cont' chain='mac-t'>"
        "<rule action='continue' direction='out' priority='100'>"
        "<mac protocolid='0x88b5'/></rule>"
        "<rule action='drop' direction='out' priority='200'>"
        "<mac protocolid='0x88b5' dstmacaddr='02:00:00:00:00:aa'/></rule></filter>",
        root("d-cont-top", "<filterref filter='d-cont'/>"
             "<rule action='drop' direction='out' priority='500'>"
             "<mac protocolid='0x88b5' dstmacaddr='02:00:00:00:00:bb'/></rule>"),
    ), (
        ("to-aa", False, ether_out(0x88B5, dst="02:00:00:00:00:aa")),
        ("to-bb", False, ether_out(0x88B5, dst="02:00:00:00:00:bb")),
        ("to-cc", False, ether_out(0x88B5, dst="02:00:00:00:00:cc")),
    )),
    Case("ipv4-chain-fall-through", (
        "<filter name='d-mychain' chain='ipv4-mychain' priority='-710'>"
        "<rule action='accept' direction='out'>"
        "<ip protocol='udp' dstportstart='5500'/></rule></filter>",
        root("d-mychain-top", "<filterref filter='d-mychain'/>"
             "<rule action='drop' direction='out' priority='-700'><ip/></rule>"),
    ), (
        ("udp-5500", False, udp_out(dport=5500)),
        ("udp-5501", False, udp_out(dport=5501)),
        ("arp", False, arp_out()),
    )),
)


def frames_of(case: Case) -> list[Frame]:
    out = []
    for i, (label, inbound, build) in enumerate(case.probes):
        pkt = build() / Raw(MARKER + b"%03d" % i)
        out.append(Frame(label, inbound, bytes(pkt)))
    return out


def binding_xml(filter_name: str, params: tuple[tuple[str, str], ...]) -> str:
    parameters = "".join(f"<parameter name='{k}' value='{v}'/>" for k, v in params)
    return (f"<filterbinding><owner><name>vm0</name><uuid>{uuid.UUID(int=1)}</uuid></owner>"
            f"<portdev name='vnet0'/><mac address='{G0_MAC}'/>"
            f"<filterref filter='{filter_name}'>{parameters}</filterref></filterbinding>")


def record() -> None:
    results = []
    with NetLab() as netlab:
        lab = build_bridge_lab(netlab)
        quiet_guests(lab)
        daemon = ReferenceDaemon(lab.host, existing=True)
        daemon.start()
        try:
            for case in CASES:
                frames = frames_of(case)
                names = []
                for doc in case.filters:
                    error = daemon.define(doc)
                    if error is not None:
                        raise SystemExit(f"{case.id}: libvirt refused a filter: {error}")
                    names.append(doc.split("name='", 1)[1].split("'", 1)[0])
                target = names[-1] if names else case.stock[0]
                path = daemon.work / "binding.xml"
                path.write_text(binding_xml(target, case.params))
                daemon.virsh("nwfilter-binding-create", str(path))
                arrived = replay(lab, frames)
                rules = daemon.run("ebtables-save", "-t", "nat").stdout
                daemon.virsh("nwfilter-binding-delete", "vnet0")
                baseline = replay(lab, frames)
                if baseline != {f.label for f in frames}:
                    raise SystemExit(f"{case.id}: without a binding only {sorted(baseline)} "
                                     "arrived")
                for name in reversed(names):
                    daemon.virsh("nwfilter-undefine", name)
                print(f"{case.id}: {sorted(arrived)}")
                entry: dict[str, object] = {
                    "id": case.id,
                    "filters": list(case.filters),
                    "bind": target,
                    "params": [list(p) for p in case.params],
                    "frames": [{"label": f.label, "inbound": f.inbound, "hex": f.data.hex()}
                               for f in frames],
                    "libvirt_delivered": sorted(arrived),
                    "libvirt_ebtables_nat": [line for line in rules.splitlines()
                                             if line and not line.startswith("#")],
                }
                if case.refused is not None:
                    entry["refused"] = case.refused
                    entry["note"] = case.note
                results.append(entry)
        finally:
            daemon.stop()
    document = {
        "libvirt": daemon_version(),
        "how": "tools/record_libvirt_verdicts.py",
        "cases": results,
    }
    OUTPUT.write_text(json.dumps(document, indent=1) + "\n")


def daemon_version() -> str:
    import subprocess

    done = subprocess.run(["libvirtd", "--version"], capture_output=True, text=True, check=False)
    return done.stdout.strip()


if __name__ == "__main__":
    record()
