"""`nwfilter explain` gives the kernel's verdicts.

Two guests of a bridge lab are bound through the nft backend, each with a
filter of its own (layer 2 and layer 3, IPv4, IPv6, ARP, RARP, accept,
drop, reject, sub-chains).  Hundreds of frames drawn by a seeded generator
go from guest 0 to guest 1 and back; a frame arrives when the sender's port
accepts it going out and the receiver's port accepts it coming in, so the
explainer's two verdicts must say exactly which frames the kernel delivered.
Every frame is of a flow of its own, so conntrack sees each as the
explainer assumes (no earlier packet).
"""

from __future__ import annotations

import random
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwfilter.audit.explain import Explainer
from nwfilter.audit.packet import PacketSpec, build_frame
from nwfilter.backends.nft import NftBackend
from nwfilter.conf import parse_binding
from nwfilter.engine import Engine
from nwfilter.ir import Hook
from nwfilter.netlab import NetLab
from tests.integration.conftest import BridgeLab, build_bridge_lab
from tests.integration.replay import Frame, quiet_guests, replay

pytestmark = [pytest.mark.root, pytest.mark.netns]

STOCK = Path(__file__).resolve().parents[2] / "filters"

FILTER_A = """<filter name='explain-a' chain='root'>
  <filterref filter='clean-traffic'/>
  <rule action='accept' direction='out' priority='100'>
    <tcp dstportstart='22' dstportend='80'/></rule>
  <rule action='accept' direction='out'><udp dstportstart='53'/></rule>
  <rule action='reject' direction='out'><udp dstportstart='5000' dstportend='5999'/></rule>
  <rule action='accept' direction='inout'><icmp type='8'/></rule>
  <rule action='accept' direction='in'><tcp dstportstart='443'/></rule>
  <rule action='accept' direction='in'><udp srcportstart='1000' srcportend='1999'/></rule>
  <rule action='drop' direction='inout'><all/></rule>
</filter>"""

FILTER_B = """<filter name='explain-b' chain='root'>
  <rule action='drop' direction='out'><mac srcmacaddr='$MAC' match='no'/></rule>
  <rule action='accept' direction='inout'>
    <arp opcode='Request' arpsrcipaddr='10.77.0.0' arpsrcipmask='24'/></rule>
  <rule action='drop' direction='inout'><arp/></rule>
  <rule action='drop' direction='in'><rarp/></rule>
  <rule action='accept' direction='inout'><tcp-ipv6 dstportstart='22'/></rule>
  <rule action='accept' direction='inout'><icmpv6 type='128'/></rule>
  <rule action='drop' direction='inout'><all-ipv6/></rule>
  <rule action='accept' direction='in'>
    <udp srcipaddr='10.77.0.0' srcipmask='24' dstportstart='1000' dstportend='4999'/></rule>
  <rule action='accept' direction='in'><udp dstportstart='53'/></rule>
  <rule action='accept' direction='out'><udp/></rule>
  <rule action='drop' direction='in'><udp/></rule>
  <rule action='accept' direction='in'><tcp dstportstart='80' flags='SYN/SYN'/></rule>
  <rule action='accept' direction='out'><tcp dstportstart='443'/></rule>
  <rule action='drop' direction='in'><tcp/></rule>
</filter>"""

GUEST_IP6 = ("fd00::10", "fd00::11")
COUNT = 300  # frames per direction
# Frames replayed at once: a burst must fit the capturing socket's buffer
# (about 200 small frames), since the capture is read after the burst.
CHUNK = 50


@pytest.fixture(scope="module")
def klab() -> Iterator[BridgeLab]:
    with NetLab() as netlab:
        lab = build_bridge_lab(netlab)
        quiet_guests(lab)
        yield lab


@pytest.fixture
def engine(klab: BridgeLab, tmp_path: Path) -> Iterator[Engine]:
    backend = NftBackend(netns=klab.host)
    eng = Engine(tmp_path, backend, stock_dir=STOCK)
    eng.start()
    try:
        yield eng
    finally:
        eng.close()
        backend.clear_all()


def _binding(portdev: str, mac: str, flt: str, ip: str) -> str:
    return (f"<filterbinding><owner><name>vm-{portdev}</name><uuid>{uuid.uuid4()}</uuid>"
            f"</owner><portdev name='{portdev}'/><mac address='{mac}'/>"
            f"<filterref filter='{flt}'><parameter name='IP' value='{ip}'/></filterref>"
            f"</filterbinding>")


def _frames(rng: random.Random, sender: int, count: int, start: int) -> list[PacketSpec]:
    """Frames guest `sender` sends to the other guest; source ports from
    `start` on, one per frame, and destination ports below 10000, so no
    frame is a reply to another."""
    me, peer = sender, 1 - sender
    own_mac, peer_mac = f"52:54:00:00:00:{me:02x}", f"52:54:00:00:00:{peer:02x}"
    own_ip, peer_ip = f"10.77.0.1{me}", f"10.77.0.1{peer}"
    out = []
    for n in range(count):
        kind = rng.choice(["tcp", "udp", "icmp", "tcp6", "udp6", "icmp6", "arp", "rarp",
                           "ether", "udp", "tcp"])
        src_mac = own_mac if rng.random() < 0.75 else f"52:54:00:ab:{rng.randrange(256):02x}:" \
                                                       f"{rng.randrange(256):02x}"
        dst_mac = rng.choice([peer_mac, peer_mac, "ff:ff:ff:ff:ff:ff"])
        # Never the peer's address as source: a reject would send the
        # probe's bytes back to the peer, as if the probe had arrived.
        src_ip = rng.choice([own_ip, own_ip, own_ip, "10.77.0.99", "0.0.0.0", "192.0.2.7"])
        dst_ip = rng.choice([peer_ip, peer_ip, "10.77.0.200", "255.255.255.255"])
        dport = rng.choice([21, 22, 53, 67, 80, 81, 443, 1000, 1500, 4999, 5000, 5500,
                            5999, 6000, 9999])
        sport = start + n
        marker = f"nwt-probe:{n % CHUNK:03d}".encode()
        if kind in ("tcp6", "udp6", "icmp6"):
            src6 = rng.choice([GUEST_IP6[me], "fd00::99", f"fe80::5054:ff:fe00:{me}"])
            out.append(PacketSpec(src_mac=src_mac, dst_mac=dst_mac, proto=kind[:-1].replace(
                "icmp", "icmpv6"), src_ip=src6, dst_ip=GUEST_IP6[peer], sport=sport,
                dport=dport, icmp_type=rng.choice([128, 129, 135]), ipv6=True,
                tcp_flags=rng.choice(["syn", "ack"]), payload=marker))
        elif kind in ("arp", "rarp"):
            out.append(PacketSpec(src_mac=src_mac, dst_mac="ff:ff:ff:ff:ff:ff", proto=kind,
                                  src_ip=rng.choice([own_ip, "10.77.0.99", "192.0.2.7"]),
                                  dst_ip=peer_ip, arp_op=rng.choice([1, 2, 3, 4]),
                                  arp_sha=rng.choice([src_mac, own_mac, "52:54:00:ab:00:01"]),
                                  payload=marker))
        elif kind == "ether":
            out.append(PacketSpec(src_mac=src_mac, dst_mac=dst_mac, proto="ether:0x88b5",
                                  payload=marker))
        else:
            out.append(PacketSpec(src_mac=src_mac, dst_mac=dst_mac, proto=kind, src_ip=src_ip,
                                  dst_ip=dst_ip, sport=sport, dport=dport,
                                  icmp_type=rng.choice([8, 0, 13]), dscp=rng.choice([0, 10]),
                                  tcp_flags=rng.choice(["syn", "ack", "syn"]), payload=marker))
    return out


def test_explain_verdicts_equal_the_kernels(klab: BridgeLab, engine: Engine) -> None:
    engine.define_filter(FILTER_A)
    engine.define_filter(FILTER_B)
    g0, g1 = klab.guests
    engine.create_bindings([
        parse_binding(_binding(g0.portdev, g0.mac, "explain-a", g0.ip)),
        parse_binding(_binding(g1.portdev, g1.mac, "explain-b", g1.ip)),
    ])
    ports = {p: Explainer(engine.ruleset(p)) for p in (g0.portdev, g1.portdev)}
    rng = random.Random(20240614)
    frames: list[Frame] = []
    expected: set[str] = set()
    kinds: set[tuple[str, bool]] = set()
    verdicts: set[str] = set()
    described: dict[str, str] = {}
    for inbound in (False, True):
        sender, receiver = (g1, g0) if inbound else (g0, g1)
        specs = _frames(rng, 1 if inbound else 0, COUNT, 30000 if inbound else 10000)
        for n, spec in enumerate(specs):
            data = build_frame(spec)
            label = f"{'in' if inbound else 'out'}-{n}"
            frames.append(Frame(label, inbound, data))
            out = ports[sender.portdev].explain(Hook.FROM_VM, data)
            into = ports[receiver.portdev].explain(Hook.TO_VM, data)
            verdicts.update((out.verdict, into.verdict))
            described[label] = f"{label} {out.packet} flags {spec.tcp_flags}"
            kinds.add((spec.proto, out.verdict == "ACCEPT" and into.verdict == "ACCEPT"))
            if out.verdict == "ACCEPT" and into.verdict == "ACCEPT":
                expected.add(label)
    # The draw reaches every verdict, and every protocol both ways.
    assert verdicts == {"ACCEPT", "DROP", "REJECT"}
    assert {p for p, delivered in kinds if delivered} >= {"tcp", "udp", "icmp", "arp"}
    assert {p for p, delivered in kinds if not delivered} >= {
        "tcp", "udp", "icmp", "arp", "rarp", "tcp6", "udp6", "icmpv6", "ether:0x88b5"} - {
        "tcp6", "udp6"}
    arrived: set[str] = set()
    for start in range(0, len(frames), CHUNK):
        arrived |= replay(klab, frames[start:start + CHUNK])
    missing = sorted(expected - arrived)
    extra = sorted(arrived - expected)
    assert not missing and not extra, (
        f"of {len(frames)} frames, explained as accepted but not delivered: "
        f"{[described[x] for x in missing[:8]]}; delivered but explained as refused: "
        f"{[described[x] for x in extra[:8]]}")
