"""The `ns` hypervisor: a guest is a network namespace joined by veth pairs.

A domain `web` becomes the namespace `nwvm-web` (or `<netns>.vm.web` when the
host side lives in namespace `<netns>`, so labs in different namespaces never
clash).  Each interface `i` is a veth pair: the guest end `eth<i>` inside the
guest namespace, carrying the interface's MAC and `<ip>` addresses (on-link
only, no gateway), and the host end named by the driver (`<target dev>` or a
generated `vnetN`) enslaved to `<source bridge>` in the host namespace.

Fail closed: `prepare` leaves every host end *down*, so the guest has no
carrier until the driver has installed the filters and calls `launch`.
Suspending sets the guest ends down (no carrier, nothing sent or received)
and resuming sets them up again; addresses and their on-link routes survive.

A bridge that does not exist is created and marked with an interface alias
(kept by the kernel, so it survives a restart of the engine); `stop` deletes
a bridge it created once no port is left on it, never one it did not create.
Guests are started and stopped concurrently, so "make sure the bridge exists,
then enslave the ports" and "find the bridge empty, then delete it" each run
under one lock.
The host ports of each guest are recorded in the run directory because the
driver may have generated their names and `stop` must find them again.

Links, addresses, bridges and their ports are made, read and deleted
through netlink in process (`nwfilter.domain.links`, one socket in the
host namespace and one in the guest's for a batch of changes); only the
guest namespace itself is made and removed with `ip netns`
(`nwfilter.netns.Iproute2`), which also mounts its name.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from nwfilter.conf.model import DomainDef, InterfaceDef
from nwfilter.conf.values import check_port_name
from nwfilter.domain.hypervisor import Hypervisor, HypervisorEnv, PortPlan
from nwfilter.domain.links import Links, host_mac
from nwfilter.errors import (
    ConflictError,
    NwfilterError,
    StateError,
    StorageError,
    ValidationError,
)
from nwfilter.fileio import DirHandle
from nwfilter.netns import (
    NETNS_DIR,
    NETNS_NAME_MAX,
    Iproute2,
    Runner,
    check_ifname,
    check_netns_name,
)

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "nwvm-"
# The kernel keeps an interface alias across restarts of the engine, which
# makes it the record of "this bridge is ours to delete".
BRIDGE_ALIAS = "nwfilter-ns-bridge"

# Dots are left out of domain names so that `<netns>.vm.<name>` is unambiguous.
_DOMAIN_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*\Z")
_MAC_RE = re.compile(r"[0-9a-f]{2}(:[0-9a-f]{2}){5}\Z")
_OPER_UP_WAIT = 3.0


@dataclass(frozen=True)
class GuestPort:
    """One veth pair of a guest, as recorded in the run directory."""

    portdev: str  # host end
    guest_if: str  # guest end, eth<index>
    bridge: str | None

    def to_json(self) -> dict[str, str | None]:
        return {"portdev": self.portdev, "guest_if": self.guest_if, "bridge": self.bridge}

    @classmethod
    def from_json(cls, data: object) -> GuestPort:
        if not isinstance(data, dict):
            raise StorageError("malformed ns guest record: port is not an object")
        portdev, guest_if, bridge = data.get("portdev"), data.get("guest_if"), data.get("bridge")
        if not isinstance(portdev, str) or not isinstance(guest_if, str):
            raise StorageError("malformed ns guest record: port without names")
        if bridge is not None and not isinstance(bridge, str):
            raise StorageError("malformed ns guest record: bad bridge")
        return cls(check_ifname(portdev), check_ifname(guest_if),
                   None if bridge is None else check_ifname(bridge))


class NsHypervisor:
    """Guests as network namespaces; see the module docstring for the layout."""

    name = "ns"

    def __init__(
        self,
        run_dir: Path,
        host_netns: str | None = None,
        *,
        runner: Runner | None = None,
        netns_dir: Path = NETNS_DIR,
        links: Callable[[str | None], Links] = Links,
    ) -> None:
        if host_netns is not None:
            check_netns_name(host_netns)
        self.run_dir = run_dir
        self._dir = DirHandle(run_dir, "ns hypervisor directory")
        self.host_netns = host_netns
        self.prefix = DEFAULT_PREFIX if host_netns is None else f"{host_netns}.vm."
        self._iproute = Iproute2(runner)  # `ip netns` only
        self._links = links
        self._netns_dir = netns_dir
        # A leaf: only netlink calls run under it.  Held from checking that
        # a bridge exists to enslaving the ports, and from finding a bridge
        # empty to deleting it, so a stop never deletes the bridge a start
        # has just found, and two starts never both try to create it.
        self._bridge_lock = threading.Lock()

    # -- names -----------------------------------------------------------
    def netns_of(self, name: str) -> str:
        """The guest namespace of domain `name`; raise if the name cannot be one."""
        if not _DOMAIN_NAME_RE.match(name):
            raise ValidationError(
                f"domain name '{name}' cannot name an ns guest "
                "(letters, digits, '_' and '-' only, starting with a letter or digit)"
            )
        full = self.prefix + name
        if len(full) > NETNS_NAME_MAX:
            raise ValidationError(
                f"domain name '{name}' is too long for an ns guest "
                f"(at most {NETNS_NAME_MAX - len(self.prefix)} characters here)"
            )
        return full

    def find_running(self) -> tuple[str, ...]:
        """Names of the guests whose namespaces exist, sorted (after a restart)."""
        try:
            entries = sorted(p.name for p in self._netns_dir.iterdir())
        except FileNotFoundError:
            return ()
        found = []
        for entry in entries:
            if entry.startswith(self.prefix):
                rest = entry[len(self.prefix):]
                if _DOMAIN_NAME_RE.match(rest):
                    found.append(rest)
        return tuple(found)

    # -- the Hypervisor protocol ------------------------------------------
    def prepare(self, dom: DomainDef, ports: Sequence[PortPlan]) -> None:
        """Create the namespace and the veth pairs, host ends down.

        Preparing a guest that is already prepared with the same ports is a
        no-op; anything half-made is removed again if a step fails.
        """
        netns = self.netns_of(dom.name)
        plan = self._plan(dom, ports)
        if self._netns_exists(netns):
            recorded = self._load_ports(dom.name)
            if recorded is not None and [p.portdev for p in recorded] == [
                p.portdev for p, _ in plan
            ]:
                return
            raise ConflictError(f"network namespace '{netns}' already exists")
        with self._links(self.host_netns) as host:
            for guest, _ in plan:
                if host.index(guest.portdev) is not None:
                    raise ConflictError(
                        f"domain '{dom.name}': device '{guest.portdev}' already exists in "
                        f"{self.host_netns or 'the host namespace'}"
                    )
        # Recorded before anything is made, so that stop() after a crash
        # half-way still knows which host ports to remove.
        self._save_ports(dom.name, [p for p, _ in plan])
        try:
            self._prepare(netns, plan)
        except BaseException:
            try:
                self._stop(dom.name)
            except NwfilterError as exc:
                log.error("ns guest '%s': undoing a failed prepare failed: %s", dom.name, exc)
            raise

    def launch(self, dom: DomainDef) -> None:
        """Bring the host ends up: the filters are in place, traffic may flow.

        Returns once both ends of every pair are operationally up, so the
        guest's first frame is not lost.
        """
        netns = self._alive_or_fail(dom)
        ports = self._ports_or_fail(dom)
        with self._links(self.host_netns) as host:
            for port in ports:
                host.set_up(port.portdev)
        self._wait_running(netns, ports)

    def stop(self, dom: DomainDef) -> None:
        """Remove the guest, its ports and any bridge it left empty; idempotent."""
        self._stop(dom.name)

    def suspend(self, dom: DomainDef) -> None:
        netns = self._alive_or_fail(dom)
        ports = self._ports_or_fail(dom)
        with self._links(netns) as inner:
            for port in ports:
                inner.set_up(port.guest_if, up=False)

    def resume(self, dom: DomainDef) -> None:
        netns = self._alive_or_fail(dom)
        ports = self._ports_or_fail(dom)
        with self._links(netns) as inner:
            for port in ports:
                inner.set_up(port.guest_if)
        self._wait_running(netns, ports)

    def is_alive(self, dom: DomainDef) -> bool:
        return self._netns_exists(self.netns_of(dom.name))

    def is_suspended(self, dom: DomainDef) -> bool:
        """Whether every guest end is administratively down."""
        netns = self._alive_or_fail(dom)
        ports = self._ports_or_fail(dom)
        if not ports:
            return False
        with self._links(netns) as inner:
            states = [inner.state(p.guest_if) for p in ports]
        return all(state is None or not state.up for state in states)

    # -- internals -------------------------------------------------------
    def _plan(
        self, dom: DomainDef, ports: Sequence[PortPlan]
    ) -> list[tuple[GuestPort, tuple[PortPlan, InterfaceDef]]]:
        plan: list[tuple[GuestPort, tuple[PortPlan, InterfaceDef]]] = []
        seen: set[str] = set()
        for port in sorted(ports, key=lambda p: p.index):
            if not 0 <= port.index < len(dom.interfaces):
                raise ValidationError(
                    f"domain '{dom.name}': port {port.portdev} names interface "
                    f"{port.index}, which does not exist"
                )
            check_port_name(port.portdev, f"domain '{dom.name}': port")
            if port.portdev in seen:
                raise ValidationError(f"domain '{dom.name}': port {port.portdev} given twice")
            seen.add(port.portdev)
            if port.bridge is not None:
                check_ifname(port.bridge)
            if not _MAC_RE.match(port.mac.lower()):
                raise ValidationError(f"domain '{dom.name}': invalid MAC '{port.mac}'")
            iface = dom.interfaces[port.index]
            guest = GuestPort(port.portdev, f"eth{port.index}", port.bridge)
            plan.append((guest, (port, iface)))
        return plan

    def _prepare(
        self, netns: str, plan: list[tuple[GuestPort, tuple[PortPlan, InterfaceDef]]]
    ) -> None:
        self._iproute.ip(None, "netns", "add", netns)
        with self._links(self.host_netns) as host, self._links(netns) as inner:
            inner.set_up("lo")
            for guest, (port, iface) in plan:
                mac = port.mac.lower()
                # A new link starts down; the host end stays down until launch().
                host.add_veth(guest.portdev, guest.guest_if, netns, mac=host_mac(mac),
                              peer_mac=mac)
                for ip in iface.ips:
                    six = ip.family == "ipv6" or ":" in ip.address
                    prefix = ip.prefix if ip.prefix is not None else (64 if six else 24)
                    inner.add_address(guest.guest_if, f"{ip.address}/{prefix}")
                inner.set_up(guest.guest_if)
            bridges = sorted({g.bridge for g, _ in plan if g.bridge is not None})
            if not bridges:
                return
            with self._bridge_lock:
                for bridge in bridges:
                    self._ensure_bridge(host, bridge)
                for guest, _ in plan:
                    if guest.bridge is not None:
                        host.set_master(guest.portdev, guest.bridge)

    def _wait_running(self, netns: str, ports: Sequence[GuestPort]) -> None:
        # The kernel activates a device's queue only when its link watcher
        # has seen the carrier, which it may defer for up to a second; until
        # then every frame is dropped.  Waiting here is only about that
        # first second: a slow start is logged, never an error.
        with self._links(self.host_netns) as host, self._links(netns) as inner:
            pending = [(host, p.portdev) for p in ports] + [(inner, p.guest_if) for p in ports]
            deadline = time.monotonic() + _OPER_UP_WAIT
            while pending:
                pending = [(where, dev) for where, dev in pending if not _oper_up(where, dev)]
                if not pending:
                    return
                if time.monotonic() > deadline:
                    log.warning("links not up after %.0f s: %s", _OPER_UP_WAIT,
                                ", ".join(dev for _, dev in pending))
                    return
                time.sleep(0.02)

    def _ensure_bridge(self, host: Links, bridge: str) -> None:
        """Create `bridge` unless it exists (`_bridge_lock` held)."""
        if host.index(bridge) is not None:
            return
        host.add_bridge(bridge, alias=BRIDGE_ALIAS)
        log.info("created bridge %s for ns guests", bridge)

    def _stop(self, name: str) -> None:
        """Best effort: every step runs even if an earlier one failed, the
        guest namespace is always deleted, and the first error is raised at
        the end.  The record is kept while something it names may be left,
        so that stopping again finishes the job."""
        netns = self.netns_of(name)
        errors: list[NwfilterError] = []
        keep_record = False
        try:
            ports = self._load_ports(name) or []
        except NwfilterError as exc:
            # Unreadable, so the host ends are unknown; they die with the
            # namespace once it is deleted below.
            errors.append(exc)
            ports = []
        with contextlib.ExitStack() as stack:
            host: Links | None = None
            try:
                host = stack.enter_context(self._links(self.host_netns))
            except NwfilterError as exc:  # the host namespace cannot be opened
                errors.append(exc)
                keep_record = True
            # A veth pair dies with its namespace, but only once nothing holds
            # the namespace any more; deleting the host end is immediate.
            if host is not None and not self._delete_host_ends(host, ports, errors):
                keep_record = True
            try:
                if self._netns_exists(netns):
                    self._iproute.delete_netns(netns)
            except NwfilterError as exc:
                errors.append(exc)
                keep_record = True
            bridges = sorted({p.bridge for p in ports if p.bridge is not None})
            if bridges and host is not None:
                with self._bridge_lock:
                    for bridge in bridges:
                        try:
                            self._remove_bridge_if_ours_and_empty(host, bridge)
                        except NwfilterError as exc:
                            errors.append(exc)
                            keep_record = True
        if not keep_record:
            try:
                self._dir.get().remove(self._record(name))
            except NwfilterError as exc:
                errors.append(exc)
        if errors:
            for later in errors[1:]:
                log.error("stopping ns guest '%s': %s", name, later)
            raise errors[0]

    @staticmethod
    def _delete_host_ends(host: Links, ports: Sequence[GuestPort],
                          errors: list[NwfilterError]) -> bool:
        """Delete the host end of each veth pair; False if one could not be."""
        done = True
        for port in ports:
            try:
                state = host.state(port.portdev)
                if state is not None and state.kind == "veth":
                    host.delete(port.portdev)
            except NwfilterError as exc:
                errors.append(exc)
                done = False
        return done

    def _remove_bridge_if_ours_and_empty(self, host: Links, bridge: str) -> None:
        """Delete `bridge` if we made it and no port is left (`_bridge_lock` held)."""
        state = host.state(bridge)
        if state is None or state.alias != BRIDGE_ALIAS:
            return
        if host.ports_of(bridge):
            return
        host.delete(bridge)
        log.info("removed bridge %s, no ns guest uses it any more", bridge)

    def _alive_or_fail(self, dom: DomainDef) -> str:
        netns = self.netns_of(dom.name)
        if not self._netns_exists(netns):
            raise StateError(f"ns guest '{dom.name}' is not running")
        return netns

    def _ports_or_fail(self, dom: DomainDef) -> list[GuestPort]:
        ports = self._load_ports(dom.name)
        if ports is None:
            raise StateError(f"ns guest '{dom.name}' is not prepared")
        return ports

    def _record(self, name: str) -> str:
        self.netns_of(name)  # the name rule of a guest, safe as a file name
        return f"{name}.ports.json"

    def _save_ports(self, name: str, ports: list[GuestPort]) -> None:
        data = {"netns": self.netns_of(name), "ports": [p.to_json() for p in ports]}
        self._dir.get().write(
            self._record(name), json.dumps(data, indent=1, sort_keys=True) + "\n"
        )

    def _load_ports(self, name: str) -> list[GuestPort] | None:
        path = self.run_dir / self._record(name)
        directory = self._dir.existing()
        raw = directory.read_if_exists(self._record(name)) if directory is not None else None
        if raw is None:
            return None
        try:
            data = json.loads(raw)
        except ValueError as exc:
            raise StorageError(f"cannot read '{path}': {exc}") from exc
        if not isinstance(data, dict) or not isinstance(data.get("ports"), list):
            raise StorageError(f"malformed ns guest record '{path}'")
        return [GuestPort.from_json(p) for p in data["ports"]]

    def _netns_exists(self, netns: str) -> bool:
        return (self._netns_dir / netns).exists()


def _oper_up(links: Links, ifname: str) -> bool:
    state = links.state(ifname)
    return state is not None and state.oper_up


def make_hypervisor(env: HypervisorEnv) -> NsHypervisor:
    """The factory `nwfilter.domain.hypervisor.load_hypervisor` calls."""
    return NsHypervisor(env.run_dir, env.netns)


if TYPE_CHECKING:
    # Lets mypy prove the class fulfils the driver's contract.
    _CONTRACT: type[Hypervisor] = NsHypervisor
