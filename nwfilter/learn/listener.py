"""The learning listener: one loop follows the DHCP (and, in 'any' mode,
ARP and IPv4) traffic of every learning port.

Each learning port gets an AF_PACKET socket bound to it, in the root's
namespace, with a kernel BPF filter (`nwfilter.learn.bpf`), watched by the
domain core's event loop (`nwfilter.domain.eventloop`): no thread per port
or per packet.  What a frame means is decided by `PortLearner`, a pure
state machine per port:

* dhcp (and any): a DHCPACK that travels *to* the guest (the socket sees it
  leave the port), for the guest's MAC, from a trusted server (DHCPSERVER,
  the network's own dnsmasq for a network interface, any server when none
  is named) makes IP the leased address until the lease ends; a renewal
  keeps it; a DHCPRELEASE or DHCPDECLINE from the guest, a DHCPNAK or the
  end of the lease withdraws it and the port goes back to the learning
  rules.
* any: also the first ARP (non-zero sender address) or IPv4 packet the
  guest sends with its own MAC, as libvirt does; such an address has no
  lease.
* IPv6 (libvirt never learnt it): addresses of DHCPv6 replies to the guest
  (with their valid lifetime) and, in 'any' mode, targets of neighbour
  advertisements from the guest's MAC become IPV6, at most
  `MAX_IPV6_PER_PORT` per port.

Hostile or broken traffic never counts: a DHCP reply from an untrusted
server, a reply that comes from the guest's side, a request whose MAC is
not the guest's, a frame that does not parse are dropped and counted
(`counters`).  The engine tells the listener when bindings come and go (a binding
observer that only wakes the loop); the listener also looks every second.
Changes found in one round of the loop are applied together
(`Engine.set_learnt_many`: one kernel transaction) at the end of it.
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import os
import socket
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nwfilter.domain.eventloop import EVENT_READABLE, EventLoop
from nwfilter.errors import NwfilterError
from nwfilter.learn import bpf
from nwfilter.learn.packets import (
    ACK,
    BOOTREPLY,
    BOOTREQUEST,
    DECLINE,
    NAK,
    RELEASE,
    Arp,
    Dhcp,
    Dhcp6Reply,
    Ipv4,
    Malformed,
    NeighbourAdvert,
    Seen,
    parse_frame,
)
from nwfilter.learn.policy import LEARNT_VAR, LEARNT_VAR6, learning_mode, learns, trusted_servers
from nwfilter.learn.store import LearntAddress
from nwfilter.netns import in_netns

if TYPE_CHECKING:
    from nwfilter.conf.model import BindingDef
    from nwfilter.engine import Engine

log = logging.getLogger(__name__)

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4
MAX_IPV6_PER_PORT = 4
_BURST = 64  # frames read per port per round, so one port cannot starve the others
_EXPIRY_TICK = 0.25
_SYNC_TICK = 1.0
_INFINITE = 0xFFFFFFFF

Change = tuple[str, tuple[LearntAddress, ...]]  # (variable, its addresses; () withdraws)


@dataclass
class PortLearner:
    """What one port has learnt, and the decision for each frame (pure)."""

    portdev: str
    mac: str
    mode: str  # 'any' or 'dhcp'
    trusted: tuple[ipaddress.IPv4Address, ...]
    ip: LearntAddress | None = None
    ipv6: tuple[LearntAddress, ...] = ()
    counters: Counter[str] = field(default_factory=Counter)

    def wants_everything(self) -> bool:
        """Whether the BPF filter must pass ARP and all IPv4 too."""
        return self.mode == "any" and self.ip is None

    def handle(self, seen: Seen, outgoing: bool, now: float) -> list[Change]:
        if isinstance(seen, Dhcp):
            return self._dhcp(seen, outgoing, now)
        if isinstance(seen, Dhcp6Reply):
            return self._dhcp6(seen, outgoing, now)
        if outgoing or seen.eth_src != self.mac:
            return []  # not sent by this guest
        if isinstance(seen, NeighbourAdvert):
            if self.mode != "any":
                return []
            return self._add6(LearntAddress(str(seen.target), "ndp", now))
        if not self.wants_everything():
            return []
        if isinstance(seen, Arp):
            if seen.sha != self.mac or seen.spa.is_unspecified:
                return []
            return self._learn(LearntAddress(str(seen.spa), "arp", now))
        if isinstance(seen, Ipv4):
            src = seen.src
            if src.is_unspecified or src.is_multicast or src == ipaddress.IPv4Address(
                    "255.255.255.255"):
                return []
            return self._learn(LearntAddress(str(src), "ip", now))
        return []

    def _trusted(self, msg: Dhcp) -> bool:
        if not self.trusted:
            return True
        server = msg.server_id if msg.server_id is not None else msg.ip_src
        return server in self.trusted and msg.ip_src in self.trusted

    def _dhcp(self, msg: Dhcp, outgoing: bool, now: float) -> list[Change]:
        if msg.op == BOOTREPLY:
            if not outgoing:
                self.counters["forged"] += 1  # a server reply sent by the guest
                return []
            if msg.chaddr != self.mac:
                return []
            if not self._trusted(msg):
                self.counters["untrusted"] += 1
                return []
            if msg.msg_type == ACK and not msg.yiaddr.is_unspecified:
                lease = msg.lease
                expires = None if lease is None or lease == _INFINITE else now + lease
                server = msg.server_id if msg.server_id is not None else msg.ip_src
                got = LearntAddress(str(msg.yiaddr), "dhcp", now, expires, str(server))
                if self.ip is not None and self.ip.address == got.address:
                    got = LearntAddress(got.address, "dhcp", self.ip.learnt_at, expires,
                                        got.server)
                return self._learn(got)
            if msg.msg_type == NAK and self.ip is not None:
                return self._withdraw("nak")
            return []
        if outgoing:
            return []  # another client's request, seen on its way to the guest
        if msg.eth_src != self.mac or msg.chaddr != self.mac:
            self.counters["forged"] += 1
            return []
        if msg.msg_type in (RELEASE, DECLINE) and self.ip is not None:
            gone = msg.ciaddr if msg.msg_type == RELEASE else None
            if gone is None or str(gone) == self.ip.address:
                return self._withdraw("release" if msg.msg_type == RELEASE else "decline")
        return []

    def _dhcp6(self, msg: Dhcp6Reply, outgoing: bool, now: float) -> list[Change]:
        if not outgoing:
            self.counters["forged"] += 1
            return []
        changes: list[Change] = []
        for addr, lifetime in msg.addresses:
            expires = None if lifetime == _INFINITE else now + lifetime
            changes = self._add6(LearntAddress(str(addr), "dhcpv6", now, expires,
                                               str(msg.ip_src))) or changes
        return changes

    def _learn(self, got: LearntAddress) -> list[Change]:
        if self.ip == got:
            return []
        self.counters["learnt"] += 1
        self.ip = got
        return [(LEARNT_VAR, (got,))]

    def _withdraw(self, why: str) -> list[Change]:
        self.counters[f"withdrawn-{why}"] += 1
        self.ip = None
        return [(LEARNT_VAR, ())]

    def _add6(self, got: LearntAddress) -> list[Change]:
        kept = [a for a in self.ipv6 if a.address != got.address]
        if len(kept) == len(self.ipv6) and len(kept) >= MAX_IPV6_PER_PORT:
            self.counters["ipv6-limit"] += 1
            return []
        old = {a.address: a for a in self.ipv6}.get(got.address)
        if old is not None and old.expires == got.expires:
            return []
        self.ipv6 = (*kept, got)
        return [(LEARNT_VAR6, self.ipv6)]

    def expire(self, now: float) -> list[Change]:
        changes: list[Change] = []
        if self.ip is not None and self.ip.expired(now):
            changes += self._withdraw("expiry")
        kept = tuple(a for a in self.ipv6 if not a.expired(now))
        if kept != self.ipv6:
            self.ipv6 = kept
            changes.append((LEARNT_VAR6, kept))
        return changes


@dataclass
class _Port:
    learner: PortLearner
    key: tuple[str, str, str]  # portdev, mac, owner uuid: a new binding starts afresh
    sock: socket.socket | None = None
    watch: int | None = None
    filter_everything: bool | None = None


class Listener:
    """Follows every learning port of an engine on one event loop."""

    def __init__(self, engine: Engine, loop: EventLoop, netns: str | None, *,
                 clock: Callable[[], float] = time.time) -> None:
        self.engine = engine
        self.loop = loop
        self.netns = netns
        self.clock = clock
        self.counters: Counter[str] = Counter()  # over all ports
        self.cpu_ns = 0  # CPU time spent on frames, on the loop thread
        self._ports: dict[str, _Port] = {}
        self._pending: dict[tuple[str, str], tuple[LearntAddress, ...]] = {}
        self._wake_r = self._wake_w = -1
        self._watches: list[int] = []
        self._timers: list[int] = []
        self._flush_timer: int | None = None
        self.applied = 0  # transactions made
        self.on_applied: Callable[[list[str]], None] | None = None  # tests, benchmarks

    # -- life cycle ---------------------------------------------------------

    def start(self) -> None:
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._watches.append(self.loop.add_handle(self._wake_r, EVENT_READABLE, self._on_wake))
        self._timers.append(self.loop.add_timeout(_EXPIRY_TICK, self._on_expiry))
        self._timers.append(self.loop.add_timeout(_SYNC_TICK, lambda _t, _o: self._sync()))
        self._flush_timer = self.loop.add_timeout(-1, lambda _t, _o: self._flush())
        self.engine.add_binding_observer(self.wake)
        self.wake()

    def wake(self) -> None:
        """Ask the loop to look at the bindings again (never blocks)."""
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")

    def stop(self) -> None:
        """Close every socket; learnt addresses stay with the engine."""
        self.engine.remove_binding_observer(self.wake)
        for watch in self._watches:
            with contextlib.suppress(NwfilterError):
                self.loop.remove_handle(watch)
        for timer in [*self._timers, self._flush_timer]:
            if timer is not None:
                with contextlib.suppress(NwfilterError):
                    self.loop.remove_timeout(timer)
        for port in list(self._ports.values()):
            self._close(port)
        self._ports.clear()
        for fd in (self._wake_r, self._wake_w):
            if fd >= 0:
                os.close(fd)
        self._wake_r = self._wake_w = -1

    # -- ports --------------------------------------------------------------

    def ports(self) -> dict[str, PortLearner]:
        return {name: p.learner for name, p in self._ports.items()}

    def _on_wake(self, _watch: int, fd: int, _events: int, _opaque: object) -> None:
        with contextlib.suppress(BlockingIOError):
            while os.read(fd, 4096):
                pass
        self._sync()

    def _sync(self) -> None:
        """Follow the learning ports the engine has bound, and only them."""
        wanted: dict[str, BindingDef] = {}
        for binding in self.engine.list_bindings():
            try:
                if learns(binding):
                    wanted[binding.portdev] = binding
            except NwfilterError as exc:
                log.warning("%s", exc)
        for name in [n for n in self._ports if n not in wanted]:
            self._close(self._ports.pop(name))
        for name, binding in sorted(wanted.items()):
            key = (name, binding.mac, str(binding.owner_uuid))
            port = self._ports.get(name)
            if port is not None and port.key != key:
                self._close(self._ports.pop(name))
                port = None
            if port is None:
                port = _Port(self._learner(binding), key)
                self._ports[name] = port
            if port.sock is None:
                self._open(port)

    def _learner(self, binding: BindingDef) -> PortLearner:
        learner = PortLearner(binding.portdev, binding.mac.lower(), learning_mode(binding),
                              trusted_servers(binding))
        known = self.engine.learnt_details(binding.portdev)
        ip = known.get(LEARNT_VAR, ())
        learner.ip = ip[0] if ip else None
        learner.ipv6 = tuple(known.get(LEARNT_VAR6, ()))
        return learner

    def _open(self, port: _Port) -> None:
        name = port.learner.portdev
        try:
            with in_netns(self.netns):
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                try:
                    self._set_filter(sock, port)
                    sock.bind((name, ETH_P_ALL))
                except BaseException:
                    sock.close()
                    raise
        except (OSError, NwfilterError) as exc:
            log.debug("port '%s' cannot be followed yet: %s", name, exc)
            return
        sock.setblocking(False)
        # What queued before the filter was attached is read and judged too.
        port.sock = sock
        port.watch = self.loop.add_handle(sock.fileno(), EVENT_READABLE, self._on_frames, port)
        log.info("learning the address of port '%s' (%s)", name, port.learner.mode)

    def _set_filter(self, sock: socket.socket, port: _Port) -> None:
        everything = port.learner.wants_everything()
        if port.filter_everything == everything:
            return
        bpf.attach(sock, bpf.program(any_ipv4=everything, arp=everything,
                                     ipv6=True))
        port.filter_everything = everything

    def _close(self, port: _Port) -> None:
        if port.watch is not None:
            with contextlib.suppress(NwfilterError):
                self.loop.remove_handle(port.watch)
            port.watch = None
        if port.sock is not None:
            port.sock.close()
            port.sock = None

    # -- frames -------------------------------------------------------------

    def _on_frames(self, _watch: int, _fd: int, _events: int, opaque: object) -> None:
        port = opaque
        assert isinstance(port, _Port)
        sock = port.sock
        if sock is None:
            return
        began = time.thread_time_ns()
        for _ in range(_BURST):
            try:
                frame, addr = sock.recvfrom(2048)
            except BlockingIOError:
                break
            except OSError as exc:
                # The port went away under the socket: open it again later.
                log.debug("port '%s': %s", port.learner.portdev, exc)
                self._close(port)
                break
            self.counters["frames"] += 1
            outgoing = len(addr) > 2 and addr[2] == PACKET_OUTGOING
            try:
                seen = parse_frame(frame)
            except (Malformed, ValueError):
                port.learner.counters["malformed"] += 1
                self.counters["malformed"] += 1
                continue
            if seen is None:
                continue
            before = Counter(port.learner.counters)
            changes = port.learner.handle(seen, outgoing, self.clock())
            for key, value in (port.learner.counters - before).items():
                self.counters[key] += value
            self._queue(port, changes)
        self.cpu_ns += time.thread_time_ns() - began

    def _queue(self, port: _Port, changes: list[Change]) -> None:
        if not changes:
            return
        for var, addrs in changes:
            self._pending[(port.learner.portdev, var)] = addrs
        if port.sock is not None:
            try:
                self._set_filter(port.sock, port)
            except OSError as exc:
                log.warning("port '%s': filter not changed: %s", port.learner.portdev, exc)
        if self._flush_timer is not None:
            # Fires after the fd callbacks of this round: one transaction for all.
            self.loop.update_timeout(self._flush_timer, 0)

    def _on_expiry(self, _timer: int, _opaque: object) -> None:
        now = self.clock()
        for port in self._ports.values():
            self._queue(port, port.learner.expire(now))

    def _flush(self) -> None:
        if self._flush_timer is not None:
            self.loop.update_timeout(self._flush_timer, -1)
        pending, self._pending = self._pending, {}
        if not pending:
            return
        items = [(port, var, addrs) for (port, var), addrs in sorted(pending.items())]
        try:
            ports = self.engine.set_learnt_many(items)
        except NwfilterError as exc:
            log.error("learnt addresses could not be applied: %s", exc)
            self.counters["apply-failed"] += 1
            for port_name in {p for p, _v, _a in items}:
                found = self._ports.get(port_name)
                if found is not None:  # back to what the engine holds
                    found.learner = self._learner_for(port_name, found)
            return
        self.applied += 1
        for port_name, var, addrs in items:
            what = ", ".join(a.address for a in addrs) or "none (learning again)"
            log.info("port '%s': %s is %s", port_name, var, what)
        if self.on_applied is not None:
            self.on_applied(ports)

    def _learner_for(self, name: str, port: _Port) -> PortLearner:
        old = port.learner
        learner = PortLearner(old.portdev, old.mac, old.mode, old.trusted,
                              counters=old.counters)
        known = self.engine.learnt_details(name)
        ip = known.get(LEARNT_VAR, ())
        learner.ip = ip[0] if ip else None
        learner.ipv6 = tuple(known.get(LEARNT_VAR6, ()))
        return learner


__all__ = ["BOOTREQUEST", "Listener", "PortLearner"]
