"""Finding the domains of a state root again after a restart.

`read_root` reads the definitions, runtime status files and autostart marks
(`nwfilter.domain.status`); `load` hands one type's share to its driver:
each definition becomes an inactive domain, and each status file names a
domain that was running.  A guest found alive is taken over — its port
names reserved again, its bindings re-applied (`rebind`: the missing or
out-of-date ones), its monitor reconnected — and a guest found gone is
shut off as `crashed`, its leftover ports and bindings removed.  Fail
closed: a guest whose filters cannot be re-applied is stopped.

With `take_over=False` (queries only) both are just read: guests are asked
whether they are alive and nothing else, no binding is created or deleted
and no file is written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from nwfilter.conf.model import DomainDef
from nwfilter.domain.bindings import binding_for
from nwfilter.domain.hypervisor import PortPlan
from nwfilter.domain.jobs import JobKind
from nwfilter.domain.objects import DomainObj, DomainState
from nwfilter.domain.registry import BindingLookup
from nwfilter.domain.status import DomainFiles, DomainStatus, parse_xml, read_all, read_status
from nwfilter.errors import NwfilterError, ValidationError
from nwfilter.events import lifecycle
from nwfilter.fileio import SafeDir

if TYPE_CHECKING:
    from nwfilter.domain.lifecycle import DomainDriver

log = logging.getLogger(__name__)

#: definitions and status files by domain type, then by name
Configs = dict[str, dict[str, DomainDef]]
Statuses = dict[str, dict[str, dict[str, object]]]


def read_root(
    files: DomainFiles, *, take_over: bool
) -> tuple[Configs, Statuses, frozenset[str]]:
    """The definitions, status files and autostart marks of a state root;
    with `take_over`, its leftover temporary files are removed first.  A
    file that cannot be read is logged and left out."""
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
    configs: Configs = {}
    for path, data in read_all(config_dir, ".xml", "domain definition"):
        try:
            definition = parse_xml(data.decode("utf-8"))
            if f"{definition.name}.xml" != path.name:
                raise ValidationError(f"holds domain '{definition.name}'")
        except (NwfilterError, ValueError) as exc:
            log.error("skipping domain definition '%s': %s", path, exc)
            continue
        configs.setdefault(definition.type, {})[definition.name] = definition
    statuses: Statuses = {}
    for path, data in read_all(status_dir, ".json", "domain status"):
        try:
            status = json.loads(data)
            statuses.setdefault(str(status["type"]), {})[str(status["name"])] = status
        except (ValueError, KeyError, TypeError) as exc:
            log.error("skipping domain status '%s': %s", path, exc)
    marks = frozenset(marks_dir.names() if marks_dir is not None else ())
    return configs, statuses, marks


def load(
    driver: DomainDriver,
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
            _load_config(driver, definition, name in autostart, save=take_over)
        except NwfilterError as exc:
            log.error("skipping domain definition '%s': %s", name, exc)
    for name, raw in sorted(statuses.items()):
        try:
            status = read_status(name, raw)
            if take_over:
                _reconnect(driver, name, status, bindings)
            else:
                _load_status(driver, name, status)
        except NwfilterError as exc:
            log.error("domain '%s': cannot take over its running state: %s", name, exc)


def _load_config(
    driver: DomainDriver, definition: DomainDef, autostart: bool, *, save: bool
) -> None:
    name = definition.name
    driver.names.claim_domain(name, definition.uuid, driver.type)
    # A definition written by hand may lack MACs: generate them once and
    # (when allowed to write) keep them, so they stay the same next time.
    full = driver.with_macs(definition)
    if save and full is not definition:
        try:
            driver.save_config(full)
        except NwfilterError as exc:
            log.error("domain '%s': cannot store its generated MACs: %s", name, exc)
    try:
        obj, _ = driver.domains.add(full, persistent=True)
    except NwfilterError:
        driver.release_name_if_unused(name)
        raise
    obj.autostart = autostart
    reason = driver.files.shutoff_reason(name)
    if reason in ("shutdown", "destroyed", "crashed", "failed", "saved", "migrated"):
        obj.set_state(DomainState.SHUTOFF, reason)
    obj.end_api()


def _persistent_name(driver: DomainDriver, name: str) -> bool:
    return name in {n for n, _ in driver.names.domain_names()}


def _adopt(driver: DomainDriver, obj: DomainObj, status: DomainStatus) -> None:
    """Make `obj` (locked) active with the state its status file records."""
    if obj.persistent:
        obj.new_def = obj.definition if obj.definition != status.live else None
    obj.definition = status.live
    obj.id = status.id if status.id is not None else driver.names.new_id()
    driver.names.seen_id(obj.id)
    obj.set_state(status.state, status.reason)
    obj.ports = status.ports


def _load_status(driver: DomainDriver, name: str, status: DomainStatus) -> None:
    """Queries only: show an active domain as its status file says, or
    shut off if its guest is gone; change nothing."""
    persistent = status.persistent and _persistent_name(driver, name)
    alive = driver.hypervisor.is_alive(status.live)
    if not alive and not persistent:
        return  # a transient domain whose guest is gone no longer exists
    driver.names.claim_domain(name, status.live.uuid, driver.type)
    obj, _ = driver.domains.add(status.live, persistent=persistent)
    try:
        if alive:
            _adopt(driver, obj, status)
        else:
            obj.set_state(DomainState.SHUTOFF, "crashed")
    finally:
        obj.end_api()


def _reconnect(
    driver: DomainDriver, name: str, status: DomainStatus, bindings: BindingLookup
) -> None:
    live, ports = status.live, status.ports
    persistent = status.persistent and _persistent_name(driver, name)
    driver.names.claim_domain(name, live.uuid, driver.type)
    obj, _ = driver.domains.add(live, persistent=persistent)
    try:
        bound = [p.portdev for p in ports if p.filtered]
        if not driver.hypervisor.is_alive(live):
            log.warning("domain '%s' is gone; removing its filters", name)
            if obj.persistent:
                obj.new_def = obj.definition if obj.definition != live else None
            obj.definition = live
            obj.unlock()
            try:
                try:
                    driver.hypervisor.stop(live)  # what the guest left: its ports
                except NwfilterError as exc:
                    log.error("domain '%s': cleaning up after it failed: %s", name, exc)
                with driver.lock:
                    for portdev in bound:
                        if bindings(portdev) is not None:
                            driver.engine.delete_binding(portdev)
            finally:
                obj.lock()
            driver.mark_shutoff(obj, "crashed")
            if not obj.persistent:
                driver.domains.remove(obj)
                driver.names.release_domain(name)
            driver.events.emit(lifecycle(name, "stopped", "crashed"))
            return
        driver.names.reserve_ports(name, [p.portdev for p in ports])
        _adopt(driver, obj, status)
        obj.unlock()
        reconnect = getattr(driver.hypervisor, "reconnect", None)
        changed = False
        try:
            rebind(driver, live, ports, bindings)
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
            obj.job.begin(JobKind.DESTROY, "reconnect", timeout=driver.job_timeout)
            try:
                driver.stop_locked(obj, "failed")
            finally:
                obj.job.end()
            driver.events.emit(lifecycle(name, "stopped", "failed"))
            raise
        obj.lock()
        if changed:
            driver.save_status(obj)
    finally:
        obj.end_api()


def rebind(
    driver: DomainDriver, live: DomainDef, ports: Sequence[PortPlan], bindings: BindingLookup
) -> None:
    """Create the bindings a running domain lacks or has out of date."""
    want = [binding_for(live, p) for p in ports if p.filtered]
    with driver.lock:
        stale = [b for b in want if bindings(b.portdev) not in (None, b)]
        for b in stale:
            driver.engine.delete_binding(b.portdev)
        missing = [b for b in want if bindings(b.portdev) is None]
        if missing:
            driver.engine.create_bindings(missing)
