"""What guests do by themselves: pause, resume, exit, panic.

A hypervisor reports these from the event loop (`set_event_sink`, e.g.
QEMU's monitor events and its process going away).  `DomainDriver.guest_event`
hands each one to the loop's workers (`EventLoop.defer`), one queue per
driver, so they are handled in order and off the loop thread: handling
waits for the domain's job, which no loop callback may.  `handle` looks
the domain up by name: an event for a domain that was destroyed or removed
meanwhile finds it inactive or gone and does nothing; no event keeps a
pointer to a domain object.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from nwfilter.conf.model import DomainDef
from nwfilter.domain.hypervisor import Hypervisor
from nwfilter.domain.jobs import JobKind
from nwfilter.domain.objects import DomainState
from nwfilter.errors import NotFoundError, NwfilterError
from nwfilter.events import lifecycle

if TYPE_CHECKING:
    from nwfilter.domain.lifecycle import DomainDriver

log = logging.getLogger(__name__)

# How long a guest whose monitor closed may take to exit.
EXIT_GRACE = 10.0


def handle(driver: DomainDriver, name: str, kind: str, reason: str) -> None:
    """Handle one guest event (a worker thread); errors are logged."""
    try:
        _handle(driver, name, kind, reason)
    except NwfilterError as exc:
        log.error("domain '%s': handling guest event '%s' failed: %s", name, kind, exc)


def _handle(driver: DomainDriver, name: str, kind: str, reason: str) -> None:
    try:
        obj = driver.domains.lookup_by_name(name)
    except NotFoundError:
        return
    emitted: list[tuple[str, str]] = []
    try:
        obj.job.begin(JobKind.MODIFY, f"guest event '{kind}'", timeout=driver.job_timeout)
        try:
            if not obj.is_active():
                return
            dom = obj.definition
            if kind in ("exited", "panicked"):
                if kind == "exited":
                    with obj.job.monitor(require_active=False):
                        alive = still_alive(driver.hypervisor, dom)
                    if alive:
                        log.info("domain '%s' runs again; an older process exited", name)
                        return
                reason = "crashed" if kind == "panicked" else reason
                log.warning("domain '%s' stopped by itself (%s); removing its filters",
                            name, reason)
                driver.stop_locked(obj, reason)
                if reason == "shutdown":
                    emitted.append(("shutdown", "finished"))
                emitted.append(("stopped", reason))
            elif kind in ("paused", "running"):
                # The event may be old news (a suspend's own STOP, handled
                # after a resume): the guest's state now decides.
                now = getattr(driver.hypervisor, "guest_state", None)
                if callable(now):
                    with obj.job.monitor():
                        kind = now(dom)
            if kind == "paused" and obj.state is DomainState.RUNNING:
                obj.set_state(DomainState.PAUSED, "unknown")
                driver.save_status(obj)
                emitted.append(("suspended", "paused"))
            elif kind == "running" and obj.state is DomainState.PAUSED:
                obj.set_state(DomainState.RUNNING, "unpaused")
                driver.save_status(obj)
                emitted.append(("resumed", "unpaused"))
        finally:
            obj.job.end()
        if not obj.is_active() and not obj.persistent:
            driver.domains.remove(obj)
            driver.names.release_domain(name)
    finally:
        obj.end_api()
    for event, detail in emitted:
        driver.events.emit(lifecycle(name, event, detail))


def still_alive(hypervisor: Hypervisor, dom: DomainDef) -> bool:
    """Whether the guest is alive after an exit event: a process that
    closed its monitor may take a moment to be gone; one that lives on
    after `EXIT_GRACE` is a newer process of the domain."""
    deadline = time.monotonic() + EXIT_GRACE
    while hypervisor.is_alive(dom):
        if time.monotonic() > deadline:
            return True
        time.sleep(0.02)
    return False
