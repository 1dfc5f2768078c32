"""`nwfilter explain` gives the kernel's verdicts, on each kernel backend.

Two guests of a bridge lab are bound through a backend (nft, then
ebiptables), each with a tree of filters of its own: layer 2 (mac, vlan,
stp, arp, rarp, ip and ipv6 in sub-chains of their own, with accept,
drop, reject, return) and layer 3 (tcp, udp, udplite, icmp, igmp, sctp,
esp, ah, all, their IPv6 forms, with explicit and implicit conntrack
states).  Hundreds of frames drawn by a seeded generator go from guest 0
to guest 1 and back; a frame arrives when the sender's port accepts it
going out and the receiver's port accepts it coming in, so the explainer's
two verdicts (for the backend the rules are in) must say exactly which
frames the kernel delivered.  Every frame is of a flow of its own (its own
ports, or its own ICMP identifier), so conntrack sees each as the
explainer assumes (no earlier packet).
"""

from __future__ import annotations

import json
import random
import struct
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.ipsec import AH
from scapy.layers.l2 import ARP, LLC, STP, Dot1Q, Dot3, Ether
from scapy.layers.sctp import SCTP, SCTPChunkData, SCTPChunkInit, SCTPChunkParamHostname
from scapy.packet import Packet, Raw
from scapy.utils import wrpcap

from nwfilter.audit.explain import Explainer
from nwfilter.audit.packet import PacketSpec, build_frame
from nwfilter.backends import get_backend
from nwfilter.cli import main
from nwfilter.conf import parse_binding
from nwfilter.engine import Engine
from nwfilter.ir import CtState, Hook
from nwfilter.netlab import NetLab
from tests.integration.conftest import STOCK_DIR, BridgeLab, build_bridge_lab, kernel_engine
from tests.integration.replay import Frame, quiet_guests, replay

pytestmark = [pytest.mark.root, pytest.mark.netns]

BACKENDS = ("nft", "ebiptables")

FILTER_A = """<filter name='explain-a' chain='root'>
  <filterref filter='clean-traffic'/>
  <rule action='accept' direction='inout' priority='-650'><mac protocolid='ipv6'/></rule>
  <rule action='accept' direction='inout' priority='900'><vlan/></rule>
  <rule action='accept' direction='inout' priority='900'><stp/></rule>
  <rule action='accept' direction='inout' priority='900'><mac protocolid='0x88b5'/></rule>
  <rule action='accept' direction='inout' priority='900'><mac protocolid='0x88b7'/></rule>
  <rule action='accept' direction='out' priority='100'>
    <tcp dstportstart='22' dstportend='80'/></rule>
  <rule action='accept' direction='out'><udp dstportstart='53'/></rule>
  <rule action='reject' direction='out'><udp dstportstart='5000' dstportend='5999'/></rule>
  <rule action='accept' direction='inout'><icmp type='8'/></rule>
  <rule action='accept' direction='in'><tcp dstportstart='443'/></rule>
  <rule action='accept' direction='in'><udp srcportstart='1000' srcportend='1999'/></rule>
  <rule action='accept' direction='out'><igmp/></rule>
  <rule action='accept' direction='inout'><esp/></rule>
  <rule action='accept' direction='in'><ah/></rule>
  <rule action='accept' direction='out'><sctp dstportstart='2905'/></rule>
  <rule action='accept' direction='inout'><udplite/></rule>
  <rule action='accept' direction='in'><all srcipaddr='10.77.0.11'/></rule>
  <rule action='drop' direction='inout'><all/></rule>
  <rule action='accept' direction='inout'><all-ipv6 srcipaddr='fd00::' srcipmask='64'/></rule>
</filter>"""

# Guest 1's filter: a root filter referencing one filter per layer-2 chain.
FILTER_B_MAC = """<filter name='explain-b-mac' chain='mac'>
  <rule action='drop' direction='out'><mac protocolid='0x88b6'/></rule>
  <rule action='return' direction='out'><mac srcmacaddr='$MAC'/></rule>
  <rule action='drop' direction='out'><mac/></rule>
  <rule action='reject' direction='in'><mac protocolid='0x88b7'/></rule>
  <rule action='return' direction='in'><mac/></rule>
</filter>"""
FILTER_B_VLAN = """<filter name='explain-b-vlan' chain='vlan'>
  <rule action='drop' direction='inout'><vlan vlanid='100'/></rule>
  <rule action='accept' direction='out'><vlan vlanid='200' encap-protocol='ipv4'/></rule>
  <rule action='return' direction='inout'><vlan vlanid='300'/></rule>
  <rule action='drop' direction='in'><vlan encap-protocol='arp'/></rule>
</filter>"""
FILTER_B_STP = """<filter name='explain-b-stp' chain='stp'>
  <rule action='drop' direction='inout'><stp type='0x80'/></rule>
  <rule action='drop' direction='in'><stp type='0' root-priority='0x1000'/></rule>
  <rule action='drop' direction='out'><stp flags='0x01'/></rule>
  <rule action='accept' direction='inout'><stp type='0'/></rule>
</filter>"""
FILTER_B_IP = """<filter name='explain-b-ip' chain='ipv4'>
  <rule action='drop' direction='out'><ip protocol='udp' dstportstart='7000'
    dstportend='7999'/></rule>
  <rule action='accept' direction='in'><ip srcipaddr='10.77.0.10' protocol='tcp'
    dstportstart='8080'/></rule>
  <rule action='drop' direction='in'><ip protocol='esp'/></rule>
</filter>"""
FILTER_B_IP6 = """<filter name='explain-b-ip6' chain='ipv6'>
  <rule action='drop' direction='inout'><ipv6 protocol='udp' dstportstart='7000'
    dstportend='7999'/></rule>
  <rule action='drop' direction='in'><ipv6 srcipaddr='fd00::99'/></rule>
</filter>"""
FILTER_B = """<filter name='explain-b' chain='root'>
  <filterref filter='explain-b-mac'/>
  <filterref filter='explain-b-vlan'/>
  <filterref filter='explain-b-stp'/>
  <filterref filter='explain-b-ip'/>
  <filterref filter='explain-b-ip6'/>
  <rule action='accept' direction='inout'>
    <arp opcode='Request' arpsrcipaddr='10.77.0.0' arpsrcipmask='24'/></rule>
  <rule action='drop' direction='inout'><arp/></rule>
  <rule action='drop' direction='in'><rarp/></rule>
  <rule action='accept' direction='inout'><tcp-ipv6 dstportstart='22'/></rule>
  <rule action='accept' direction='inout'><icmpv6 type='128'/></rule>
  <rule action='accept' direction='out'><udp-ipv6 dstportstart='53'/></rule>
  <rule action='accept' direction='inout'><sctp-ipv6 dstportstart='2905'/></rule>
  <rule action='accept' direction='in'><esp-ipv6/></rule>
  <rule action='reject' direction='out'><ah-ipv6 srcipaddr='fd00::99'/></rule>
  <rule action='accept' direction='inout'><ah-ipv6/></rule>
  <rule action='drop' direction='inout'><all-ipv6/></rule>
  <rule action='drop' direction='out'><icmp state='INVALID'/></rule>
  <rule action='accept' direction='in'><tcp dstportstart='8080' state='NEW'/></rule>
  <rule action='accept' direction='in'>
    <udp srcipaddr='10.77.0.0' srcipmask='24' dstportstart='1000' dstportend='4999'/></rule>
  <rule action='accept' direction='in'><udp dstportstart='53'/></rule>
  <rule action='accept' direction='out'><udp/></rule>
  <rule action='drop' direction='in'><udp/></rule>
  <rule action='accept' direction='in'><tcp dstportstart='80' flags='SYN/SYN'/></rule>
  <rule action='accept' direction='out'><tcp dstportstart='443'/></rule>
  <rule action='drop' direction='in'><tcp/></rule>
  <rule action='reject' direction='out'><igmp srcipaddr='192.0.2.7'/></rule>
  <rule action='accept' direction='inout'><sctp dstportstart='2905'/></rule>
  <rule action='drop' direction='inout'><sctp/></rule>
</filter>"""
FILTERS = (FILTER_A, FILTER_B_MAC, FILTER_B_VLAN, FILTER_B_STP, FILTER_B_IP, FILTER_B_IP6,
           FILTER_B)

GUEST_IP6 = ("fd00::10", "fd00::11")
COUNT = 300  # frames per direction
# Frames replayed at once: a burst must fit the capturing socket's buffer
# (about 200 small frames), since the capture is read after the burst.
CHUNK = 50
STP_GROUP = "01:80:c2:00:00:00"
# Destination ports drawn from, per kind of frame (the ports the filters name).
DPORTS = {"tcp": (21, 22, 53, 67, 80, 81, 443, 1000, 1500, 2905, 4999, 5000, 5500, 5999,
                  6000, 7000, 7500, 8080, 9999),
          "sctp": (2905, 2905, 9999), "sctp6": (2905, 2905, 9999), "tcp6": (22, 22, 80),
          "udp6": (53, 53, 7000, 7999), "ah": (7000, 9), "ah6": (7000, 7500, 9)}
# Protocols conntrack tells flows of apart by the addresses alone: each
# frame of these goes to an address of its own.
UNPORTED = frozenset({"igmp", "esp", "ah", "gre", "esp6", "ah6"})
KINDS = ("tcp", "udp", "icmp", "igmp", "sctp", "esp", "ah", "udplite", "gre", "tcp6", "udp6",
         "icmp6", "sctp6", "esp6", "ah6", "arp", "rarp", "ether", "vlan", "stp", "udp", "tcp")


@pytest.fixture(scope="module")
def klab() -> Iterator[BridgeLab]:
    with NetLab() as netlab:
        lab = build_bridge_lab(netlab)
        quiet_guests(lab)
        yield lab


@pytest.fixture(params=BACKENDS)
def engine(klab: BridgeLab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    with kernel_engine(get_backend(request.param, klab.host), tmp_path) as eng:
        yield eng


def _binding(portdev: str, mac: str, flt: str, ip: str) -> str:
    return (f"<filterbinding><owner><name>vm-{portdev}</name><uuid>{uuid.uuid4()}</uuid>"
            f"</owner><portdev name='{portdev}'/><mac address='{mac}'/>"
            f"<filterref filter='{flt}'><parameter name='IP' value='{ip}'/></filterref>"
            f"</filterbinding>")


def stp_frame(src_mac: str, kind: int, flags: int, root_prio: int, payload: bytes) -> bytes:
    """An 802.3 LLC frame with a BPDU to the bridge group address (a
    configuration BPDU when `kind` is 0, else just the type)."""
    bpdu = struct.pack("!HBB", 0, 0, kind)
    if kind == 0:
        bpdu += struct.pack("!BH6sIH6sHHHHH", flags, root_prio, bytes(6), 4, 0x8000, bytes(6),
                            0x8001, 0, 20 * 256, 2 * 256, 15 * 256)
    body = b"\x42\x42\x03" + bpdu + payload
    frame = bytes.fromhex(STP_GROUP.replace(":", "")) + bytes.fromhex(
        src_mac.replace(":", "")) + struct.pack("!H", len(body)) + body
    return frame + b"\0" * max(0, 60 - len(frame))


def _frames(rng: random.Random, sender: int, count: int, start: int) -> list[tuple[str, bytes]]:
    """Frames guest `sender` sends to the other guest, as (kind, bytes);
    source ports and ICMP identifiers from `start` on, one per frame, and
    destination ports below 10000, so no frame is a reply to another."""
    me, peer = sender, 1 - sender
    own_mac, peer_mac = f"52:54:00:00:00:{me:02x}", f"52:54:00:00:00:{peer:02x}"
    own_ip, peer_ip = f"10.77.0.1{me}", f"10.77.0.1{peer}"
    out: list[tuple[str, bytes]] = []
    for n in range(count):
        kind = rng.choice(KINDS)
        src_mac = own_mac if rng.random() < 0.75 else f"52:54:00:ab:{rng.randrange(256):02x}:" \
                                                       f"{rng.randrange(256):02x}"
        dst_mac = rng.choice([peer_mac, peer_mac, "ff:ff:ff:ff:ff:ff"])
        # Never the peer's address as source: a reject would send the
        # probe's bytes back to the peer, as if the probe had arrived.
        src_ip = rng.choice([own_ip, own_ip, own_ip, "10.77.0.99", "0.0.0.0", "192.0.2.7"])
        dst_ip = rng.choice([peer_ip, peer_ip, "10.77.0.200", "255.255.255.255"])
        dport = rng.choice(DPORTS.get(kind, DPORTS["tcp"]))
        sport = start + n
        marker = f"nwt-probe:{n % CHUNK:03d}".encode()
        proto = {"gre": "47"}.get(kind, kind)
        if kind in UNPORTED:
            dst_ip = f"10.78.{sport >> 8}.{sport & 0xFF}"
        payload = marker
        if kind in ("ah", "ah6") and rng.random() < 0.5:
            # An authentication header (no ICV) before UDP, which ebtables'
            # ip6 match skips and nft and ip6tables do not.
            payload = struct.pack("!BBHII", 17, 1, 0, 0x100, 1) + struct.pack(
                "!HHHH", sport, dport, 8 + len(marker), 0) + marker
        if kind.endswith("6"):
            src6 = rng.choice([GUEST_IP6[me], "fd00::99", f"fe80::5054:ff:fe00:{me}"])
            dst6 = f"fd00::1:{sport:x}" if kind in UNPORTED else GUEST_IP6[peer]
            spec = PacketSpec(src_mac=src_mac, dst_mac=dst_mac, proto=proto[:-1].replace(
                "icmp", "icmpv6"), src_ip=src6, dst_ip=dst6, sport=sport,
                dport=dport, icmp_type=rng.choice([128, 129, 135]), icmp_id=sport, ipv6=True,
                tcp_flags=rng.choice(["syn", "ack"]), payload=payload)
        elif kind == "rarp" and rng.random() < 0.4:
            # What QEMU announces after a migration, which clean-traffic lets pass.
            spec = PacketSpec(src_mac=src_mac, dst_mac="ff:ff:ff:ff:ff:ff", proto=kind,
                              src_ip="0.0.0.0", dst_ip="0.0.0.0", arp_op=3, arp_sha=peer_mac,
                              arp_tha=peer_mac, payload=marker)
        elif kind in ("arp", "rarp"):
            spec = PacketSpec(src_mac=src_mac, dst_mac="ff:ff:ff:ff:ff:ff", proto=kind,
                              src_ip=rng.choice([own_ip, "10.77.0.99", "192.0.2.7"]),
                              dst_ip=peer_ip, arp_op=rng.choice([1, 1, 2, 3, 4]),
                              arp_sha=rng.choice([src_mac, own_mac, "52:54:00:ab:00:01"]),
                              payload=marker)
        elif kind == "ether":
            spec = PacketSpec(src_mac=src_mac, dst_mac=dst_mac,
                              proto=rng.choice(["ether:0x88b5", "ether:0x88b6", "ether:0x88b7"]),
                              payload=marker)
        elif kind == "stp":
            out.append((kind, stp_frame(src_mac, rng.choice([0, 0, 0x80]),
                                        rng.choice([0, 1, 0x80]),
                                        rng.choice([0x1000, 0x8000]), marker)))
            continue
        elif kind == "vlan":
            inner = rng.choice(["udp", "arp", "ether:0x88b5"])
            spec = PacketSpec(src_mac=src_mac, dst_mac=dst_mac, proto=inner, src_ip=own_ip,
                              dst_ip=peer_ip, sport=sport, dport=dport,
                              vlan=rng.choice([100, 200, 300, 400]), payload=marker)
        else:
            spec = PacketSpec(src_mac=src_mac, dst_mac=dst_mac, proto=proto, src_ip=src_ip,
                              dst_ip=dst_ip, sport=sport, dport=dport,
                              icmp_type=rng.choice([8, 0, 13]), icmp_id=sport,
                              dscp=rng.choice([0, 10]),
                              tcp_flags=rng.choice(["syn", "ack", "syn"]), payload=payload)
        out.append((kind, build_frame(spec)))
    return out


def test_explain_verdicts_equal_the_kernels(klab: BridgeLab, engine: Engine) -> None:
    for doc in FILTERS:
        engine.define_filter(doc)
    g0, g1 = klab.guests
    engine.create_bindings([
        parse_binding(_binding(g0.portdev, g0.mac, "explain-a", g0.ip)),
        parse_binding(_binding(g1.portdev, g1.mac, "explain-b", g1.ip)),
    ])
    backend = engine.backend.name
    ports = {p: Explainer(engine.ruleset(p), backend=backend) for p in (g0.portdev, g1.portdev)}
    rng = random.Random(20240614)
    # Ports (and ICMP identifiers) of a backend's own: the conntrack
    # entries of the run before are still there.
    base = 10000 + 20000 * BACKENDS.index(backend)
    frames: list[Frame] = []
    expected: set[str] = set()
    kinds: set[tuple[str, bool]] = set()
    verdicts: set[str] = set()
    described: dict[str, str] = {}
    for inbound in (False, True):
        sender, receiver = (g1, g0) if inbound else (g0, g1)
        drawn = _frames(rng, 1 if inbound else 0, COUNT, base + (10000 if inbound else 0))
        for n, (kind, data) in enumerate(drawn):
            label = f"{'in' if inbound else 'out'}-{n}"
            frames.append(Frame(label, inbound, data))
            out = ports[sender.portdev].explain(Hook.FROM_VM, data)
            into = ports[receiver.portdev].explain(Hook.TO_VM, data)
            assert out.backend == into.backend == backend
            verdicts.update((out.verdict, into.verdict))
            described[label] = (f"{label} {out.packet}: out {out.verdict} by {out.decided_by}, "
                                f"in {into.verdict} by {into.decided_by}")
            delivered = out.verdict == "ACCEPT" and into.verdict == "ACCEPT"
            kinds.add((kind, delivered))
            if delivered:
                expected.add(label)
    # The draw reaches every verdict, and every kind of frame both ways.
    assert verdicts == {"ACCEPT", "DROP", "REJECT"}
    assert {k for k, delivered in kinds if delivered} == set(KINDS)
    assert {k for k, delivered in kinds if not delivered} == set(KINDS)
    arrived: set[str] = set()
    for start in range(0, len(frames), CHUNK):
        arrived |= replay(klab, frames[start:start + CHUNK])
    missing = sorted(expected - arrived)
    extra = sorted(arrived - expected)
    assert not missing and not extra, (
        f"{backend}: of {len(frames)} frames, explained as accepted but not delivered: "
        f"{[described[x] for x in missing[:8]]}; delivered but explained as refused: "
        f"{[described[x] for x in extra[:8]]}")


FILTER_CTDIR = """<filter name='explain-ctdir' chain='root'>
  <rule action='accept' direction='in'><udp dstportstart='6000' state='NEW'/></rule>
  <rule action='accept' direction='out'><udp dstportstart='5353'/></rule>
  <rule action='drop' direction='inout'><udp/></rule>
</filter>"""


def test_conntrack_direction_as_each_backend_tests_it(klab: BridgeLab, engine: Engine) -> None:
    """libvirt's implicit state of an 'out' rule carries `--ctdir ORIGINAL`
    on ebiptables, nothing on nft: the reply to a flow guest 0 opened, from
    the port that 'out' rule names, passes nft and not ebiptables, and the
    explainer says so for an established packet (the reply direction)."""
    engine.define_filter(FILTER_CTDIR)
    g0, g1 = klab.guests
    engine.create_bindings([parse_binding(_binding(g1.portdev, g1.mac, "explain-ctdir", g1.ip))])
    backend = engine.backend.name
    explainer = Explainer(engine.ruleset(g1.portdev), backend=backend)
    # A source address of its own per backend: a flow of its own.
    peer = f"10.77.0.{50 + BACKENDS.index(backend)}"
    opening = build_frame(PacketSpec(src_mac=g0.mac, dst_mac=g1.mac, src_ip=peer, dst_ip=g1.ip,
                                     sport=5353, dport=6000, payload=b"nwt-probe:000"))
    reply = build_frame(PacketSpec(src_mac=g1.mac, dst_mac=g0.mac, src_ip=g1.ip, dst_ip=peer,
                                   sport=6000, dport=5353, payload=b"nwt-probe:000"))
    assert explainer.explain(Hook.TO_VM, opening).verdict == "ACCEPT"
    assert replay(klab, [Frame("opening", False, opening)]) == {"opening"}
    walk = explainer.explain(Hook.FROM_VM, reply, ct_state=CtState.ESTABLISHED)
    assert (walk.ct_dir, walk.verdict) == ("reply", "ACCEPT" if backend == "nft" else "DROP")
    assert replay(klab, [Frame("reply", True, reply)]) == (
        {"reply"} if walk.verdict == "ACCEPT" else set())


def _scapy_frames(sender: int, base: int, first: int) -> list[Packet]:
    """Frames of every family guest `sender` sends the other, made by
    scapy (not by `build_frame`), marked from `first` on; ports, ICMP
    identifiers and the addresses of AH and ESP are the frame's own
    (`base` on), as in the random draw."""
    me, peer = sender, 1 - sender
    own_mac, peer_mac = f"52:54:00:00:00:{me:02x}", f"52:54:00:00:00:{peer:02x}"
    own_ip, peer_ip = f"10.77.0.1{me}", f"10.77.0.1{peer}"
    own6, peer6 = GUEST_IP6[me], GUEST_IP6[peer]
    eth = Ether(src=own_mac, dst=peer_mac)
    # Inside SCTP chunks: bytes after one would be taken for another chunk.
    init, data = (f"nwt-probe:{first + n:03d}".encode() for n in (9, 10))
    stp = Dot3(src=own_mac, dst=STP_GROUP) / LLC(dsap=0x42, ssap=0x42, ctrl=3)
    out: list[Packet] = [
        eth / IP(src=own_ip, dst=peer_ip) / UDP(sport=base, dport=53),
        eth / IP(src=own_ip, dst=peer_ip) / UDP(sport=base + 1, dport=7000),
        eth / IP(src=own_ip, dst=peer_ip) / UDP(sport=base + 2, dport=1500),
        eth / IP(src="10.77.0.99", dst=peer_ip) / UDP(sport=base + 3, dport=53),
        eth / IP(src=own_ip, dst=peer_ip) / TCP(sport=base + 4, dport=8080, flags="S"),
        eth / IP(src=own_ip, dst=peer_ip) / TCP(sport=base + 5, dport=443, flags="S"),
        eth / IP(src=own_ip, dst=peer_ip) / TCP(sport=base + 6, dport=80, flags="A"),
        eth / IP(src=own_ip, dst=peer_ip) / ICMP(type=8, id=base + 7),
        eth / IP(src=own_ip, dst=peer_ip) / ICMP(type=0, id=base + 8),
        eth / IP(src=own_ip, dst=peer_ip) / SCTP(sport=base + 9, dport=2905)
        / SCTPChunkInit(init_tag=1, params=[SCTPChunkParamHostname(hostname=init)]),
        eth / IP(src=own_ip, dst=peer_ip) / SCTP(sport=base + 10, dport=2905)
        / SCTPChunkData(data=data),
        eth / IP(src=own_ip, dst=f"10.79.{base >> 8 & 0xFF}.{base & 0xFF}", proto=50),
        eth / IPv6(src=own6, dst=f"fd00::2:{base:x}") / AH(nh=59),
        eth / IPv6(src=own6, dst=peer6) / TCP(sport=base + 11, dport=22, flags="S"),
        eth / IPv6(src=own6, dst=peer6) / UDP(sport=base + 12, dport=53),
        Ether(src=own_mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=1, hwsrc=own_mac, psrc=own_ip,
                                                       pdst=peer_ip),
        Ether(src=own_mac, dst="ff:ff:ff:ff:ff:ff") / ARP(op=2, hwsrc=own_mac, psrc=own_ip,
                                                       pdst=peer_ip),
        eth / Dot1Q(vlan=200) / IP(src=own_ip, dst=peer_ip) / UDP(sport=base + 13, dport=9),
        eth / Dot1Q(vlan=100) / IP(src=own_ip, dst=peer_ip) / UDP(sport=base + 14, dport=9),
        stp / STP(bpdutype=0, bpduflags=0, rootid=0x8000),
        stp / STP(bpdutype=0, bpduflags=1, rootid=0x1000),
        stp / STP(bpdutype=0x80),
        Ether(src=own_mac, dst=peer_mac, type=0x88B5),
        Ether(src=own_mac, dst=peer_mac, type=0x88B6),
    ]
    return [p if p.haslayer(SCTP) else p / Raw(f"nwt-probe:{first + n:03d}".encode())
            for n, p in enumerate(out)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_explain_reads_pcap_and_prints_json(klab: BridgeLab, tmp_path: Path, capsys: Any,
                                            backend: str) -> None:
    """`nwfilter explain --pcap FILE --json` end to end: pcap files scapy
    wrote, the command's JSON for both ports, and the kernel's delivery of
    the same frames."""
    root = tmp_path / "root"

    def cli(*args: str) -> str:
        capsys.readouterr()
        rc = main(["--root", str(root), "--backend", backend, "--netns", klab.host, "-q",
                   *args])
        out: str = capsys.readouterr().out
        assert rc == 0, out
        return out

    g0, g1 = klab.guests
    try:
        for n, doc in enumerate(FILTERS):
            (tmp_path / f"filter{n}.xml").write_text(doc)
            cli("nwfilter-define", str(tmp_path / f"filter{n}.xml"))
        for guest, name in ((g0, "explain-a"), (g1, "explain-b")):
            (tmp_path / f"{guest.portdev}.xml").write_text(
                _binding(guest.portdev, guest.mac, name, guest.ip))
            cli("nwfilter-binding-create", str(tmp_path / f"{guest.portdev}.xml"))
        frames: list[Frame] = []
        expected: set[str] = set()
        for inbound in (False, True):
            sender, receiver = (g1, g0) if inbound else (g0, g1)
            packets = _scapy_frames(1 if inbound else 0,
                                    50000 + 5000 * BACKENDS.index(backend) + 1000 * inbound,
                                    len(frames))
            pcap = tmp_path / f"{'in' if inbound else 'out'}.pcap"
            wrpcap(str(pcap), packets)
            sent = json.loads(cli("explain", "--port", sender.portdev, "--direction", "out",
                                  "--pcap", str(pcap), "--json"))
            got = json.loads(cli("explain", "--port", receiver.portdev, "--direction", "in",
                                 "--pcap", str(pcap), "--json"))
            assert len(sent) == len(got) == len(packets)
            for n, (out, into) in enumerate(zip(sent, got, strict=True)):
                assert (out["backend"], into["backend"]) == (backend, backend)
                assert (out["port"], out["direction"]) == (sender.portdev, "out")
                assert (into["port"], into["direction"]) == (receiver.portdev, "in")
                assert out["verdict"] in ("ACCEPT", "DROP", "REJECT") and out["steps"]
                label = f"{'in' if inbound else 'out'}-{n} {packets[n].summary()}"
                frames.append(Frame(label, inbound, bytes(packets[n])))
                if out["verdict"] == into["verdict"] == "ACCEPT":
                    expected.add(label)
            text = cli("explain", "--port", sender.portdev, "--direction", "out",
                       "--pcap", str(pcap))
            assert text.count(f"rules of the {backend} backend") == len(packets)
            assert text.count("\nverdict: ") == len(packets)
        assert 0 < len(expected) < len(frames)
        assert replay(klab, frames) == expected
        delivered = {label.split()[0] for label in expected}
        # Guest 1 drops TCN BPDUs, which ebt_stp never sees as such.
        assert ("out-21" in delivered) is (backend == "ebiptables")
        # An SCTP INIT opens a flow, a DATA chunk does not (guest 0 wants state NEW).
        assert "out-9" in delivered and "out-10" not in delivered
    finally:
        # The root the command used owns the tables: clear them as it.
        kernel = get_backend(backend, klab.host)
        eng = Engine(root, kernel, stock_dir=STOCK_DIR)
        eng.start()
        eng.close()
        kernel.clear_all()
