"""The generic domain driver: lifecycle, persistence and filters of domains.

`DomainManager` is the entry point for one state root.  It keeps one
`DomainDriver` per hypervisor type (the domain XML `type` attribute picks
it, see `nwfilter.domain.hypervisor`), the names shared by all of them
(domain names and UUIDs, host port names), and the files:

* `ROOT/domains/<name>.xml` — persistent definitions (atomic writes);
* `ROOT/domains/autostart/<name>` — autostart marks;
* `ROOT/run/domains/<name>.json` — runtime status of active domains: id,
  state, the live definition and the ports it runs with, so a restarted
  engine finds its running domains again, checks they are alive and
  re-applies their filters;
* `ROOT/run/hypervisor/<type>/` — private runtime state of each hypervisor.

Filters follow the domains.  A start turns every interface that has a
`<filterref>` into a filter binding (owner = the domain, portdev = the
target dev or a generated `vnetN` unique across all drivers, the
interface's MAC, filterref and parameters) and creates all of them through
the engine in one all-or-nothing call before the domain counts as running;
if any cannot be applied the start fails and leaves nothing behind.  A stop
deletes them after the guest is gone.

Locking (docs/locking.md has the proof).  Each driver registers its lock
with the rebuild coordinator, so a filter change holds every driver lock
while it rebuilds.  The driver lock is held only to look an object up, to
change the list, and around the engine calls that create or delete a
domain's bindings; it is never held while waiting for a job or during a
hypervisor call.  The domain lock is never held while the driver lock, the
pool or anything of the engine is taken: a start unlocks the domain (its
job keeps other writers out) before it touches the engine.

Events: each lifecycle change that succeeded is published on the event bus
(`nwfilter.events`) as libvirt names it (`started`/`booted`,
`stopped`/`destroyed`, ...), once the domain's job has ended.
"""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Protocol
from uuid import UUID

from nwfilter.conf.domain_xml import ATTACHABLE_TYPES
from nwfilter.conf.model import BindingDef, DomainDef, InterfaceDef, Parameter
from nwfilter.domain.hypervisor import (
    Hypervisor,
    HypervisorEnv,
    PortPlan,
    load_hypervisor,
)
from nwfilter.domain.jobs import JOB_WAIT_TIME, JobKind
from nwfilter.domain.objects import DomainObj, DomainObjList, DomainState
from nwfilter.errors import (
    ConflictError,
    NotFoundError,
    NwfilterError,
    StateError,
    StorageError,
    UnsupportedError,
    ValidationError,
)
from nwfilter.events import EventBus, lifecycle
from nwfilter.fileio import DirHandle, SafeDir
from nwfilter.locks import Level, LevelledLock
from nwfilter.rebuild import RebuildCoordinator

if TYPE_CHECKING:
    from nwfilter.domain.eventloop import EventLoop
    from nwfilter.engine import Engine

log = logging.getLogger(__name__)

_DOMAIN_NAME_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.+:-]{0,199}\Z")
_PORTDEV_PREFIX = "vnet"
# How long a guest whose monitor closed may take to exit.
EXIT_GRACE = 10.0


class FilterEngine(Protocol):
    """What the driver needs of the filter engine."""

    def create_bindings(self, defs: Sequence[BindingDef]) -> object: ...

    def delete_binding(self, portdev: str) -> object: ...


BindingLookup = Callable[[str], BindingDef | None]


class NetworkAttachment(Protocol):
    @property
    def bridge(self) -> str: ...

    @property
    def dhcp_servers(self) -> tuple[str, ...]: ...


#: the bridge (and DHCP servers) of an active network; StateError if it is not
NetworkLookup = Callable[[str], NetworkAttachment]


def validate_domain_name(name: str) -> str:
    """Return `name` if it is safe as a domain name and as a file name."""
    if not _DOMAIN_NAME_RE.match(name):
        raise ValidationError(
            f"invalid domain name {name!r}: use 1-200 letters, digits and '_.+:-', "
            "not starting with '.' or '-'"
        )
    return name


def check_target_devs(dom: DomainDef) -> None:
    """Refuse a definition that gives one target device to two interfaces:
    the second would share the first one's port and its rules."""
    first: dict[str, int] = {}
    for index, iface in enumerate(dom.interfaces):
        dev = iface.target_dev
        if dev is None:
            continue
        if dev in first:
            raise ValidationError(
                f"domain '{dom.name}': interfaces {first[dev]} and {index} both have"
                f" target dev '{dev}'"
            )
        first[dev] = index


def random_mac() -> str:
    """A MAC in QEMU's locally administered range 52:54:00:xx:xx:xx."""
    tail = secrets.token_bytes(3)
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


# -- names shared by all drivers ---------------------------------------------


class SharedNames:
    """Domain names/UUIDs and host port names in use across every driver.

    Its lock is a leaf: nothing is taken while it is held."""

    def __init__(self) -> None:
        self._lock = LevelledLock("names", Level.LEAF)
        self._domains: dict[str, tuple[str, UUID]] = {}  # name -> (type, uuid)
        self._ports: dict[str, str] = {}  # portdev -> domain name
        self._last_id = 0

    def new_id(self) -> int:
        """A fresh domain id, unique across drivers and never reused."""
        with self._lock:
            self._last_id += 1
            return self._last_id

    def seen_id(self, domid: int) -> None:
        """Hand out only ids above `domid` from now on (after a restart)."""
        with self._lock:
            self._last_id = max(self._last_id, domid)

    def claim_domain(self, name: str, uuid: UUID, dtype: str) -> None:
        with self._lock:
            have = self._domains.get(name)
            if have is not None and have != (dtype, uuid):
                raise ConflictError(
                    f"domain '{name}' already exists (type '{have[0]}', uuid {have[1]})"
                )
            for other, (otype, ouuid) in self._domains.items():
                if ouuid == uuid and other != name:
                    raise ConflictError(
                        f"domain uuid {uuid} is already used by domain '{other}' ({otype})"
                    )
            self._domains[name] = (dtype, uuid)

    def release_domain(self, name: str) -> None:
        with self._lock:
            self._domains.pop(name, None)

    def domain_type(self, name: str) -> str | None:
        with self._lock:
            have = self._domains.get(name)
            return None if have is None else have[0]

    def domain_names(self) -> list[tuple[str, str]]:
        with self._lock:
            return sorted((n, t) for n, (t, _) in self._domains.items())

    def reserve_ports(
        self, owner: str, wanted: Sequence[str | None], bound: BindingLookup | None = None
    ) -> list[str]:
        """Reserve host port names for `owner`: the given ones, or the lowest
        free `vnetN` for `None`.  All or nothing.

        A name is taken once; one held by another domain, or bound (per
        `bound`, which must take no lock) for another owner, is refused, and
        a generated name skips it."""
        with self._lock:
            taken = dict(self._ports)
            out: list[str] = []
            for name in wanted:
                if name is not None:
                    if name in out:
                        raise ValidationError(
                            f"domain '{owner}': target dev '{name}' is given to more than"
                            " one interface"
                        )
                    holder = taken.get(name)
                    if holder is not None and holder != owner:
                        raise ConflictError(
                            f"domain '{owner}': interface '{name}' is already used by"
                            f" domain '{holder}'"
                        )
                    binding = bound(name) if bound is not None else None
                    if binding is not None and binding.owner_name != owner:
                        raise ConflictError(
                            f"domain '{owner}': interface '{name}' is already bound to filter"
                            f" '{binding.filterref.filter}' for '{binding.owner_name}'"
                        )
                    taken[name] = owner
                    out.append(name)
            result: list[str] = []
            explicit = iter(out)
            counter = 0
            for name in wanted:
                if name is not None:
                    result.append(next(explicit))
                    continue
                while f"{_PORTDEV_PREFIX}{counter}" in taken or (
                    bound is not None and bound(f"{_PORTDEV_PREFIX}{counter}") is not None
                ):
                    counter += 1
                generated = f"{_PORTDEV_PREFIX}{counter}"
                taken[generated] = owner
                result.append(generated)
            self._ports = taken
            return result

    def port_holder(self, portdev: str) -> tuple[str, UUID] | None:
        """The name and UUID of the domain that holds `portdev`, if any."""
        with self._lock:
            owner = self._ports.get(portdev)
            if owner is None:
                return None
            have = self._domains.get(owner)
            return None if have is None else (owner, have[1])

    def release_ports(self, owner: str, names: Iterable[str]) -> None:
        with self._lock:
            for name in names:
                if self._ports.get(name) == owner:
                    del self._ports[name]


# -- answers of the query calls ------------------------------------------------


@dataclass(frozen=True)
class DomainSummary:
    id: int  # -1 when inactive
    name: str
    uuid: UUID
    type: str
    state: DomainState
    reason: str
    persistent: bool
    autostart: bool


@dataclass(frozen=True)
class InterfaceRow:
    """One line of `domiflist`."""

    interface: str  # the host port, '-' when inactive and not given
    type: str
    source: str
    model: str
    mac: str
    filter: str | None


class DomainFiles:
    """The domain files of a state root (see the module docstring), each
    directory opened and checked once (`nwfilter.fileio.SafeDir`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.configs = DirHandle(root / "domains", "domain directory")
        self.marks = DirHandle(root / "domains" / "autostart", "autostart directory")
        self.statuses = DirHandle(root / "run" / "domains", "domain status directory")
        # Why each persistent domain last shut off (libvirt's state reason).
        self.shutoffs = DirHandle(root / "run" / "domains" / "shutoff",
                                  "domain shutoff directory")

    def hypervisor_dir(self, dtype: str) -> Path:
        return self.root / "run" / "hypervisor" / dtype

    def save_config(self, name: str, text: str) -> None:
        self.configs.get().write(f"{validate_domain_name(name)}.xml", text)

    def remove_config(self, name: str) -> None:
        self.configs.get().remove(f"{validate_domain_name(name)}.xml")
        marks = self.marks.existing()
        if marks is not None:
            marks.remove(validate_domain_name(name))

    def set_autostart(self, name: str, enable: bool) -> None:
        if enable:
            self.marks.get().write(validate_domain_name(name), name + "\n")
            return
        marks = self.marks.existing()
        if marks is not None:
            marks.remove(validate_domain_name(name))

    def save_status(self, name: str, text: str) -> None:
        self.statuses.get().write(f"{validate_domain_name(name)}.json", text)

    def remove_status(self, name: str) -> None:
        self.statuses.get().remove(f"{validate_domain_name(name)}.json")

    def save_shutoff(self, name: str, reason: str) -> None:
        self.shutoffs.get().write(validate_domain_name(name), reason + "\n")

    def shutoff_reason(self, name: str) -> str:
        """Why the domain last shut off, '' if unknown."""
        directory = self.shutoffs.existing()
        if directory is None:
            return ""
        try:
            data = directory.read_if_exists(validate_domain_name(name))
        except NwfilterError:
            return ""
        return data.decode("utf-8", "replace").strip() if data else ""

    def remove_shutoff(self, name: str) -> None:
        directory = self.shutoffs.existing()
        if directory is not None:
            directory.remove(validate_domain_name(name))


def _read_all(directory: SafeDir | None, suffix: str, what: str) -> list[tuple[Path, bytes]]:
    """(path, content) of each file in `directory` ending in `suffix`; one
    that cannot be read is logged and left out."""
    found: list[tuple[Path, bytes]] = []
    if directory is None:
        return found
    for name in directory.names(suffix):
        try:
            found.append((directory.path / name, directory.read(name)))
        except NwfilterError as exc:
            log.error("skipping %s '%s': %s", what, directory.path / name, exc)
    return found


def _parse(xml: str) -> DomainDef:
    from nwfilter.conf import parse_domain

    result: DomainDef = parse_domain(xml)
    return result


def _format(definition: DomainDef) -> str:
    from nwfilter.conf import format_domain

    result: str = format_domain(definition)
    return result


@dataclass(frozen=True)
class _Status:
    """The runtime status file of an active domain, read back."""

    live: DomainDef
    ports: tuple[PortPlan, ...]
    id: int | None
    state: DomainState
    reason: str
    persistent: bool


def _read_status(name: str, status: Mapping[str, object]) -> _Status:
    """Parse what `DomainDriver._save_status` wrote; `StorageError` if it is
    not what it wrote."""
    try:
        live = _parse(str(status["xml"]))
        raw_ports = status.get("ports")
        ports = tuple(
            PortPlan(int(p["index"]), str(p["portdev"]), str(p["mac"]),
                     None if p.get("bridge") is None else str(p["bridge"]), bool(p["filtered"]),
                     tuple(str(s) for s in p.get("dhcp_servers", ())))
            for p in (raw_ports if isinstance(raw_ports, list) else [])
        )
        state = DomainState[str(status.get("state", "RUNNING"))]
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise StorageError(f"malformed runtime status of domain '{name}': {exc!r}") from exc
    if live.name != name:
        raise StorageError(f"runtime status of domain '{name}' holds domain '{live.name}'")
    domid = status.get("id")
    return _Status(
        live=live,
        ports=ports,
        id=domid if isinstance(domid, int) and domid > 0 else None,
        state=state,
        reason=str(status.get("reason", "unknown")),
        persistent=bool(status.get("persistent", True)),
    )


def binding_for(dom: DomainDef, port: PortPlan) -> BindingDef:
    iface = dom.interfaces[port.index]
    if iface.filterref is None:
        raise ValueError(f"interface {port.index} of '{dom.name}' has no filter")
    filterref = iface.filterref
    if port.dhcp_servers and "DHCPSERVER" not in filterref.param_dict():
        # The network's own DHCP server is the one the guest's address is
        # learnt from (and the one filters using $DHCPSERVER let through).
        extra = tuple(Parameter("DHCPSERVER", s) for s in port.dhcp_servers)
        filterref = replace(filterref, params=filterref.params + extra)
    return BindingDef(
        owner_name=dom.name,
        owner_uuid=dom.uuid,
        portdev=port.portdev,
        mac=port.mac,
        filterref=filterref,
        linkdev=None,
    )


def with_ports(dom: DomainDef, ports: Sequence[PortPlan]) -> DomainDef:
    """The live definition of a started domain: each interface's
    `<target dev>` names its host port, as libvirt shows a running guest."""
    ifaces = list(dom.interfaces)
    for port in ports:
        if ifaces[port.index].target_dev != port.portdev:
            ifaces[port.index] = replace(ifaces[port.index], target_dev=port.portdev)
    return replace(dom, interfaces=tuple(ifaces)) if ifaces != list(dom.interfaces) else dom


# -- one driver -----------------------------------------------------------------


class DomainDriver:
    """The domains of one hypervisor type."""

    def __init__(
        self,
        dtype: str,
        hypervisor: Hypervisor,
        engine: FilterEngine,
        files: DomainFiles,
        names: SharedNames,
        *,
        rank: int = 0,
        job_timeout: float = JOB_WAIT_TIME,
        mac_source: Callable[[], str] = random_mac,
        bindings: BindingLookup | None = None,
        events: EventBus | None = None,
        networks: NetworkLookup | None = None,
    ) -> None:
        self.type = dtype
        self.networks = networks
        self.events = events if events is not None else EventBus()
        self.bindings = bindings
        self.hypervisor = hypervisor
        self.engine = engine
        self.files = files
        self.names = names
        self.lock = LevelledLock(f"driver:{dtype}", Level.DRIVER, rank=rank)
        self.domains = DomainObjList(self.lock)
        self.job_timeout = job_timeout
        self.mac_source = mac_source
        # Test-only: start the way libvirt did before its fix (driver lock
        # and domain lock held while the filters are instantiated), to show
        # that this order deadlocks against a filter update.
        self.legacy_lock_order = False
        # What guests do by themselves (pause, exit, ...) arrives from the
        # event loop and is handled by a worker thread, which may wait for
        # the domain's job as no loop callback may.
        self._guest_events: queue.SimpleQueue[tuple[str, str, str]] = queue.SimpleQueue()
        self._guest_worker = False
        self._guest_lock = threading.Lock()  # a leaf: guards `_guest_worker`
        set_sink = getattr(hypervisor, "set_event_sink", None)
        if callable(set_sink):
            set_sink(self.guest_event)

    # -- files -----------------------------------------------------------------

    def _save_config(self, definition: DomainDef) -> None:
        self.files.save_config(definition.name, _format(definition))

    def _save_status(self, obj: DomainObj) -> None:
        data = {
            "name": obj.name,
            "uuid": str(obj.uuid),
            "type": self.type,
            "id": obj.id,
            "state": obj.state.name,
            "reason": obj.reason,
            "persistent": obj.persistent,
            "ports": [
                {
                    "index": p.index,
                    "portdev": p.portdev,
                    "mac": p.mac,
                    "bridge": p.bridge,
                    "filtered": p.filtered,
                    "dhcp_servers": list(p.dhcp_servers),
                }
                for p in obj.ports
            ],
            "xml": _format(obj.definition),
        }
        self.files.save_status(obj.name, json.dumps(data, indent=1, sort_keys=True))

    # -- define / undefine ---------------------------------------------------------

    def with_macs(self, definition: DomainDef) -> DomainDef:
        """`definition` with a generated MAC on every interface that has none."""
        if all(i.mac is not None for i in definition.interfaces):
            return definition
        ifaces = tuple(
            i if i.mac is not None else replace(i, mac=self.mac_source())
            for i in definition.interfaces
        )
        return replace(definition, interfaces=ifaces)

    def define(self, definition: DomainDef) -> DomainDef:
        validate_domain_name(definition.name)
        check_target_devs(definition)
        definition = self.with_macs(definition)
        self.names.claim_domain(definition.name, definition.uuid, self.type)
        try:
            obj, created = self.domains.add(definition, persistent=True)
        except NwfilterError:
            self._release_name_if_unused(definition.name)
            raise
        try:
            # The file first: the object changes only once the definition is kept.
            self._save_config(definition)
        except NwfilterError:
            if created:
                self.domains.remove(obj)
                self.names.release_domain(definition.name)
            obj.end_api()
            raise
        if not created:
            if obj.is_active():
                obj.new_def = definition
            else:
                obj.definition = definition
        obj.persistent = True
        obj.end_api()
        self.events.emit(lifecycle(definition.name, "defined", "added" if created else "updated"))
        return definition

    def _release_name_if_unused(self, name: str) -> None:
        """Give a claimed domain name back unless a domain of this driver has it."""
        with self.lock:
            unused = self.domains.find_locked(name) is None
        if unused:
            self.names.release_domain(name)

    def undefine(self, name: str) -> None:
        obj = self.domains.lookup_by_name(name)
        try:
            obj.job.begin(JobKind.MODIFY, "undefine", timeout=self.job_timeout)
            try:
                if not obj.persistent:
                    raise StateError(f"cannot undefine transient domain '{name}'")
                self.files.remove_config(name)
                self.files.remove_shutoff(name)
                obj.autostart = False
                if obj.is_active():
                    # stays until it stops, then goes (libvirt: becomes transient)
                    obj.persistent = False
                    obj.new_def = None
                    self._save_status(obj)
                else:
                    self.domains.remove(obj)
                    self.names.release_domain(name)
            finally:
                obj.job.end()
        finally:
            obj.end_api()
        self.events.emit(lifecycle(name, "undefined", "removed"))

    def set_autostart(self, name: str, enable: bool) -> None:
        obj = self.domains.lookup_by_name(name)
        try:
            # The job waits for an undefine to finish; if that removed the
            # domain, it fails instead of writing a mark for a gone domain.
            obj.job.begin(JobKind.MODIFY, "autostart", timeout=self.job_timeout)
            try:
                if not obj.persistent:
                    raise StateError(f"cannot set autostart for transient domain '{name}'")
                self.files.set_autostart(name, enable)
                obj.autostart = enable
            finally:
                obj.job.end()
        finally:
            obj.end_api()

    # -- start -------------------------------------------------------------------------

    def _plan(self, dom: DomainDef) -> list[PortPlan]:
        """The ports of a start; reserves their names (checks come first,
        so a refused start reserves nothing)."""
        macs: list[str] = []
        attached: dict[int, NetworkAttachment] = {}
        for index, iface in enumerate(dom.interfaces):
            if iface.type not in ATTACHABLE_TYPES:
                raise UnsupportedError(
                    f"domain '{dom.name}': interface {index + 1} has type '{iface.type}', "
                    f"which no driver here can attach ({', '.join(ATTACHABLE_TYPES)})"
                )
            if iface.type == "network":
                attached[index] = self._network(dom, index, iface)
            if iface.mac is None:
                raise ValidationError(f"interface {index} of domain '{dom.name}' has no MAC")
            macs.append(iface.mac)
        check_target_devs(dom)  # a definition stored before the check existed
        portdevs = self.names.reserve_ports(
            dom.name, [i.target_dev for i in dom.interfaces], self.bindings
        )
        plans = []
        for index, (iface, portdev, mac) in enumerate(
            zip(dom.interfaces, portdevs, macs, strict=True)
        ):
            net = attached.get(index)
            plans.append(PortPlan(
                index, portdev, mac, net.bridge if net is not None else iface.source_bridge,
                iface.filterref is not None, net.dhcp_servers if net is not None else (),
            ))
        return plans

    def _network(self, dom: DomainDef, index: int, iface: InterfaceDef) -> NetworkAttachment:
        """The active network an interface attaches to; refused if none is."""
        name = iface.source_network
        if self.networks is None:
            raise UnsupportedError(
                f"domain '{dom.name}': interface {index + 1} uses network '{name}', "
                "and no networks are managed here"
            )
        assert name is not None
        try:
            return self.networks(name)
        except NwfilterError as exc:
            raise type(exc)(
                f"domain '{dom.name}': interface {index + 1} cannot attach to network "
                f"'{name}': {exc.message}", exc.code
            ) from exc

    def start(self, name: str) -> None:
        if self.legacy_lock_order:
            self._start_legacy(name)
            return
        obj = self.domains.lookup_by_name(name)
        try:
            obj.job.begin(JobKind.MODIFY, "start", timeout=self.job_timeout)
            try:
                if obj.is_active():
                    raise StateError(f"domain '{name}' is already active")
                self._start_locked(obj)
            finally:
                obj.job.end()
        finally:
            obj.end_api()
        self.events.emit(lifecycle(name, "started", "booted"))

    def _start_locked(self, obj: DomainObj) -> None:
        """Start `obj` (locked, job held); on return it is locked again."""
        dom = obj.persistent_def()
        ports = self._plan(dom)
        bound: list[str] = []
        # The job keeps other writers out; the domain lock must not be held
        # while the driver lock, the pool or the engine are taken below.
        with obj.job.monitor(require_active=False):
            try:
                self.hypervisor.prepare(dom, ports)
                defs = [binding_for(dom, p) for p in ports if p.filtered]
                # No lock held: the engine commits the bindings of starts
                # that arrive together in one transaction, and this driver's
                # lock held here would keep its other starts out of it.
                if defs:
                    self.engine.create_bindings(defs)
                bound = [d.portdev for d in defs]
                with self.lock, obj.mutex:
                    obj.ports = tuple(ports)
                self.hypervisor.launch(dom)
            except BaseException:
                self._teardown(obj, dom, ports, bound)
                raise
        # A define takes no job: one that ran while the domain was unlocked
        # replaced the inactive definition, and is the next persistent one now.
        latest = obj.persistent_def()
        obj.definition = with_ports(dom, ports)
        if latest is not dom:
            obj.new_def = latest
        else:
            # the next start takes its port names afresh
            obj.new_def = dom if obj.persistent and obj.definition is not dom else None
        obj.id = self.names.new_id()
        obj.set_state(DomainState.RUNNING, "booted")
        try:
            self._save_status(obj)
        except BaseException:
            self._undo_start(obj, dom, ports, bound)
            raise

    def _undo_start(
        self, obj: DomainObj, dom: DomainDef, ports: Sequence[PortPlan], bound: Sequence[str]
    ) -> None:
        """Stop a launched guest whose status could not be written (a
        restarted engine would not know it runs).  If the guest cannot be
        stopped it keeps its filters and stays running; that is logged."""
        try:
            with obj.job.monitor(require_active=False):
                self._stop_and_unbind(obj, dom, ports, bound)
        except NwfilterError as exc:
            log.error("domain '%s' runs without a status file; stopping it failed: %s",
                      obj.name, exc)
            return
        try:
            self._mark_shutoff(obj, "failed")
        except NwfilterError as exc:
            log.error("domain '%s': %s", obj.name, exc)

    def _start_legacy(self, name: str) -> None:
        """driver → domain → filter, all held at once (test-only, deadlocks)."""
        with self.lock:
            obj = self.domains.find_locked(name)
            if obj is None:
                raise NotFoundError(f"domain not found: no domain with matching name '{name}'")
            obj.ref()
            obj.lock()
            try:
                dom = obj.persistent_def()
                ports = self._plan(dom)
                self.hypervisor.prepare(dom, ports)
                defs = [binding_for(dom, p) for p in ports if p.filtered]
                self.engine.create_bindings(defs)
                self.hypervisor.launch(dom)
                obj.ports = tuple(ports)
                obj.id = self.names.new_id()
                obj.set_state(DomainState.RUNNING, "booted")
            finally:
                obj.end_api()

    def _teardown(
        self, obj: DomainObj, dom: DomainDef, ports: Sequence[PortPlan], bound: Sequence[str]
    ) -> None:
        """Clean up after a failed start: stop the guest, then delete its
        bindings and free its names.  Runs with no lock held; best effort,
        errors are logged (the start fails either way)."""
        try:
            self.hypervisor.stop(dom)
        except NwfilterError as exc:
            log.error("stopping domain '%s' failed: %s", dom.name, exc)
        self._unbind(obj, dom, ports, bound)

    def _stop_and_unbind(
        self, obj: DomainObj, dom: DomainDef, ports: Sequence[PortPlan], bound: Sequence[str]
    ) -> None:
        """Stop the guest, then delete its bindings and free its names.
        Runs with no lock held.  A failed stop raises before any binding is
        deleted: a guest that may still run keeps its filters."""
        self.hypervisor.stop(dom)
        self._unbind(obj, dom, ports, bound)

    def _unbind(
        self, obj: DomainObj, dom: DomainDef, ports: Sequence[PortPlan], bound: Sequence[str]
    ) -> None:
        """Delete the bindings of a stopped guest and free its port names;
        a binding that cannot be deleted is logged."""
        with self.lock:
            for portdev in bound:
                try:
                    self.engine.delete_binding(portdev)
                except NotFoundError:
                    pass
                except NwfilterError as exc:
                    log.error("removing the filter of '%s' (%s) failed: %s",
                              dom.name, portdev, exc)
            with obj.mutex:
                obj.ports = ()
        self.names.release_ports(dom.name, [p.portdev for p in ports])

    # -- stop, suspend, resume -----------------------------------------------------------

    def stop(self, name: str, *, reason: str) -> None:
        """Shut the domain off (`reason`: 'destroyed' or 'shutdown')."""
        obj = self.domains.lookup_by_name(name)
        kill = getattr(self.hypervisor, "kill", None)
        if reason == "destroyed" and callable(kill) and obj.is_active():
            # As libvirt does: end the guest before waiting for its job, so a
            # monitor call hung in another thread fails now, not at its timeout.
            dom = obj.definition
            obj.unlock()
            try:
                kill(dom)
            except NwfilterError as exc:
                log.warning("domain '%s': killing it failed: %s", name, exc)
            finally:
                obj.lock()
        try:
            kind = JobKind.DESTROY if reason == "destroyed" else JobKind.MODIFY
            obj.job.begin(kind, reason, timeout=self.job_timeout)
            try:
                if not obj.is_active():
                    raise StateError(f"domain '{name}' is not running")
                self._stop_locked(obj, reason)
            finally:
                obj.job.end()
            if not obj.persistent:
                self.domains.remove(obj)
                self.names.release_domain(name)
        finally:
            obj.end_api()
        if reason == "shutdown":
            # libvirt tells the guest's shutdown and its stop apart
            self.events.emit(lifecycle(name, "shutdown", "finished"))
        self.events.emit(lifecycle(name, "stopped", reason))

    def _stop_locked(self, obj: DomainObj, reason: str) -> None:
        dom = obj.definition
        ports = obj.ports
        bound = [p.portdev for p in ports if p.filtered]
        # If the stop fails the domain stays as it was, running with its
        # filters, and the error goes to the caller.
        shutdown = getattr(self.hypervisor, "shutdown", None)
        with obj.job.monitor(require_active=False):
            if reason == "shutdown" and callable(shutdown):
                shutdown(dom)  # the guest powers down, or is killed after a while
            self._stop_and_unbind(obj, dom, ports, bound)
        self._mark_shutoff(obj, reason)

    def _mark_shutoff(self, obj: DomainObj, reason: str) -> None:
        _set_shutoff(obj, reason)
        self.files.remove_status(obj.name)
        if obj.persistent:
            # The reason outlives this process, so `domstate --reason` tells
            # a destroyed domain from one shut down in the next command too.
            try:
                self.files.save_shutoff(obj.name, reason)
            except NwfilterError as exc:
                log.warning("domain '%s': cannot record why it shut off: %s", obj.name, exc)

    def suspend(self, name: str) -> None:
        self._pause(name, suspend=True)

    def resume(self, name: str) -> None:
        self._pause(name, suspend=False)

    def _pause(self, name: str, *, suspend: bool) -> None:
        obj = self.domains.lookup_by_name(name)
        try:
            api = "suspend" if suspend else "resume"
            obj.job.begin(JobKind.SUSPEND if suspend else JobKind.MODIFY, api,
                          timeout=self.job_timeout)
            try:
                if not obj.is_active():
                    raise StateError(f"domain '{name}' is not running")
                want = DomainState.RUNNING if suspend else DomainState.PAUSED
                if obj.state is not want:
                    raise StateError(f"domain '{name}' is {obj.state.value}, not {want.value}")
                dom = obj.definition
                with obj.job.monitor():
                    if suspend:
                        self.hypervisor.suspend(dom)
                    else:
                        self.hypervisor.resume(dom)
                if suspend:
                    obj.set_state(DomainState.PAUSED, "user")
                else:
                    obj.set_state(DomainState.RUNNING, "unpaused")
                self._save_status(obj)
            finally:
                obj.job.end()
        finally:
            obj.end_api()
        if suspend:
            self.events.emit(lifecycle(name, "suspended", "paused"))
        else:
            self.events.emit(lifecycle(name, "resumed", "unpaused"))

    def reboot(self, name: str) -> None:
        reboot = getattr(self.hypervisor, "reboot", None)
        if not callable(reboot):
            raise UnsupportedError(f"domain '{name}': type '{self.type}' cannot reboot")
        obj = self.domains.lookup_by_name(name)
        try:
            obj.job.begin(JobKind.MODIFY, "reboot", timeout=self.job_timeout)
            try:
                if not obj.is_active():
                    raise StateError(f"domain '{name}' is not running")
                dom = obj.definition
                with obj.job.monitor():
                    reboot(dom)
            finally:
                obj.job.end()
        finally:
            obj.end_api()

    # -- what guests do by themselves ------------------------------------------------------

    def guest_event(self, name: str, kind: str, reason: str) -> None:
        """Queue an event of a guest (called from the event loop: never blocks).

        It is handled under the domain's job by a worker thread, which
        looks the domain up by name: an event for a domain that was
        destroyed or removed meanwhile finds it inactive or gone and does
        nothing; no event keeps a pointer to a domain object."""
        self._guest_events.put((name, kind, reason))
        with self._guest_lock:
            if self._guest_worker:
                return
            self._guest_worker = True
        threading.Thread(target=self._guest_work, name=f"guest-events-{self.type}",
                         daemon=True).start()

    def _guest_work(self) -> None:
        while True:
            with self._guest_lock:
                try:
                    name, kind, reason = self._guest_events.get_nowait()
                except queue.Empty:
                    self._guest_worker = False
                    return
            try:
                self._handle_guest_event(name, kind, reason)
            except NwfilterError as exc:
                log.error("domain '%s': handling guest event '%s' failed: %s", name, kind, exc)
            except Exception:
                log.exception("domain '%s': handling guest event '%s' failed", name, kind)

    def _handle_guest_event(self, name: str, kind: str, reason: str) -> None:
        try:
            obj = self.domains.lookup_by_name(name)
        except NotFoundError:
            return
        emitted: list[tuple[str, str]] = []
        try:
            obj.job.begin(JobKind.MODIFY, f"guest event '{kind}'", timeout=self.job_timeout)
            try:
                if not obj.is_active():
                    return
                dom = obj.definition
                if kind in ("exited", "panicked"):
                    if kind == "exited":
                        with obj.job.monitor(require_active=False):
                            alive = self._still_alive(dom)
                        if alive:
                            log.info("domain '%s' runs again; an older process exited", name)
                            return
                    reason = "crashed" if kind == "panicked" else reason
                    log.warning("domain '%s' stopped by itself (%s); removing its filters",
                                name, reason)
                    self._stop_locked(obj, reason)
                    if reason == "shutdown":
                        emitted.append(("shutdown", "finished"))
                    emitted.append(("stopped", reason))
                elif kind in ("paused", "running"):
                    # The event may be old news (a suspend's own STOP, handled
                    # after a resume): the guest's state now decides.
                    now = getattr(self.hypervisor, "guest_state", None)
                    if callable(now):
                        with obj.job.monitor():
                            kind = now(dom)
                if kind == "paused" and obj.state is DomainState.RUNNING:
                    obj.set_state(DomainState.PAUSED, "unknown")
                    self._save_status(obj)
                    emitted.append(("suspended", "paused"))
                elif kind == "running" and obj.state is DomainState.PAUSED:
                    obj.set_state(DomainState.RUNNING, "unpaused")
                    self._save_status(obj)
                    emitted.append(("resumed", "unpaused"))
            finally:
                obj.job.end()
            if not obj.is_active() and not obj.persistent:
                self.domains.remove(obj)
                self.names.release_domain(name)
        finally:
            obj.end_api()
        for event, detail in emitted:
            self.events.emit(lifecycle(name, event, detail))

    def _still_alive(self, dom: DomainDef) -> bool:
        """Whether the guest is alive after an exit event: a process that
        closed its monitor may take a moment to be gone; one that lives on
        after `EXIT_GRACE` is a newer process of the domain."""
        deadline = time.monotonic() + EXIT_GRACE
        while self.hypervisor.is_alive(dom):
            if time.monotonic() > deadline:
                return True
            time.sleep(0.02)
        return False

    # -- queries (no job: they never wait for one) ----------------------------------------

    def summary(self, obj: DomainObj) -> DomainSummary:
        return DomainSummary(obj.id, obj.name, obj.uuid, self.type, obj.state, obj.reason,
                             obj.persistent, obj.autostart)

    def summaries(self) -> list[DomainSummary]:
        out = []
        for obj in self.domains.snapshot():
            with obj.mutex:
                if not obj.removing:
                    out.append(self.summary(obj))
            obj.unref()
        return out

    def get(self, name: str) -> tuple[DomainSummary, DomainDef, tuple[PortPlan, ...]]:
        """State, current (live if running, else persistent) definition and ports."""
        obj = self.domains.lookup_by_name(name)
        try:
            return self.summary(obj), obj.definition, obj.ports
        finally:
            obj.end_api()

    def persistent_xml(self, name: str) -> str:
        obj = self.domains.lookup_by_name(name)
        try:
            return _format(obj.persistent_def())
        finally:
            obj.end_api()

    def binding_defs(self) -> list[BindingDef]:
        """The bindings every active domain of this driver should have."""
        out: list[BindingDef] = []
        for obj in self.domains.snapshot():
            with obj.mutex:
                if obj.is_active():
                    out.extend(binding_for(obj.definition, p) for p in obj.ports if p.filtered)
            obj.unref()
        return sorted(out, key=lambda b: b.portdev)

    # -- start-up --------------------------------------------------------------------------

    def load(
        self,
        configs: Mapping[str, DomainDef],
        statuses: Mapping[str, Mapping[str, object]],
        autostart: frozenset[str],
        bindings: BindingLookup,
        *,
        take_over: bool = True,
    ) -> None:
        """Take over the persistent definitions and runtime status of this
        type, find running guests again and re-apply their filters.

        With `take_over=False` (queries only) both are just read: guests
        are asked whether they are alive and nothing else, no binding is
        created or deleted and no file is written.  A definition or status
        that cannot be loaded is logged and skipped."""
        for name, definition in sorted(configs.items()):
            try:
                self._load_config(definition, name in autostart, save=take_over)
            except NwfilterError as exc:
                log.error("skipping domain definition '%s': %s", name, exc)
        for name, raw in sorted(statuses.items()):
            try:
                status = _read_status(name, raw)
                if take_over:
                    self._reconnect(name, status, bindings)
                else:
                    self._load_status(name, status)
            except NwfilterError as exc:
                log.error("domain '%s': cannot take over its running state: %s", name, exc)

    def _load_config(self, definition: DomainDef, autostart: bool, *, save: bool) -> None:
        name = definition.name
        self.names.claim_domain(name, definition.uuid, self.type)
        # A definition written by hand may lack MACs: generate them once and
        # (when allowed to write) keep them, so they stay the same next time.
        full = self.with_macs(definition)
        if save and full is not definition:
            try:
                self._save_config(full)
            except NwfilterError as exc:
                log.error("domain '%s': cannot store its generated MACs: %s", name, exc)
        try:
            obj, _ = self.domains.add(full, persistent=True)
        except NwfilterError:
            self._release_name_if_unused(name)
            raise
        obj.autostart = autostart
        reason = self.files.shutoff_reason(name)
        if reason in ("shutdown", "destroyed", "crashed", "failed", "saved", "migrated"):
            obj.set_state(DomainState.SHUTOFF, reason)
        obj.end_api()

    def _persistent_name(self, name: str) -> bool:
        return name in {n for n, _ in self.names.domain_names()}

    def _adopt(self, obj: DomainObj, status: _Status) -> None:
        """Make `obj` (locked) active with the state its status file records."""
        if obj.persistent:
            obj.new_def = obj.definition if obj.definition != status.live else None
        obj.definition = status.live
        obj.id = status.id if status.id is not None else self.names.new_id()
        self.names.seen_id(obj.id)
        obj.set_state(status.state, status.reason)
        obj.ports = status.ports

    def _load_status(self, name: str, status: _Status) -> None:
        """Queries only: show an active domain as its status file says, or
        shut off if its guest is gone; change nothing."""
        persistent = status.persistent and self._persistent_name(name)
        alive = self.hypervisor.is_alive(status.live)
        if not alive and not persistent:
            return  # a transient domain whose guest is gone no longer exists
        self.names.claim_domain(name, status.live.uuid, self.type)
        obj, _ = self.domains.add(status.live, persistent=persistent)
        try:
            if alive:
                self._adopt(obj, status)
            else:
                obj.set_state(DomainState.SHUTOFF, "crashed")
        finally:
            obj.end_api()

    def _reconnect(self, name: str, status: _Status, bindings: BindingLookup) -> None:
        live, ports = status.live, status.ports
        persistent = status.persistent and self._persistent_name(name)
        self.names.claim_domain(name, live.uuid, self.type)
        obj, _ = self.domains.add(live, persistent=persistent)
        try:
            bound = [p.portdev for p in ports if p.filtered]
            if not self.hypervisor.is_alive(live):
                log.warning("domain '%s' is gone; removing its filters", name)
                if obj.persistent:
                    obj.new_def = obj.definition if obj.definition != live else None
                obj.definition = live
                obj.unlock()
                try:
                    try:
                        self.hypervisor.stop(live)  # what the guest left: its ports
                    except NwfilterError as exc:
                        log.error("domain '%s': cleaning up after it failed: %s", name, exc)
                    with self.lock:
                        for portdev in bound:
                            if bindings(portdev) is not None:
                                self.engine.delete_binding(portdev)
                finally:
                    obj.lock()
                self._mark_shutoff(obj, "crashed")
                if not obj.persistent:
                    self.domains.remove(obj)
                    self.names.release_domain(name)
                self.events.emit(lifecycle(name, "stopped", "crashed"))
                return
            self.names.reserve_ports(name, [p.portdev for p in ports])
            self._adopt(obj, status)
            obj.unlock()
            reconnect = getattr(self.hypervisor, "reconnect", None)
            changed = False
            try:
                self._rebind(live, ports, bindings)
                if callable(reconnect):
                    # the monitor again, and the state QEMU is in now
                    state = reconnect(live)
                    with obj.mutex:
                        if state == "paused" and obj.state is DomainState.RUNNING:
                            obj.set_state(DomainState.PAUSED, "unknown")
                            changed = True
                        elif state == "running" and obj.state is DomainState.PAUSED:
                            obj.set_state(DomainState.RUNNING, "unpaused")
                            changed = True
            except NwfilterError:
                # fail closed: a guest whose filters cannot be applied does not run
                log.error("domain '%s': filters or monitor cannot be taken over; stopping it",
                          name)
                obj.lock()
                obj.job.begin(JobKind.DESTROY, "reconnect", timeout=self.job_timeout)
                try:
                    self._stop_locked(obj, "failed")
                finally:
                    obj.job.end()
                self.events.emit(lifecycle(name, "stopped", "failed"))
                raise
            obj.lock()
            if changed:
                self._save_status(obj)
        finally:
            obj.end_api()

    def _rebind(self, live: DomainDef, ports: Sequence[PortPlan], bindings: BindingLookup) -> None:
        """Create the bindings a running domain lacks or has out of date."""
        want = [binding_for(live, p) for p in ports if p.filtered]
        with self.lock:
            stale = [b for b in want if bindings(b.portdev) not in (None, b)]
            for b in stale:
                self.engine.delete_binding(b.portdev)
            missing = [b for b in want if bindings(b.portdev) is None]
            if missing:
                self.engine.create_bindings(missing)


# -- all drivers of one state root ------------------------------------------------


class DomainManager:
    """Every domain driver of one state root; routes calls by domain type."""

    def __init__(
        self,
        root: Path,
        engine: FilterEngine,
        coordinator: RebuildCoordinator | None = None,
        *,
        hypervisors: Mapping[str, Hypervisor] | None = None,
        netns: str | None = None,
        job_timeout: float = JOB_WAIT_TIME,
        bindings: BindingLookup | None = None,
        mac_source: Callable[[], str] = random_mac,
        events: EventBus | None = None,
        networks: NetworkLookup | None = None,
        loop: EventLoop | None = None,
    ) -> None:
        self.files = DomainFiles(root)
        self.loop = loop
        self.networks = networks
        self.engine = engine
        self.events = events if events is not None else EventBus()
        self.coordinator = coordinator
        self.names = SharedNames()
        self.netns = netns
        self.job_timeout = job_timeout
        self.mac_source = mac_source
        self._given = dict(hypervisors or {})
        self._bindings: BindingLookup = bindings or (lambda portdev: None)
        self._drivers: dict[str, DomainDriver] = {}
        # Guards the dict.  It is held while a new driver registers with the
        # coordinator (whose own mutex is taken under it), so one type never
        # registers twice; nothing else is taken under it.
        self._drivers_lock = threading.Lock()
        self._query_only = False

    @classmethod
    def for_engine(
        cls,
        engine: Engine,
        *,
        hypervisors: Mapping[str, Hypervisor] | None = None,
        netns: str | None = None,
        job_timeout: float = JOB_WAIT_TIME,
        mac_source: Callable[[], str] = random_mac,
        networks: NetworkLookup | None = None,
        loop: EventLoop | None = None,
    ) -> DomainManager:
        """The domains of `engine`'s state root, wired to its coordinator
        and binding table; the engine refuses to bind by hand a port one of
        them holds."""
        manager = cls(
            engine.root,
            engine,
            engine.coordinator,
            hypervisors=hypervisors,
            netns=netns,
            job_timeout=job_timeout,
            bindings=engine.bindings.get,
            mac_source=mac_source,
            events=engine.events,
            networks=networks,
            loop=loop,
        )
        engine.add_port_holder(manager.names.port_holder)
        return manager

    # -- drivers ---------------------------------------------------------------

    def drivers(self) -> list[DomainDriver]:
        with self._drivers_lock:
            return list(self._drivers.values())

    def driver(self, dtype: str) -> DomainDriver:
        """The driver of a domain type, created and registered on first use."""
        with self._drivers_lock:
            found = self._drivers.get(dtype)
            if found is not None:
                return found
        hypervisor = self._given.get(dtype)
        if hypervisor is None:
            run_dir = self.files.hypervisor_dir(dtype)
            if not self._query_only:
                # Checked and cleaned here; the hypervisor opens it again itself.
                with SafeDir.open(run_dir, what="hypervisor directory") as directory:
                    directory.remove_temporaries()
            hypervisor = load_hypervisor(
                dtype, HypervisorEnv(run_dir, self.netns, type=dtype, loop=self.loop))
        with self._drivers_lock:
            found = self._drivers.get(dtype)
            if found is not None:
                return found
            driver = DomainDriver(
                dtype, hypervisor, self.engine, self.files, self.names,
                rank=len(self._drivers), job_timeout=self.job_timeout,
                mac_source=self.mac_source, bindings=self._bindings, events=self.events,
                networks=self.networks,
            )
            if self.coordinator is not None:
                lock = driver.lock

                def set_rank(rank: int) -> None:
                    lock.rank = rank

                # The registration order is the order the filter-change path
                # takes the driver locks in, and becomes the lock's rank; the
                # coordinator sets it before a filter change can see the lock.
                self.coordinator.register_driver(
                    f"domain-{dtype}:{id(self):x}", lock.acquire, lock.release,
                    set_rank=set_rank,
                )
            self._drivers[dtype] = driver
        return driver

    def _driver_of(self, name: str) -> DomainDriver:
        validate_domain_name(name)
        dtype = self.names.domain_type(name)
        if dtype is None:
            raise NotFoundError(f"domain not found: no domain with matching name '{name}'")
        return self.driver(dtype)

    # -- start-up ----------------------------------------------------------------

    def start(self, autostart: bool = False, *, take_over: bool = True) -> None:
        """Load definitions and runtime status, find running domains again,
        re-apply their filters; with `autostart`, start the marked ones.

        With `take_over=False` everything is loaded for queries only (list,
        state, XML, interfaces): running guests are only asked whether they
        are alive, the engine's bindings are neither created nor deleted (so
        a read-only engine will do), no file is written, and every call that
        would change a domain raises `StateError`."""
        if autostart and not take_over:
            raise ValueError("autostart needs take_over")
        self._query_only = not take_over
        files = self.files
        config_dir: SafeDir | None
        status_dir: SafeDir | None
        if take_over:
            config_dir, status_dir = files.configs.reopen(), files.statuses.reopen()
        else:
            config_dir, status_dir = files.configs.existing(), files.statuses.existing()
        marks_dir = files.marks.existing()
        if take_over:
            for directory in (config_dir, status_dir, marks_dir):
                if directory is not None:
                    directory.remove_temporaries()
        for dtype in sorted(self._given):
            self.driver(dtype)
        configs: dict[str, dict[str, DomainDef]] = {}
        for path, data in _read_all(config_dir, ".xml", "domain definition"):
            try:
                definition = _parse(data.decode("utf-8"))
                if f"{definition.name}.xml" != path.name:
                    raise ValidationError(f"holds domain '{definition.name}'")
            except (NwfilterError, ValueError) as exc:
                log.error("skipping domain definition '%s': %s", path, exc)
                continue
            configs.setdefault(definition.type, {})[definition.name] = definition
        statuses: dict[str, dict[str, dict[str, object]]] = {}
        for path, data in _read_all(status_dir, ".json", "domain status"):
            try:
                status = json.loads(data)
                statuses.setdefault(str(status["type"]), {})[str(status["name"])] = status
            except (ValueError, KeyError, TypeError) as exc:
                log.error("skipping domain status '%s': %s", path, exc)
        marks = frozenset(marks_dir.names() if marks_dir is not None else ())
        for dtype in sorted(set(configs) | set(statuses)):
            try:
                driver = self.driver(dtype)
            except NwfilterError as exc:
                log.error("domains of type '%s' are unavailable: %s", dtype, exc)
                continue
            driver.load(configs.get(dtype, {}), statuses.get(dtype, {}), marks, self._bindings,
                        take_over=take_over)
        if autostart:
            for name in sorted(marks):
                try:
                    summary = self.state(name)
                    if summary.id < 0:
                        self.start_domain(name)
                except NwfilterError as exc:
                    log.error("autostart of domain '%s' failed: %s", name, exc)

    # -- the API -------------------------------------------------------------------

    def _writable(self) -> None:
        if self._query_only:
            raise StateError("the domains were loaded for queries only; they cannot be changed")

    def resolve(self, ref: str) -> str:
        """The name of the domain `ref` names: a name, an active domain's id,
        or a UUID (virsh's lookup order)."""
        if self.names.domain_type(ref) is not None:
            return ref
        rows = [r for d in self.drivers() for r in d.summaries()]
        if ref.isdigit():
            for row in rows:
                if row.id >= 0 and str(row.id) == ref:
                    return row.name
        with contextlib.suppress(ValueError):
            wanted = UUID(ref)
            for row in rows:
                if row.uuid == wanted:
                    return row.name
        validate_domain_name(ref)
        raise NotFoundError(f"domain not found: no domain with matching name '{ref}'")

    def define_xml(self, xml: str) -> DomainDef:
        self._writable()
        definition = _parse(xml)
        return self.driver(definition.type).define(definition)

    def define(self, definition: DomainDef) -> DomainDef:
        self._writable()
        return self.driver(definition.type).define(definition)

    def undefine(self, name: str) -> None:
        self._writable()
        self._driver_of(name).undefine(name)

    def start_domain(self, name: str) -> None:
        self._writable()
        self._driver_of(name).start(name)

    def shutdown(self, name: str) -> None:
        self._writable()
        self._driver_of(name).stop(name, reason="shutdown")

    def destroy(self, name: str) -> None:
        self._writable()
        self._driver_of(name).stop(name, reason="destroyed")

    def suspend(self, name: str) -> None:
        self._writable()
        self._driver_of(name).suspend(name)

    def resume(self, name: str) -> None:
        self._writable()
        self._driver_of(name).resume(name)

    def reboot(self, name: str) -> None:
        self._writable()
        self._driver_of(name).reboot(name)

    def set_autostart(self, name: str, enable: bool) -> None:
        self._writable()
        self._driver_of(name).set_autostart(name, enable)

    def list_domains(self, *, all_domains: bool = False) -> list[DomainSummary]:
        """Active domains by id, then (with `all_domains`) inactive ones by name."""
        rows: list[DomainSummary] = []
        for driver in self.drivers():
            rows.extend(driver.summaries())
        active = sorted((r for r in rows if r.id >= 0), key=lambda r: r.id)
        inactive = sorted((r for r in rows if r.id < 0), key=lambda r: r.name)
        return active + (inactive if all_domains else [])

    def state(self, name: str) -> DomainSummary:
        return self._driver_of(name).get(name)[0]

    def dumpxml(self, name: str, *, inactive: bool = False) -> str:
        driver = self._driver_of(name)
        if inactive:
            return driver.persistent_xml(name)
        return _format(driver.get(name)[1])

    def interfaces(self, name: str) -> list[InterfaceRow]:
        summary, definition, ports = self._driver_of(name).get(name)
        by_index = {p.index: p for p in ports} if summary.id >= 0 else {}
        rows = []
        for index, iface in enumerate(definition.interfaces):
            port = by_index.get(index)
            rows.append(_interface_row(iface, port))
        return rows

    def binding_defs(self) -> list[BindingDef]:
        out: list[BindingDef] = []
        for driver in self.drivers():
            out.extend(driver.binding_defs())
        return sorted(out, key=lambda b: b.portdev)

    def stop_all(self) -> None:
        """Destroy every active domain (tests, tools)."""
        for row in self.list_domains():
            with contextlib.suppress(NotFoundError, StateError):
                self.destroy(row.name)


def _set_shutoff(obj: DomainObj, reason: str) -> None:
    """Mark `obj` (locked) inactive; the next persistent definition becomes
    the current one."""
    obj.id = -1
    obj.ports = ()
    obj.set_state(DomainState.SHUTOFF, reason)
    if obj.new_def is not None:
        obj.definition = obj.new_def
        obj.new_def = None


def _interface_row(iface: InterfaceDef, port: PortPlan | None) -> InterfaceRow:
    name = port.portdev if port is not None else (iface.target_dev or "-")
    return InterfaceRow(
        interface=name,
        type=iface.type,
        source=iface.source_bridge or iface.source_network or "-",
        model=iface.model or "-",
        mac=iface.mac or "-",
        filter=iface.filterref.filter if iface.filterref is not None else None,
    )


__all__ = [
    "DomainDriver",
    "DomainFiles",
    "DomainManager",
    "DomainSummary",
    "InterfaceRow",
    "SharedNames",
    "binding_for",
    "random_mac",
    "validate_domain_name",
    "with_ports",
]
