"""The networks of one state root: definitions, start and destroy, autostart.

Files (every one through `nwfilter.fileio`):

* `ROOT/networks/<name>.xml` — persistent definitions;
* `ROOT/networks/autostart/<name>` — autostart marks;
* `ROOT/run/networks/<name>.json` — the status of an active network (its
  live definition and what starting it made), so that a later process
  finds it, supervises its dnsmasq and can destroy it;
* `ROOT/run/networks/<name>.{conf,hostsfile,pid,leases}` — its dnsmasq.

The stock network `default` (libvirt's) is written once, when the
networks directory is first made; it is not marked autostart.

Starting a network changes its bridge, its nft table and its dnsmasq, and
for a NAT network the namespace's net.ipv4.ip_forward (set to 1 only if it
was 0, and put back when the last NAT network this root started stops);
nothing else.  Destroying removes what the start made: a bridge of a
bridge-mode network existed before and stays.

Locking: one mutex of this manager guards its tables and is held across a
start or destroy (ip, nft and dnsmasq run under it).  Nothing of the
documented lock order is taken under it, so a domain start may ask which
bridge a network has while it holds its domain lock.
"""

from __future__ import annotations

import contextlib
import json
import logging
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from nwfilter.backends.base import Owner
from nwfilter.errors import (
    ConflictError,
    NotFoundError,
    NwfilterError,
    StateError,
    StorageError,
    ValidationError,
)
from nwfilter.events import EventBus, EventKind
from nwfilter.fileio import DirHandle, SafeDir
from nwfilter.netns import Iproute2, in_netns
from nwfilter.network.dnsmasq import Dnsmasq, Popen, _popen
from nwfilter.network.model import (
    DEFAULT_NETWORK,
    STARTABLE_MODES,
    NetworkDef,
    format_network,
    parse_network,
)
from nwfilter.network.nat import NatTables

log = logging.getLogger(__name__)

_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+:-]{0,199}\Z")
#: the interface alias of a bridge a network made (the kernel keeps it)
BRIDGE_ALIAS = "nwfilter-network"
_FORWARD_SYSCTL = Path("/proc/sys/net/ipv4/ip_forward")


def validate_network_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValidationError(
            f"invalid network name {name!r}: use 1-200 letters, digits and '_.+:-', "
            "not starting with '.' or '-'"
        )
    return name


@dataclass(frozen=True)
class NetworkInfo:
    name: str
    uuid: str
    active: bool
    persistent: bool
    autostart: bool
    bridge: str | None
    forward: str | None
    dnsmasq_pid: int | None


@dataclass(frozen=True)
class Attachment:
    """What an interface of a network attaches to."""

    bridge: str
    dhcp_servers: tuple[str, ...]  # the addresses of the network's own DHCP server


@dataclass
class _Active:
    net: NetworkDef
    made_bridge: bool
    set_forwarding: bool


class NetworkManager:
    """The networks of one state root."""

    def __init__(
        self,
        root: Path,
        netns: str | None,
        owner: Callable[[], Owner | None],
        *,
        events: EventBus | None = None,
        iproute: Iproute2 | None = None,
        nat: NatTables | None = None,
        popen: Popen = _popen,
    ) -> None:
        self.root = Path(root)
        self.netns = netns
        self._owner = owner
        self.events = events if events is not None else EventBus()
        self._ip = iproute if iproute is not None else Iproute2()
        self._nat = nat if nat is not None else NatTables(netns)
        self._popen = popen
        self.configs = DirHandle(self.root / "networks", "network directory")
        self.marks = DirHandle(self.root / "networks" / "autostart", "network autostart directory")
        self.run = DirHandle(self.root / "run" / "networks", "network status directory")
        self._lock = threading.RLock()
        self._defs: dict[str, NetworkDef] = {}
        self._active: dict[str, _Active] = {}
        self._loaded = False
        self._query_only = True

    # -- loading ------------------------------------------------------------------

    def load(self, *, write: bool = True) -> list[str]:
        """Read definitions and status; install the stock network the first
        time.  Returns warnings (files that could not be read)."""
        warnings: list[str] = []
        with self._lock:
            self._query_only = not write
            if write and self.configs.existing() is None:
                directory = self.configs.get()
                directory.write("default.xml", format_network(parse_network(DEFAULT_NETWORK)))
            configs = self.configs.existing()
            self._defs.clear()
            self._active.clear()
            if configs is not None:
                for file in configs.names(".xml"):
                    try:
                        net = parse_network(configs.read(file), source=str(configs.path / file))
                        if f"{net.name}.xml" != file:
                            raise ValidationError(f"holds network '{net.name}'")
                        self._defs[net.name] = net
                    except NwfilterError as exc:
                        warnings.append(f"skipping network definition '{file}': {exc.message}")
            run = self.run.existing()
            if run is not None:
                for file in run.names(".json"):
                    try:
                        self._active_from(run.read(file), file)
                    except (NwfilterError, ValueError, KeyError, TypeError) as exc:
                        warnings.append(f"skipping network status '{file}': {exc}")
            self._loaded = True
        for text in warnings:
            log.warning("%s", text)
        return warnings

    def _active_from(self, raw: bytes, file: str) -> None:
        data = json.loads(raw)
        net = parse_network(str(data["xml"]))
        if f"{net.name}.json" != file:
            raise StorageError(f"holds network '{net.name}'")
        self._active[net.name] = _Active(net, bool(data.get("made_bridge")),
                                         bool(data.get("set_forwarding")))

    def autostart(self) -> list[str]:
        """Start every network marked autostart that is not active; errors
        are logged and returned."""
        errors = []
        for name in self._marked():
            if name in self._active or name not in self._defs:
                continue
            try:
                self.start(name)
            except NwfilterError as exc:
                errors.append(f"autostart of network '{name}' failed: {exc.message}")
                log.error("%s", errors[-1])
        return errors

    def _marked(self) -> list[str]:
        marks = self.marks.existing()
        return sorted(marks.names()) if marks is not None else []

    def _writable(self) -> None:
        if self._query_only:
            raise StateError("the networks were loaded for queries only; they cannot be changed")

    # -- definitions -----------------------------------------------------------------

    def define(self, xml: str, *, source: str = "<request>") -> NetworkDef:
        net = parse_network(xml, source=source)
        validate_network_name(net.name)
        with self._lock:
            self._writable()
            have = self._defs.get(net.name) or self._active_def(net.name)
            if have is not None and have.uuid != net.uuid:
                if "<uuid>" in xml:
                    raise ConflictError(
                        f"network '{net.name}' already exists with uuid {have.uuid}")
                net = _with(net, uuid=have.uuid)
            for other in self._all_defs():
                if other.name != net.name and other.uuid == net.uuid:
                    raise ConflictError(
                        f"network uuid {net.uuid} is already used by network '{other.name}'")
            if net.bridge is None:
                net = _with(net, bridge=self._free_bridge(net.name, have))
            for other in self._all_defs():
                if other.name != net.name and other.bridge == net.bridge:
                    raise ConflictError(
                        f"network '{net.name}': bridge '{net.bridge}' is used by network "
                        f"'{other.name}'")
            self.configs.get().write(f"{net.name}.xml", format_network(net))
            self._defs[net.name] = net
        self.events.publish(EventKind.LIFECYCLE, "network", net.name,
                            {"event": "defined", "detail": "added" if have is None else "updated"})
        return net

    def _active_def(self, name: str) -> NetworkDef | None:
        active = self._active.get(name)
        return active.net if active is not None else None

    def _all_defs(self) -> list[NetworkDef]:
        out = dict(self._defs)
        for name, active in self._active.items():
            out.setdefault(name, active.net)
        return list(out.values())

    def _free_bridge(self, name: str, have: NetworkDef | None) -> str:
        if have is not None and have.bridge is not None:
            return have.bridge
        used = {n.bridge for n in self._all_defs()}
        number = 0
        while f"virbr{number}" in used:
            number += 1
        return f"virbr{number}"

    def undefine(self, name: str) -> None:
        with self._lock:
            self._writable()
            self._def_or_fail(name)
            self.configs.get().remove(f"{validate_network_name(name)}.xml")
            marks = self.marks.existing()
            if marks is not None:
                marks.remove(name)
            del self._defs[name]
        self.events.publish(EventKind.LIFECYCLE, "network", name,
                            {"event": "undefined", "detail": "removed"})

    def _def_or_fail(self, name: str) -> NetworkDef:
        validate_network_name(name)
        found = self._defs.get(name) or self._active_def(name)
        if found is None:
            raise NotFoundError(f"network not found: no network with matching name '{name}'")
        return found

    def set_autostart(self, name: str, enable: bool) -> None:
        with self._lock:
            self._writable()
            if name not in self._defs:
                self._def_or_fail(name)
                raise StateError(f"cannot set autostart for transient network '{name}'")
            if enable:
                self.marks.get().write(name, name + "\n")
            else:
                marks = self.marks.existing()
                if marks is not None:
                    marks.remove(name)

    # -- queries -------------------------------------------------------------------

    def info(self, name: str) -> NetworkInfo:
        with self._lock:
            net = self._def_or_fail(name)
            active = self._active.get(name)
            if active is not None:
                net = active.net
            pid = self._dnsmasq(net).pid() if active is not None and net.dhcp else None
            return NetworkInfo(net.name, str(net.uuid), active is not None,
                               name in self._defs, name in self._marked(), net.bridge,
                               net.forward, pid)

    def list_networks(self) -> list[NetworkInfo]:
        with self._lock:
            names = sorted({*self._defs, *self._active})
        return [self.info(n) for n in names]

    def dumpxml(self, name: str, *, inactive: bool = False) -> str:
        with self._lock:
            net = self._def_or_fail(name)
            active = self._active.get(name)
            if active is not None and not (inactive and name in self._defs):
                net = active.net
            return format_network(net)

    def attachment(self, name: str) -> Attachment:
        """The bridge an interface of network `name` joins, and the address
        of its DHCP server; StateError if the network is not active."""
        with self._lock:
            self._def_or_fail(name)
            active = self._active.get(name)
            if active is None:
                raise StateError(f"network '{name}' is not active (start it with "
                                 f"'nwfilter net-start {name}')")
            net = active.net
            assert net.bridge is not None
            servers = (str(net.address.ip),) if net.dhcp and net.address is not None else ()
            return Attachment(net.bridge, servers)

    # -- start and destroy -------------------------------------------------------------

    def _run_dir(self) -> SafeDir:
        return self.run.get()

    def _dnsmasq(self, net: NetworkDef) -> Dnsmasq:
        return Dnsmasq(self._run_dir(), net, self.netns, popen=self._popen)

    def _owner_or_fail(self) -> Owner:
        owner = self._owner()
        if owner is None:
            raise StateError("the engine has no owner record; networks cannot be started")
        return owner

    def start(self, name: str) -> None:
        with self._lock:
            self._writable()
            net = self._def_or_fail(name)
            if name in self._active:
                raise StateError(f"network '{name}' is already active")
            if net.forward not in STARTABLE_MODES:
                raise StateError(f"network '{name}': forward mode '{net.forward}' cannot be "
                                 f"started here (nat, bridge or isolated)")
            owner = self._owner_or_fail()
            assert net.bridge is not None
            state = _Active(net, made_bridge=False, set_forwarding=False)
            try:
                self._bring_up(net, owner, state)
                self._save(state)
            except BaseException:
                self._tear_down(state, owner, quiet=True)
                raise
            self._active[name] = state
        log.info("network '%s' started (bridge %s)", name, net.bridge)
        self.events.publish(EventKind.LIFECYCLE, "network", name,
                            {"event": "started", "detail": "booted"})

    def _bring_up(self, net: NetworkDef, owner: Owner, state: _Active) -> None:
        assert net.bridge is not None
        info = self._link(net.bridge)
        if not net.managed_bridge:
            if info is None:
                raise StateError(f"network '{net.name}': bridge '{net.bridge}' does not exist")
            return
        for other in self._active.values():
            if other.net.bridge == net.bridge:
                raise ConflictError(f"network '{net.name}': bridge '{net.bridge}' is used by "
                                    f"active network '{other.net.name}'")
        if info is not None and info.get("ifalias") != f"{BRIDGE_ALIAS} {net.name}":
            raise ConflictError(f"network '{net.name}': device '{net.bridge}' exists already "
                                f"and was not made by this network")
        # Recorded before it exists, so that a failure half-way removes it.
        self._save(_Active(net, True, False))
        if info is None:
            self._ip.add_bridge(self.netns, net.bridge, alias=f"{BRIDGE_ALIAS} {net.name}")
        state.made_bridge = True
        if net.address is not None:
            self._ip.ip(self.netns, "addr", "replace", net.address.with_prefixlen,
                        "dev", net.bridge)
        if net.forward == "nat" and net.address is not None:
            state.set_forwarding = self._enable_forwarding()
            self._nat.apply(net, owner)
        if net.dhcp and net.address is not None:
            self._dnsmasq(net).start()

    def _enable_forwarding(self) -> bool:
        with in_netns(self.netns):
            try:
                if _FORWARD_SYSCTL.read_text().strip() == "1":
                    return False
                _FORWARD_SYSCTL.write_text("1\n")
            except OSError as exc:
                raise StateError(f"net.ipv4.ip_forward cannot be set: {exc}") from exc
        log.info("set net.ipv4.ip_forward=1 in %s", self.netns or "the host namespace")
        return True

    def _restore_forwarding(self, state: _Active) -> None:
        if not state.set_forwarding:
            return
        others = [a for a in self._active.values() if a is not state and a.set_forwarding]
        if others:
            others[0].set_forwarding = True  # the last one puts it back
            self._save(others[0])
            return
        with in_netns(self.netns), contextlib.suppress(OSError):
            _FORWARD_SYSCTL.write_text("0\n")

    def _link(self, dev: str) -> dict[str, object] | None:
        proc = self._ip.query(self.netns, "-j", "link", "show", "dev", dev)
        if proc.returncode != 0:
            return None
        try:
            data = json.loads(proc.stdout or "[]")
        except ValueError:
            return None
        return data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else None

    def _save(self, state: _Active) -> None:
        data = {"xml": format_network(state.net), "made_bridge": state.made_bridge,
                "set_forwarding": state.set_forwarding}
        self._run_dir().write(f"{state.net.name}.json", json.dumps(data, indent=1) + "\n")

    def destroy(self, name: str) -> None:
        with self._lock:
            self._writable()
            self._def_or_fail(name)
            state = self._active.get(name)
            if state is None:
                raise StateError(f"network '{name}' is not active")
            self._tear_down(state, self._owner_or_fail(), quiet=False)
            del self._active[name]
            if name not in self._defs:
                pass  # a transient network is gone with its status
        log.info("network '%s' destroyed", name)
        self.events.publish(EventKind.LIFECYCLE, "network", name,
                            {"event": "stopped", "detail": "destroyed"})

    def _tear_down(self, state: _Active, owner: Owner, *, quiet: bool) -> None:
        """Remove what starting `state` made.  Every step runs; the first
        error is raised at the end (unless `quiet`) and the status is kept
        so that destroying again finishes the job."""
        net = state.net
        errors: list[NwfilterError] = []

        def step(action: Callable[[], object]) -> None:
            try:
                action()
            except NwfilterError as exc:
                errors.append(exc)
            except OSError as exc:
                errors.append(StorageError(str(exc)))

        dnsmasq = self._dnsmasq(net)
        step(dnsmasq.stop)
        step(dnsmasq.remove_files)
        if net.forward == "nat":
            step(lambda: self._nat.remove(net.name, owner))
        step(lambda: self._restore_forwarding(state))
        if state.made_bridge and net.bridge is not None:
            info = self._link(net.bridge)
            if info is not None and info.get("ifalias") == f"{BRIDGE_ALIAS} {net.name}":
                bridge = net.bridge
                step(lambda: self._ip.ip(self.netns, "link", "del", bridge))
        if not errors:
            step(lambda: self._run_dir().remove(f"{net.name}.json"))
        if errors and not quiet:
            for later in errors[1:]:
                log.error("destroying network '%s': %s", net.name, later)
            raise errors[0]

    # -- supervision ----------------------------------------------------------------------

    def supervise(self) -> list[str]:
        """Start again the dnsmasq of every active network whose dnsmasq
        died; the names of the networks whose dnsmasq was restarted."""
        restarted = []
        with self._lock:
            if self._query_only:
                return []
            for name, state in sorted(self._active.items()):
                net = state.net
                if not net.dhcp or net.address is None:
                    continue
                dnsmasq = self._dnsmasq(net)
                if dnsmasq.pid() is not None:
                    continue
                log.warning("network '%s': dnsmasq is not running; starting it again", name)
                try:
                    dnsmasq.start()
                    restarted.append(name)
                except NwfilterError as exc:
                    log.error("network '%s': dnsmasq cannot be started: %s", name, exc)
        return restarted

    def active_names(self) -> list[str]:
        with self._lock:
            return sorted(self._active)


def _with(net: NetworkDef, **changes: object) -> NetworkDef:
    from dataclasses import replace

    from nwfilter.network.model import network_element

    updated = replace(net, **changes)  # type: ignore[arg-type]
    root = network_element(updated)
    if "uuid" in changes:
        for child in root:
            if isinstance(child.tag, str) and child.tag == "uuid":
                child.text = str(updated.uuid)
    from nwfilter.conf.safexml import serialize

    return replace(updated, document=serialize(root))
