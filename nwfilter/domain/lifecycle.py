"""The lifecycle of the domains of one hypervisor type: `DomainDriver`.

define, undefine, autostart, start, stop (shutdown or destroy), suspend,
resume and reboot, each under the domain's job, and the queries.  The
operations a domain can be put through by name are the table `LIFECYCLE`
(verb -> operation), which `DomainManager.run` and the API dispatch on.

Filters follow the domains.  A start plans the ports
(`nwfilter.domain.bindings`), lets the hypervisor prepare them (down),
creates every binding through the engine in one all-or-nothing call, and
only then launches the guest; if any filter cannot be applied the start
fails and leaves nothing behind.  A stop deletes the bindings after the
guest is gone.

Locking (docs/locking.md has the proof).  The driver lock is held only to
look an object up, to change the list, and around the engine calls that
create or delete a domain's bindings; it is never held while waiting for a
job or during a hypervisor call.  The domain lock is never held while the
driver lock, the pool or anything of the engine is taken: a start unlocks
the domain (its job keeps other writers out) before it touches the engine.

Events: each lifecycle change that succeeded is published on the event bus
(`nwfilter.events`) as libvirt names it (`started`/`booted`,
`stopped`/`destroyed`, ...), once the domain's job has ended.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import TYPE_CHECKING

from nwfilter.conf.model import BindingDef, DomainDef
from nwfilter.domain import guestevents
from nwfilter.domain.bindings import (
    FilterEngine,
    NetworkLookup,
    binding_for,
    plan_ports,
    with_ports,
)
from nwfilter.domain.eventloop import Workers
from nwfilter.domain.hypervisor import Hypervisor, PortPlan
from nwfilter.domain.jobs import JOB_WAIT_TIME, JobKind
from nwfilter.domain.objects import DomainObj, DomainObjList, DomainState
from nwfilter.domain.operations import VERBS
from nwfilter.domain.registry import (
    BindingLookup,
    SharedNames,
    check_target_devs,
    random_mac,
    validate_domain_name,
)
from nwfilter.domain.status import DomainFiles, format_xml, status_json
from nwfilter.domain.summary import DomainSummary
from nwfilter.errors import NotFoundError, NwfilterError, StateError, UnsupportedError
from nwfilter.events import EventBus, lifecycle
from nwfilter.locks import Level, LevelledLock

if TYPE_CHECKING:
    from nwfilter.domain.eventloop import EventLoop

log = logging.getLogger(__name__)


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
        loop: EventLoop | None = None,
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
        # event loop and is handled by its workers (`nwfilter.domain.guestevents`).
        self._workers = loop.workers if loop is not None else Workers()
        set_sink = getattr(hypervisor, "set_event_sink", None)
        if callable(set_sink):
            set_sink(self.guest_event)

    # -- files -----------------------------------------------------------------

    def save_config(self, definition: DomainDef) -> None:
        self.files.save_config(definition.name, format_xml(definition))

    def save_status(self, obj: DomainObj) -> None:
        self.files.save_status(obj.name, status_json(obj, self.type))

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
            self.release_name_if_unused(definition.name)
            raise
        try:
            # The file first: the object changes only once the definition is kept.
            self.save_config(definition)
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

    def release_name_if_unused(self, name: str) -> None:
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
                    self.save_status(obj)
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
        ports = plan_ports(dom, self.names, self.bindings, self.networks)
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
            self.save_status(obj)
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
            self.mark_shutoff(obj, "failed")
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
                ports = plan_ports(dom, self.names, self.bindings, self.networks)
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
        killed = False
        if reason == "destroyed" and callable(kill) and obj.is_active():
            # As libvirt does: end the guest before waiting for its job, so a
            # monitor call hung in another thread fails now, not at its timeout.
            dom = obj.definition
            obj.unlock()
            try:
                kill(dom)
                killed = True
            except NwfilterError as exc:
                log.warning("domain '%s': killing it failed: %s", name, exc)
            finally:
                obj.lock()
        try:
            kind = JobKind.DESTROY if reason == "destroyed" else JobKind.MODIFY
            try:
                obj.job.begin(kind, reason, timeout=self.job_timeout)
            except NotFoundError:
                if killed:
                    return  # its exit, handled meanwhile, removed the transient domain
                raise
            try:
                if not obj.is_active():
                    if killed:
                        # The guest's exit (our kill) was handled first, as a
                        # destroy: it is shut off and was told so.
                        return
                    raise StateError(f"domain '{name}' is not running")
                self.stop_locked(obj, reason)
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

    def stop_locked(self, obj: DomainObj, reason: str) -> None:
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
        self.mark_shutoff(obj, reason)

    def mark_shutoff(self, obj: DomainObj, reason: str) -> None:
        set_shutoff(obj, reason)
        self.files.remove_status(obj.name)
        if obj.persistent:
            # The reason outlives this process, so `domstate --reason` tells
            # a destroyed domain from one shut down in the next command too.
            try:
                self.files.save_shutoff(obj.name, reason)
            except NwfilterError as exc:
                log.warning("domain '%s': cannot record why it shut off: %s", obj.name, exc)

    def pause(self, name: str, *, suspend: bool) -> None:
        """Suspend (`suspend`) or resume the domain."""
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
                self.save_status(obj)
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
        """Queue an event of a guest (called from the event loop: never blocks);
        `nwfilter.domain.guestevents` handles it on the loop's workers."""
        self._workers.submit(f"guest-events-{self.type}",
                             functools.partial(guestevents.handle, self, name, kind, reason))

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
            return format_xml(obj.persistent_def())
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


def set_shutoff(obj: DomainObj, reason: str) -> None:
    """Mark `obj` (locked) inactive; the next persistent definition becomes
    the current one."""
    obj.id = -1
    obj.ports = ()
    obj.set_state(DomainState.SHUTOFF, reason)
    if obj.new_def is not None:
        obj.definition = obj.new_def
        obj.new_def = None


#: The lifecycle operations of a domain named by its name, by verb: what
#: `DomainManager.run` dispatches to and the API offers (`domain.<verb>`).
LIFECYCLE: Mapping[str, Callable[[DomainDriver, str], None]] = {
    "undefine": DomainDriver.undefine,
    "start": DomainDriver.start,
    "shutdown": lambda driver, name: driver.stop(name, reason="shutdown"),
    "destroy": lambda driver, name: driver.stop(name, reason="destroyed"),
    "suspend": lambda driver, name: driver.pause(name, suspend=True),
    "resume": lambda driver, name: driver.pause(name, suspend=False),
    "reboot": DomainDriver.reboot,
}
assert tuple(LIFECYCLE) == VERBS
