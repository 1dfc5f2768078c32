"""The self-contained demo behind `nwfilter sandbox`.

It builds a private lab of network namespaces (a host namespace holding a
bridge and the firewall, and three `ns` guests: alice, bob and mallory,
whose interfaces use `clean-traffic`), starts the guests through the domain
driver in a private state root, shows the rules in force, sends legitimate
and forged frames from inside the guests and compares what arrived with
what `clean-traffic` promises, edits a filter while the guests run, shows
the rules and the traffic change without a restart, puts the filter back,
and removes everything it made.

Frames are built here byte by byte, then sent and captured on raw
`AF_PACKET` sockets inside the guests' namespaces (`nwfilter.frames`).  A
probe counts as *passed* when the receiving guest saw the frame, recognised
by a random token carried in its payload (or, for ARP, in the frame's
padding).

Every namespace is named with one unique prefix (`nwsb-<hex>`), so nothing
outside the lab is touched and teardown is "delete what carries my prefix";
it runs on any exit, including Ctrl-C and SIGTERM.
"""

from __future__ import annotations

import atexit
import contextlib
import difflib
import ipaddress
import logging
import os
import re
import secrets
import shutil
import signal
import socket
import struct
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Protocol, TextIO

from nwfilter.errors import NwfilterError
from nwfilter.frames import FrameCapture, send_frames
from nwfilter.netlab import UDHCPC_SCRIPT, NetLab
from nwfilter.netns import NETNS_DIR

log = logging.getLogger(__name__)

SANDBOX_PREFIX = "nwsb-"
BRIDGE = "br0"
SUBNET = "10.88.0"
FORGED_MAC = "52:54:00:66:66:66"
FORGED_IP = f"{SUBNET}.66"

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_IPV6 = 0x86DD
BROADCAST = "ff:ff:ff:ff:ff:ff"
# How long a receiver keeps listening after the last probe of a round: the
# frames cross two veths and a bridge, which takes microseconds; this is
# only slack for a loaded machine.
SETTLE_SECONDS = 0.5

# The live edit: incoming ICMP is dropped before the stock accept rule.
EDITED_FILTER = "allow-incoming-ipv4"
EDITED_XML = """<filter name='allow-incoming-ipv4' chain='ipv4'>
  <uuid>{uuid}</uuid>
  <rule action='drop' direction='in' priority='400'>
    <ip protocol='icmp'/>
  </rule>
  <rule action='accept' direction='in'/>
</filter>
"""


# --------------------------------------------------------------------------
# frames


def mac_bytes(mac: str) -> bytes:
    return bytes.fromhex(mac.replace(":", ""))


def inet_checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ethernet(dst: str, src: str, ethertype: int, payload: bytes) -> bytes:
    frame = mac_bytes(dst) + mac_bytes(src) + struct.pack("!H", ethertype) + payload
    # Short frames are padded to the Ethernet minimum as a NIC would.
    return frame.ljust(60, b"\0")


def arp_frame(
    *,
    eth_src: str,
    eth_dst: str,
    op: int,
    sender_mac: str,
    sender_ip: str,
    target_mac: str,
    target_ip: str,
    token: bytes,
) -> bytes:
    """An ARP packet; `token` rides in the padding after the 28 ARP bytes."""
    arp = struct.pack("!HHBBH", 1, ETH_P_IP, 6, 4, op)
    arp += mac_bytes(sender_mac) + ipaddress.IPv4Address(sender_ip).packed
    arp += mac_bytes(target_mac) + ipaddress.IPv4Address(target_ip).packed
    return ethernet(eth_dst, eth_src, ETH_P_ARP, arp + token)


def icmp_echo_frame(
    *, eth_src: str, eth_dst: str, ip_src: str, ip_dst: str, token: bytes
) -> bytes:
    """An IPv4 ICMP echo request whose payload is `token`."""
    icmp = struct.pack("!BBHHH", 8, 0, 0, 0x4E57, 1) + token
    icmp = icmp[:2] + struct.pack("!H", inet_checksum(icmp)) + icmp[4:]
    header = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 0, 0x4000, 64, socket.IPPROTO_ICMP, 0,
        ipaddress.IPv4Address(ip_src).packed, ipaddress.IPv4Address(ip_dst).packed,
    )
    header = header[:10] + struct.pack("!H", inet_checksum(header)) + header[12:]
    return ethernet(eth_dst, eth_src, ETH_P_IP, header + icmp)


def ipv6_frame(*, eth_src: str, eth_dst: str, ip_src: str, ip_dst: str, token: bytes) -> bytes:
    """An IPv6 packet with no next header (59) carrying `token`."""
    header = struct.pack("!IHBB", 6 << 28, len(token), 59, 64)
    header += ipaddress.IPv6Address(ip_src).packed + ipaddress.IPv6Address(ip_dst).packed
    return ethernet(eth_dst, eth_src, ETH_P_IPV6, header + token)


def tokens_seen(capture: FrameCapture, tokens: Sequence[bytes], seconds: float) -> set[bytes]:
    """The `tokens` found in frames arriving at `capture` within `seconds`."""
    seen: set[bytes] = set()
    if not tokens:
        return seen
    for frame in capture.incoming(seconds):
        seen.update(t for t in tokens if t in frame)
        if len(seen) == len(tokens):
            break
    return seen


# --------------------------------------------------------------------------
# the lab


@dataclass(frozen=True)
class Guest:
    name: str
    mac: str
    ip: str
    portdev: str

    @property
    def ipv6(self) -> str:
        return f"fe80::{self.mac[-2:]}"

    def domain_xml(self) -> str:
        return (
            f"<domain type='ns'>\n"
            f"  <name>{self.name}</name>\n"
            f"  <uuid>{uuid.uuid5(uuid.NAMESPACE_URL, 'nwfilter-sandbox:' + self.name)}</uuid>\n"
            f"  <devices>\n"
            f"    <interface type='bridge'>\n"
            f"      <mac address='{self.mac}'/>\n"
            f"      <source bridge='{BRIDGE}'/>\n"
            f"      <target dev='{self.portdev}'/>\n"
            f"      <ip address='{self.ip}' prefix='24'/>\n"
            f"      <filterref filter='clean-traffic'>\n"
            f"        <parameter name='IP' value='{self.ip}'/>\n"
            f"      </filterref>\n"
            f"    </interface>\n"
            f"  </devices>\n"
            f"</domain>\n"
        )


GUESTS = (
    Guest("alice", "52:54:00:5b:00:0a", f"{SUBNET}.10", "vnet-alice"),
    Guest("bob", "52:54:00:5b:00:0b", f"{SUBNET}.11", "vnet-bob"),
    Guest("mallory", "52:54:00:5b:00:0c", f"{SUBNET}.12", "vnet-mallory"),
)


@dataclass(frozen=True)
class Probe:
    """One thing a guest tries; `passes` is what clean-traffic promises."""

    label: str
    sender: Guest
    receiver: Guest
    passes: bool
    frame: Callable[[bytes], bytes] | None = None  # None: a real `ping`
    token: bytes = field(default_factory=lambda: secrets.token_bytes(16))


@dataclass(frozen=True)
class Outcome:
    probe: Probe
    passed: bool

    @property
    def ok(self) -> bool:
        return self.passed == self.probe.passes


NETWORK = "default"
NETWORK_GATEWAY = "192.168.122.1"  # the stock default network's bridge address
NETWORK_SPOOF = "192.168.122.250"
NET_GUEST = ("carol", "52:54:00:5b:00:0d")


@dataclass(frozen=True)
class NetworkGuest:
    """A guest on a managed network: its namespace and host port."""

    name: str
    netns: str
    portdev: str


def probes(icmp_blocked: bool = False) -> list[Probe]:
    """The traffic of one round; with `icmp_blocked` ICMP to guests is dropped."""
    alice, bob, mallory = GUESTS
    icmp = not icmp_blocked
    return [
        Probe("ping (ICMP echo and reply, real ping)", alice, bob, icmp),
        Probe("ARP request, own addresses", alice, bob, True, lambda t: arp_frame(
            eth_src=alice.mac, eth_dst=BROADCAST, op=1, sender_mac=alice.mac,
            sender_ip=alice.ip, target_mac="00:00:00:00:00:00", target_ip=bob.ip, token=t)),
        Probe("ICMP echo, own MAC and IP", mallory, bob, icmp, lambda t: icmp_echo_frame(
            eth_src=mallory.mac, eth_dst=bob.mac, ip_src=mallory.ip, ip_dst=bob.ip, token=t)),
        Probe("ICMP echo, forged source MAC", mallory, bob, False, lambda t: icmp_echo_frame(
            eth_src=FORGED_MAC, eth_dst=bob.mac, ip_src=mallory.ip, ip_dst=bob.ip, token=t)),
        Probe("ICMP echo, forged source IP (alice's)", mallory, bob, False,
              lambda t: icmp_echo_frame(eth_src=mallory.mac, eth_dst=bob.mac,
                                        ip_src=alice.ip, ip_dst=bob.ip, token=t)),
        Probe("ICMP echo, made-up source IP", mallory, bob, False, lambda t: icmp_echo_frame(
            eth_src=mallory.mac, eth_dst=bob.mac, ip_src=FORGED_IP, ip_dst=bob.ip, token=t)),
        Probe("ARP reply claiming alice's IP", mallory, bob, False, lambda t: arp_frame(
            eth_src=mallory.mac, eth_dst=bob.mac, op=2, sender_mac=mallory.mac,
            sender_ip=alice.ip, target_mac=bob.mac, target_ip=bob.ip, token=t)),
        Probe("ARP with forged sender MAC", mallory, bob, False, lambda t: arp_frame(
            eth_src=mallory.mac, eth_dst=BROADCAST, op=1, sender_mac=FORGED_MAC,
            sender_ip=mallory.ip, target_mac="00:00:00:00:00:00", target_ip=bob.ip, token=t)),
        Probe("IPv6 (clean-traffic allows IPv4 and ARP only)", mallory, bob, False,
              lambda t: ipv6_frame(eth_src=mallory.mac, eth_dst=bob.mac,
                                   ip_src=mallory.ipv6, ip_dst=bob.ipv6, token=t)),
    ]


class Lab:
    """The namespaces of one sandbox run; `close()` removes every one of them."""

    def __init__(self) -> None:
        self.prefix = SANDBOX_PREFIX + secrets.token_hex(3)
        self.netlab = NetLab(self.prefix)
        self.host = ""

    def build_host(self) -> str:
        self.host = self.netlab.add_ns("host")
        self.netlab.add_bridge(self.host, BRIDGE)
        # Without br_netfilter the keys are missing; the nft backend's probe reports that.
        self.netlab.enable_bridge_netfilter(self.host, check=False)
        return self.host

    def guest_netns(self) -> list[str]:
        """Namespaces of this lab other than the host (the guests)."""
        try:
            names = sorted(p.name for p in NETNS_DIR.iterdir())
        except FileNotFoundError:
            return []
        return [n for n in names if n.startswith(self.prefix) and n != self.host]

    def leftovers(self) -> list[str]:
        try:
            return sorted(p.name for p in NETNS_DIR.iterdir() if p.name.startswith(self.prefix))
        except FileNotFoundError:
            return []

    def nft_ruleset(self) -> str:
        proc = self.netlab.run(self.host, ["nft", "list", "ruleset"], check=False)
        return proc.stdout if proc.returncode == 0 else ""

    def keep(self) -> None:
        """Leave the namespaces in place past the end of the process."""
        atexit.unregister(self.netlab.close)

    def close(self) -> None:
        # Guests still present (a failed stop) go first, by our prefix only.
        for name in self.guest_netns():
            self.netlab.remove_ns(name)
        self.netlab.close()


def run_round(lab: Lab, guest_ns: Callable[[Guest], str], round_probes: Sequence[Probe]
              ) -> list[Outcome]:
    """Send every probe and report which arrived."""
    raw = [p for p in round_probes if p.frame is not None]
    receivers = {p.receiver.name: p.receiver for p in raw}
    listening: dict[str, FrameCapture] = {}
    try:
        for name, guest in receivers.items():
            listening[name] = FrameCapture(guest_ns(guest), "eth0")
        for probe in raw:
            assert probe.frame is not None
            send_frames(guest_ns(probe.sender), "eth0", [probe.frame(probe.token)])
        seen: set[bytes] = set()
        for name, capture in listening.items():
            tokens = [p.token for p in raw if p.receiver.name == name]
            seen |= tokens_seen(capture, tokens, SETTLE_SECONDS)
    finally:
        for capture in listening.values():
            capture.close()
    outcomes = []
    for probe in round_probes:
        if probe.frame is None:
            passed = lab.netlab.ping(guest_ns(probe.sender), probe.receiver.ip)
        else:
            passed = probe.token in seen
        outcomes.append(Outcome(probe, passed))
    return outcomes


def format_table(outcomes: Sequence[Outcome]) -> str:
    rows = [("from", "to", "traffic", "expected", "observed", "result")]
    for o in outcomes:
        rows.append((
            o.probe.sender.name, o.probe.receiver.name, o.probe.label,
            "pass" if o.probe.passes else "drop",
            "pass" if o.passed else "drop",
            "ok" if o.ok else "MISMATCH",
        ))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
             for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def excerpt(ruleset: str, port: str, limit: int = 40) -> str:
    """The part of an `nft list ruleset` listing that filters `port`.

    The dispatch entries naming the port, then its chains, the ones that
    show the anti-spoofing checks first; rule comments are cut to keep it
    short.
    """
    chains: dict[str, list[str]] = {}
    dispatch: list[str] = []
    current: list[str] | None = None
    for line in ruleset.splitlines():
        match = _CHAIN_RE.match(line)
        if match is not None:
            current = chains.setdefault(match.group(1), []) if match.group(1).startswith(
                f"{port}/") else None
        elif line.strip() == "}":
            current = None
        elif current is not None:
            current.append("        " + _COMMENT_RE.sub("", line.strip()))
        elif f'"{port}"' in line:
            entry = line.strip().removeprefix("elements = {").strip().rstrip(",}").strip()
            dispatch.append(entry.replace('"', ""))
    order = ("from/root", "from/mac", "from/ipv4-ip", "from/arp-mac", "from/arp-ip",
             "to/root", "to/ipv4")
    picked = ["    dispatch by interface name: " + "; ".join(dispatch)]
    names = [f"{port}/{o}" for o in order if f"{port}/{o}" in chains]
    names += sorted(n for n in chains if n not in names)
    for name in names:
        picked.append(f"    chain {name}")
        picked.extend(chains[name])
    if not chains:
        return "    (no chains for this port in the kernel's ruleset)"
    more = len(picked) - limit
    return "\n".join(picked[:limit] + ([f"    ... ({more} more lines)"] if more > 0 else []))


def clip(text: str, limit: int) -> str:
    lines = text.rstrip("\n").splitlines()
    shown = ["    " + line for line in lines[:limit]]
    if len(lines) > limit:
        shown.append(f"    ... ({len(lines) - limit} more lines)")
    return "\n".join(shown)


def _chains(ruleset: str) -> dict[str, list[str]]:
    """The rule lines of every chain of an `nft list ruleset` text, by
    '<family> <table> <chain>'."""
    chains: dict[str, list[str]] = {}
    table = ""
    current: list[str] | None = None
    for line in ruleset.splitlines():
        stripped = line.strip()
        if stripped.startswith("table "):
            table = stripped.removeprefix("table ").removesuffix(" {")
            current = None
        elif (match := _CHAIN_RE.match(line)) is not None:
            current = chains.setdefault(f"{table} {match.group(1)}", [])
        elif stripped == "}":
            current = None
        elif current is not None and stripped:
            current.append(stripped)
    return chains


def ruleset_diff(before: str, after: str, limit: int = 30) -> str:
    """The rules removed and added, once per chain, under the chain's name
    (which names the port)."""
    old, new = _chains(before), _chains(after)
    out: list[str] = []
    for name in sorted(set(old) | set(new)):
        changed = [
            line for line in difflib.unified_diff(old.get(name, []), new.get(name, []),
                                                  lineterm="", n=0)
            if line[:1] in "+-" and not line.startswith(("+++", "---"))
        ]
        if changed:
            out.append(f"chain {name}:")
            out.extend("  " + line for line in changed)
    if not out:
        return "    (no change)"
    more = len(out) - limit
    shown = ["    " + line for line in out[:limit]]
    if more > 0:
        shown.append(f"    ... ({more} more lines)")
    return "\n".join(shown)


_CHAIN_RE = re.compile(r"^\s*chain (\S+) \{")
_COMMENT_RE = re.compile(r'\s*comment "[^"]*"$')


# --------------------------------------------------------------------------
# running it


@dataclass(frozen=True)
class SandboxOptions:
    backend: str = "nft"
    keep: bool = False
    root: Path | None = None  # None: a temporary state root


class _Terminated(BaseException):
    """SIGTERM/SIGHUP arrived: unwind like Ctrl-C so every cleanup runs."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


_UNWIND_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_SHIELD_SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


@contextlib.contextmanager
def _signal_handlers(
    signals: Sequence[signal.Signals], handler: Callable[[int, FrameType | None], None]
) -> Iterator[None]:
    # Python delivers signals to the main thread only; elsewhere (a caller
    # running the demo in a worker thread) the defaults stay.
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.signal(s, handler) for s in signals}
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _unwind(signum: int, frame: FrameType | None) -> None:
    raise _Terminated(signum)


@dataclass
class _Session:
    """What one run made, so that teardown removes exactly that."""

    lab: Lab
    tmp_root: Path | None = None
    platform: Platform | None = None


def run_sandbox(options: SandboxOptions, out: TextIO) -> int:
    """Run the whole demo; 0 when every probe did what the filters promise.

    Teardown runs on every exit and cannot itself be interrupted by Ctrl-C,
    SIGTERM or SIGHUP (they are noted and ignored while it runs).
    """
    if os.geteuid() != 0:
        raise NwfilterError("the sandbox needs root to create network namespaces")
    session = _Session(Lab())
    try:
        with _signal_handlers(_UNWIND_SIGNALS, _unwind):
            root = options.root
            if root is None:
                session.tmp_root = Path(tempfile.mkdtemp(prefix="nwfilter-sandbox-"))
                root = session.tmp_root
            _step(out, 1, "lab")
            host = session.lab.build_host()
            _say(out, f"namespaces {session.lab.prefix}-*: host {host} with bridge {BRIDGE}; "
                      f"state root {root}")
            session.platform = open_platform(root, options.backend, host)
            return _demo_steps(session.lab, session.platform, out)
    except _Terminated as exc:
        _say(out, f"\nsandbox: {exc}, cleaning up")
        return 128 + exc.signum
    finally:
        def note(signum: int, frame: FrameType | None) -> None:
            _say(out, f"sandbox: {signal.Signals(signum).name} ignored while cleaning up")

        with _signal_handlers(_SHIELD_SIGNALS, note):
            _teardown(session, options, out)


def _teardown(session: _Session, options: SandboxOptions, out: TextIO) -> None:
    platform = session.platform
    try:
        if platform is not None:
            try:
                if not options.keep:
                    platform.stop_guests()
            finally:
                platform.close()
    finally:
        if options.keep:
            _print_kept(session.lab, session.tmp_root, out)
        else:
            session.lab.close()
            if session.tmp_root is not None:
                shutil.rmtree(session.tmp_root, ignore_errors=True)
            left = session.lab.leftovers()
            if left:
                _say(out, f"sandbox: could not remove {', '.join(left)}")


def _print_kept(lab: Lab, tmp_root: Path | None, out: TextIO) -> None:
    lab.keep()
    print("\nkept (--keep): namespaces " + ", ".join(lab.leftovers()), file=out)
    if tmp_root is not None:
        print(f"state root: {tmp_root}", file=out)
    print(f"remove with: ip netns list | grep -o '^{lab.prefix}[^ ]*' | xargs -rn1 ip netns del",
          file=out)
    if tmp_root is not None:
        print(f"             rm -r {tmp_root}", file=out)


class Platform(Protocol):
    """What the demo needs from the engine and the domain driver."""

    def filter_uuid(self, name: str) -> str: ...

    def edit_filter(self, name: str, xml: str) -> str:
        """Redefine filter `name`, remembering the definition it replaces;
        return what changed, for people."""
        ...

    def restore_filters(self) -> None:
        """Put back every filter `edit_filter` replaced (a no-op if none)."""
        ...

    def start_guest(self, guest: Guest) -> str:
        """Define and start the guest; return its network namespace."""
        ...

    def start_network_guest(self, name: str, mac: str) -> NetworkGuest:
        """Start network NETWORK (as libvirt ships `default`) and a guest
        on it with clean-traffic, no IP and DHCP learning; return where it
        runs."""
        ...

    def learnt(self, portdev: str) -> tuple[str, ...]:
        """The IPv4 addresses learnt for a port (none yet: ())."""
        ...

    def stop_guests(self) -> None: ...

    def rules_text(self, portdev: str) -> str: ...

    def explain(self, portdev: str, frame: bytes) -> tuple[str, str, str]:
        """(verdict, the rule that decided, its origin in the XML) of a
        frame the guest on `portdev` sends."""
        ...

    def stats(self, portdev: str) -> tuple[int, int]:
        """(accepted, dropped) packets the guest on `portdev` sent, from the
        kernel's rule counters."""
        ...

    def audit(self) -> tuple[int, dict[str, int], list[str]]:
        """(ports audited, findings per severity, the findings' lines)."""
        ...

    def close(self) -> None: ...


def _say(out: TextIO, text: str = "") -> None:
    print(text, file=out, flush=True)


def _step(out: TextIO, number: int, title: str) -> None:
    _say(out, f"\n== {number}. {title}")


def _demo_steps(lab: Lab, platform: Platform, out: TextIO) -> int:
    _step(out, 2, "guests")
    _say(out, "each guest is a namespace joined to the bridge by a veth pair; its domain XML:")
    _say(out, "\n".join("    " + line for line in GUESTS[0].domain_xml().splitlines()))
    netns: dict[str, str] = {}
    for guest in GUESTS:
        netns[guest.name] = platform.start_guest(guest)
        _say(out, f"started {guest.name:8} {guest.ip:11} {guest.mac}  port {guest.portdev:13}"
                  f"  namespace {netns[guest.name]}")
    inodes = {name: os.stat(NETNS_DIR / ns).st_ino for name, ns in netns.items()}

    def guest_ns(guest: Guest) -> str:
        return netns[guest.name]

    port = GUESTS[0].portdev
    _step(out, 3, f"rules in force for {port}")
    _say(out, "as the engine compiled them (filter language resolved, IP and MAC filled in):")
    _say(out, clip(platform.rules_text(port), 10))
    before = lab.nft_ruleset()
    _say(out, f"as the kernel holds them ('nft list ruleset' in {lab.host}, excerpt):")
    _say(out, excerpt(before, port, 24))

    _step(out, 4, "traffic with clean-traffic")
    results = run_round(lab, guest_ns, probes())
    _say(out, format_table(results))

    _step(out, 5, f"live edit: {EDITED_FILTER} now drops ICMP towards the guests")
    # A redefinition keeps the filter's UUID, as in libvirt.
    edited_xml = EDITED_XML.format(uuid=platform.filter_uuid(EDITED_FILTER))
    _say(out, "\n".join("    " + line for line in edited_xml.splitlines()))
    started = time.monotonic()
    report = platform.edit_filter(EDITED_FILTER, edited_xml)
    took = time.monotonic() - started
    after = lab.nft_ruleset()
    _say(out, f"defined in {took * 1000:.0f} ms, one kernel transaction; the engine reports:")
    _say(out, clip(report, 16))
    _say(out, "the kernel's ruleset in the host namespace changed by (per port chain):")
    _say(out, ruleset_diff(before, after))
    same = all(os.stat(NETNS_DIR / ns).st_ino == inodes[name] for name, ns in netns.items())
    _say(out, "guests kept running (same namespaces, no restart)" if same
         else "guests were restarted (unexpected)")
    edited = run_round(lab, guest_ns, probes(icmp_blocked=True))
    _say(out, format_table(edited))

    _step(out, 6, f"undo: {EDITED_FILTER} back to its stock definition")
    platform.restore_filters()
    restored = run_round(lab, guest_ns, probes())
    _say(out, format_table(restored))

    everything = [*results, *edited, *restored]
    proof_ok = _proof_step(platform, out)
    learnt_ok = _network_step(lab, platform, out)
    bad = [o for o in everything if not o.ok]
    _step(out, 9, "result")
    if bad or not same or not learnt_ok or not proof_ok:
        _say(out, f"{len(bad)} of {len(everything)} probes did not behave as the filters say"
             + ("" if learnt_ok else "; the network guest did not behave as its filter says")
             + ("" if proof_ok else "; the explainer or the counters disagreed (see step 7)"))
        return 1
    _say(out, f"all {len(everything)} probes behaved as the filters say, the explainer and "
              "the counters agreed, and the network guest was filtered by the address it "
              "leased")
    return 0


def _proof_step(platform: Platform, out: TextIO) -> bool:
    """The explainer's verdicts on two of mallory's frames, the kernel's
    counters of what mallory sent, and an audit of every port."""
    alice, bob, mallory = GUESTS
    _step(out, 7, "proof: the packet explainer, the rule counters, the audit")
    ok = True
    for label, src_ip, want in (("own MAC and IP", mallory.ip, "ACCEPT"),
                                ("forged source IP (alice's)", alice.ip, "DROP")):
        frame = icmp_echo_frame(eth_src=mallory.mac, eth_dst=bob.mac, ip_src=src_ip,
                                ip_dst=bob.ip, token=b"explain")
        verdict, decided, origin = platform.explain(mallory.portdev, frame)
        ok = ok and verdict == want
        _say(out, f"  nwfilter explain --port {mallory.portdev} --direction out, ICMP echo, "
                  f"{label}:")
        _say(out, f"    verdict: {verdict}, decided by {decided}"
                  + (f" [{origin}]" if origin else "")
                  + ("" if verdict == want else f" (unexpected: {want} was due)"))
    accepted, dropped = platform.stats(mallory.portdev)
    # Three rounds of mallory's forged frames were dropped above.
    ok = ok and dropped > 0 and accepted > 0
    _say(out, f"  nwfilter stats {mallory.portdev}: from the guest {accepted} packets "
              f"accepted, {dropped} dropped (the kernel's counters of its rules)")
    ports, summary, lines = platform.audit()
    shown = ", ".join(f"{n} {s}" for s, n in summary.items() if n) or "no findings"
    _say(out, f"  nwfilter audit: {ports} ports, {shown}")
    for line in lines[:4]:
        _say(out, f"    {line if len(line) <= 110 else line[:107] + '...'}")
    if len(lines) > 4:
        _say(out, f"    ... {len(lines) - 4} more")
    return ok


def _network_step(lab: Lab, platform: Platform, out: TextIO) -> bool:
    name, mac = NET_GUEST
    _step(out, 8, f"a guest on the '{NETWORK}' network, no IP: filtered by the address it leases")
    _say(out, f"    <interface type='network'><source network='{NETWORK}'/>"
              "<filterref filter='clean-traffic'>")
    _say(out, "      <parameter name='CTRL_IP_LEARNING' value='dhcp'/></filterref></interface>")
    _say(out, "  (no IP: the engine learns it from a lease of the network's own dnsmasq)")
    guest = platform.start_network_guest(name, mac)
    so_far = ", ".join(platform.learnt(guest.portdev)) or "nothing"
    _say(out, f"network '{NETWORK}' started (bridge, NAT, its own dnsmasq); {name} started on "
              f"port {guest.portdev}; learnt so far: {so_far}")
    # Before a lease only DHCP passes: a ping from an address the guest
    # makes up itself is dropped.
    lab.netlab.run(guest.netns, ["ip", "addr", "add", f"{NETWORK_SPOOF}/24", "dev", "eth0"])
    early = lab.netlab.ping(guest.netns, NETWORK_GATEWAY, count=2)
    lab.netlab.run(guest.netns, ["ip", "addr", "flush", "dev", "eth0"])
    _say(out, f"  before a lease, ping {NETWORK_GATEWAY} from a made-up address "
              f"{NETWORK_SPOOF}: {'answered (unexpected)' if early else 'dropped, as expected'}")
    script = Path(tempfile.mkdtemp(prefix="nwfilter-sandbox-dhcp-")) / "udhcpc.sh"
    try:
        script.write_text(UDHCPC_SCRIPT)
        script.chmod(0o700)
        lab.netlab.run(guest.netns, ["busybox", "udhcpc", "-i", "eth0", "-n", "-q", "-f",
                                     "-t", "5", "-T", "1", "-A", "1", "-s", str(script)],
                       timeout=30, check=False)
    finally:
        shutil.rmtree(script.parent, ignore_errors=True)
    deadline = time.monotonic() + 5
    while not platform.learnt(guest.portdev) and time.monotonic() < deadline:
        time.sleep(0.05)
    learnt = platform.learnt(guest.portdev)
    _say(out, f"  {name} ran a DHCP client; the engine learnt: {', '.join(learnt) or 'nothing'}")
    leased = bool(learnt) and lab.netlab.ping(guest.netns, NETWORK_GATEWAY, count=2)
    _say(out, f"  ping {NETWORK_GATEWAY} from the leased address: "
              f"{'answered, as expected' if leased else 'dropped (unexpected)'}")
    lab.netlab.run(guest.netns, ["ip", "addr", "add", f"{NETWORK_SPOOF}/24", "dev", "eth0"])
    spoofed = lab.netlab.run(
        guest.netns, ["ping", "-n", "-q", "-c", "2", "-W", "1", "-I", NETWORK_SPOOF,
                      NETWORK_GATEWAY], timeout=15, check=False).returncode == 0
    _say(out, f"  ping {NETWORK_GATEWAY} from a made-up address {NETWORK_SPOOF}: "
              f"{'answered (unexpected)' if spoofed else 'dropped, as expected'}")
    return not early and leased and not spoofed


class DriverPlatform:
    """The engine, domains and networks of a state root on a host
    namespace: nwfilterd's own pieces, in process (its IP learning too)."""

    def __init__(self, root: Path, backend: str, host_netns: str) -> None:
        from nwfilter.daemon import serve

        self.server = serve(root, backend, host_netns, None)
        self.engine = self.server.engine
        self.manager = self.server.domains
        self._defined: list[str] = []
        self._running: list[str] = []
        self._networks: list[str] = []
        self._originals: dict[str, str] = {}

    def edit_filter(self, name: str, xml: str) -> str:
        from nwfilter.conf import format_filter

        original = format_filter(self.engine.pool.lookup(name))
        outcome = self.engine.define_filter(xml, source="sandbox")
        self._originals.setdefault(name, original)
        return outcome.describe()

    def restore_filters(self) -> None:
        while self._originals:
            name, xml = self._originals.popitem()
            self.engine.define_filter(xml, source=f"stock {name}")

    def filter_uuid(self, name: str) -> str:
        return str(self.engine.pool.lookup(name).uuid)

    def _netns_of(self, name: str) -> str:
        from nwfilter.domain.nsvm import NsHypervisor

        hypervisor = self.manager.driver("ns").hypervisor
        if not isinstance(hypervisor, NsHypervisor):
            raise NwfilterError("domains of type 'ns' are not run by the ns hypervisor")
        return hypervisor.netns_of(name)

    def start_guest(self, guest: Guest) -> str:
        self.manager.define_xml(guest.domain_xml())
        self._defined.append(guest.name)
        self.manager.run("start", guest.name)
        self._running.append(guest.name)
        return self._netns_of(guest.name)

    def start_network_guest(self, name: str, mac: str) -> NetworkGuest:
        self.server.networks.start(NETWORK)
        self._networks.append(NETWORK)
        self.manager.define_xml(
            f"<domain type='ns'><name>{name}</name><devices><interface type='network'>"
            f"<source network='{NETWORK}'/><mac address='{mac}'/>"
            "<filterref filter='clean-traffic'>"
            "<parameter name='CTRL_IP_LEARNING' value='dhcp'/></filterref>"
            "</interface></devices></domain>"
        )
        self._defined.append(name)
        self.manager.run("start", name)
        self._running.append(name)
        (row,) = self.manager.interfaces(name)
        return NetworkGuest(name, self._netns_of(name), row.interface)

    def learnt(self, portdev: str) -> tuple[str, ...]:
        return self.engine.learnt(portdev).get("IP", ())

    def stop_guests(self) -> None:
        """Destroy and undefine what was started and defined here, then
        destroy the networks started here (best effort)."""
        while self._running:
            name = self._running.pop()
            try:
                self.manager.run("destroy", name)
            except NwfilterError as exc:
                log.error("destroying sandbox guest '%s' failed: %s", name, exc)
        while self._defined:
            name = self._defined.pop()
            try:
                self.manager.run("undefine", name)
            except NwfilterError as exc:
                log.error("undefining sandbox guest '%s' failed: %s", name, exc)
        while self._networks:
            name = self._networks.pop()
            try:
                self.server.networks.destroy(name)
            except NwfilterError as exc:
                log.error("destroying sandbox network '%s' failed: %s", name, exc)

    def rules_text(self, portdev: str) -> str:
        from nwfilter.render_text import render_text

        return render_text(self.engine.ruleset(portdev))

    def explain(self, portdev: str, frame: bytes) -> tuple[str, str, str]:
        from nwfilter.audit.explain import Explainer, semantics_of
        from nwfilter.ir import Hook

        walk = Explainer(self.engine.ruleset(portdev),
                         backend=semantics_of(self.engine.backend.name))
        result = walk.explain(Hook.FROM_VM, frame, trace=False)
        return result.verdict, result.decided_by, result.origin

    def stats(self, portdev: str) -> tuple[int, int]:
        from nwfilter.audit.stats import port_stats

        totals = port_stats(self.engine, [portdev])["ports"][portdev]["totals"]["out"]
        return totals["accepted"]["packets"], totals["dropped"]["packets"]

    def audit(self) -> tuple[int, dict[str, int], list[str]]:
        result = self.server.context.auditor().run(self.engine, self.manager)
        lines = [f"{f['severity']:6} {f['kind']} {f.get('port') or f.get('filter') or ''}: "
                 f"{f['message']}" for f in result["findings"]]
        return result["ports"], result["summary"], lines

    def close(self) -> None:
        from nwfilter.daemon import close

        try:
            # A state root named with --root must not keep the demo's edit.
            self.restore_filters()
        except NwfilterError as exc:
            log.error("putting back the edited filters failed: %s", exc)
        finally:
            close(self.server)


def open_platform(root: Path, backend: str, host_netns: str) -> Platform:
    return DriverPlatform(root, backend, host_netns)
