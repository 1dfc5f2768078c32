"""Exposure: what a port's compiled rules let its guest do.

Decided from the rules, not from filter names: probe frames that a
spoofing or rogue guest would send are explained against the port's
ruleset (`nwfilter.audit.explain`, whose verdicts are tested against the
kernel's), and every probe the rules accept is a finding.  Probes go out of
the guest (libvirt's direction 'out'), as a guest that spoofs sends them;
their own addresses are the port's MAC and its first given or learnt IP.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass

from nwfilter.audit.explain import Explainer, semantics_of
from nwfilter.audit.findings import Finding
from nwfilter.audit.packet import Frame, PacketSpec, build_frame
from nwfilter.ir import Hook, Ruleset

FOREIGN_MAC = "02:00:5e:10:00:99"
FOREIGN_IP = "198.51.100.77"
FOREIGN_IP6 = "2001:db8::77"


@dataclass(frozen=True)
class Probe:
    kind: str
    severity: str
    what: str
    fix: str
    spec: PacketSpec


def probes(mac: str, ip: str | None) -> list[Probe]:
    own = ip or "0.0.0.0"
    peer = "255.255.255.255"
    return [
        Probe("exposure.mac-spoofing", "high", "an IPv4 packet with a foreign source MAC",
              "add <filterref filter='no-mac-spoofing'/> (or clean-traffic)",
              PacketSpec(src_mac=FOREIGN_MAC, proto="udp", src_ip=own, dst_ip=peer,
                         sport=40000, dport=9)),
        Probe("exposure.mac-spoofing", "high", "an ARP request with a foreign source MAC",
              "add <filterref filter='no-mac-spoofing'/> (or clean-traffic)",
              PacketSpec(src_mac=FOREIGN_MAC, proto="arp", src_ip=own, dst_ip=FOREIGN_IP,
                         arp_sha=FOREIGN_MAC)),
        Probe("exposure.mac-spoofing", "high", "a frame of another protocol with a foreign "
              "source MAC", "add <filterref filter='no-mac-spoofing'/> (or clean-traffic)",
              PacketSpec(src_mac=FOREIGN_MAC, proto="ether:0x88b5")),
        Probe("exposure.ip-spoofing", "high", f"an IPv4 packet from {FOREIGN_IP}",
              "add <filterref filter='no-ip-spoofing'/> with the guest's IP (or clean-traffic)",
              PacketSpec(src_mac=mac, proto="udp", src_ip=FOREIGN_IP, dst_ip=peer,
                         sport=40000, dport=9)),
        Probe("exposure.ipv6-spoofing", "medium", f"an IPv6 packet from {FOREIGN_IP6}",
              "add <filterref filter='no-ipv6-spoofing'/> with IPV6, or drop IPv6",
              PacketSpec(src_mac=mac, proto="udp", src_ip=FOREIGN_IP6, dst_ip="ff02::1",
                         sport=40000, dport=9, ipv6=True)),
        Probe("exposure.arp-spoofing", "high", f"an ARP reply claiming {FOREIGN_IP}",
              "add <filterref filter='no-arp-spoofing'/> (or clean-traffic)",
              PacketSpec(src_mac=mac, proto="arp", arp_op=2, src_ip=FOREIGN_IP, dst_ip=own,
                         arp_sha=mac)),
        Probe("exposure.arp-spoofing", "high", "an ARP reply with a foreign sender MAC",
              "add <filterref filter='no-arp-mac-spoofing'/> (or clean-traffic)",
              PacketSpec(src_mac=mac, proto="arp", arp_op=2, src_ip=own, dst_ip=own,
                         arp_sha=FOREIGN_MAC)),
        # clean-traffic lets this pass (as libvirt's does): medium, so that
        # `--fail-on high` does not fail every clean-traffic port.
        Probe("exposure.dhcp-server", "medium", "a DHCP server reply (UDP 67 to 68)",
              "drop it: <rule action='drop' direction='out'><udp srcportstart='67' "
              "dstportstart='68'/></rule>",
              PacketSpec(src_mac=mac, proto="udp", src_ip=own, dst_ip=peer, sport=67,
                         dport=68)),
        Probe("exposure.ipv6-ra", "high", "an IPv6 router advertisement",
              "drop ICMPv6 type 134 out of the guest, or all IPv6 (clean-traffic does)",
              PacketSpec(src_mac=mac, proto="icmpv6", src_ip="fe80::5054:ff:fe00:1",
                         dst_ip="ff02::1", icmp_type=134, ipv6=True)),
    ]


class _ProbeFrame(Frame):
    """A probe's frame, described by what it probes: a walk without a
    trace never shows the description, so it is not built from the bytes."""

    def __init__(self, data: bytes, what: str) -> None:
        super().__init__(data)
        self._what = what

    def describe(self) -> str:
        return self._what


@functools.lru_cache(maxsize=64)
def _fixed_frame(spec: PacketSpec) -> bytes:
    """The bytes of a probe that is the same for every port."""
    return build_frame(spec)


def port_exposure(rs: Ruleset, ip: str | None, vm: str, backend: str = "nft") -> list[Finding]:
    """What the probes find the port's rules accept from the guest, walked
    with the semantics of the backend that applied them."""
    explainer = Explainer(rs, backend=semantics_of(backend))
    out: list[Finding] = []
    seen: set[str] = set()
    for probe in probes(rs.port.mac, ip):
        if probe.kind in seen:
            continue
        spec = probe.spec
        data = _fixed_frame(spec) if spec.src_mac == FOREIGN_MAC and spec.src_ip is None \
            else build_frame(spec)
        result = explainer.explain(Hook.FROM_VM, _ProbeFrame(data, probe.what), trace=False)
        if result.verdict != "ACCEPT":
            continue
        seen.add(probe.kind)
        origin = result.origin
        flt, _, rule = origin[len("filter '"):].partition("' ") if origin.startswith(
            "filter '") else ("", "", origin)
        out.append(Finding(
            probe.kind, probe.severity,
            f"the rules accept {probe.what} from the guest ({result.decided_by})",
            probe.fix, port=rs.port.portdev, vm=vm, filter=flt, rule=rule))
    return out


def unfiltered(rows: Iterable[tuple[str, str, str]]) -> list[Finding]:
    """(vm, interface, mac) of running interfaces with no filterref."""
    return [Finding("exposure.unfiltered", "high",
                    f"interface {iface} (mac {mac}) of running VM {vm} has no filter: "
                    "the guest may spoof MAC, IP and ARP and answer DHCP",
                    "add <filterref filter='clean-traffic'/> to the interface",
                    port=iface, vm=vm) for vm, iface, mac in rows]
