"""All domain drivers of one state root: `DomainManager`.

It keeps one `DomainDriver` (`nwfilter.domain.lifecycle`) per hypervisor
type, created on first use (the domain XML `type` attribute picks the
hypervisor, see `nwfilter.domain.hypervisor`), the names shared by all of
them (`nwfilter.domain.registry`) and the files of the state root
(`nwfilter.domain.status`).  It routes every call by the domain's type:
`run(verb, name)` dispatches a lifecycle operation through the table
`LIFECYCLE`; `start` finds the domains of the root again
(`nwfilter.domain.reconnect`).

Each driver registers its lock with the rebuild coordinator, so a filter
change holds every driver lock while it rebuilds (docs/locking.md).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING
from uuid import UUID

from nwfilter.conf.model import BindingDef, DomainDef
from nwfilter.domain import reconnect
from nwfilter.domain.bindings import FilterEngine, NetworkLookup
from nwfilter.domain.hypervisor import Hypervisor, HypervisorEnv, load_hypervisor
from nwfilter.domain.jobs import JOB_WAIT_TIME
from nwfilter.domain.lifecycle import LIFECYCLE, DomainDriver
from nwfilter.domain.registry import BindingLookup, SharedNames, random_mac, validate_domain_name
from nwfilter.domain.status import DomainFiles, format_xml, parse_xml
from nwfilter.domain.summary import DomainSummary, InterfaceRow, interface_row
from nwfilter.errors import NotFoundError, NwfilterError, StateError, ValidationError
from nwfilter.events import EventBus
from nwfilter.fileio import SafeDir
from nwfilter.rebuild import RebuildCoordinator

if TYPE_CHECKING:
    from nwfilter.domain.eventloop import EventLoop
    from nwfilter.engine import Engine

log = logging.getLogger(__name__)


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
                networks=self.networks, loop=self.loop,
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
        configs, statuses, marks = reconnect.read_root(self.files, take_over=take_over)
        for dtype in sorted(self._given):
            self.driver(dtype)
        for dtype in sorted(set(configs) | set(statuses)):
            try:
                driver = self.driver(dtype)
            except NwfilterError as exc:
                log.error("domains of type '%s' are unavailable: %s", dtype, exc)
                continue
            reconnect.load(driver, configs.get(dtype, {}), statuses.get(dtype, {}), marks,
                           self._bindings, take_over=take_over)
        if autostart:
            for name in sorted(marks):
                try:
                    summary = self.state(name)
                    if summary.id < 0:
                        self.run("start", name)
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
        definition = parse_xml(xml)
        return self.driver(definition.type).define(definition)

    def define(self, definition: DomainDef) -> DomainDef:
        self._writable()
        return self.driver(definition.type).define(definition)

    def run(self, verb: str, name: str) -> None:
        """Put domain `name` through the lifecycle operation `verb` (one of
        `LIFECYCLE`: start, shutdown, destroy, ...) of its type's driver."""
        operation = LIFECYCLE.get(verb)
        if operation is None:
            raise ValidationError(f"unknown domain operation '{verb}'")
        self._writable()
        operation(self._driver_of(name), name)

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
        return format_xml(driver.get(name)[1])

    def interfaces(self, name: str) -> list[InterfaceRow]:
        summary, definition, ports = self._driver_of(name).get(name)
        by_index = {p.index: p for p in ports} if summary.id >= 0 else {}
        rows = []
        for index, iface in enumerate(definition.interfaces):
            port = by_index.get(index)
            rows.append(interface_row(iface, port))
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
                self.run("destroy", row.name)
