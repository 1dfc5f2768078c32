"""nwfilterd's periodic audit: the whole audit every `interval` seconds, in
a thread of its own, told as events.

Each round runs `Auditor.findings` over every bound port (the audit
`nwfilter audit` shows) and compares its findings with the last round's,
by `Finding.key` (check, port, filter, rule, message): a finding that
was not there before is published as an `audit` event with state
`found`, one that is gone as an `audit` event with state `resolved`; a
finding that stays publishes nothing again.  The first round publishes
every finding it makes.  The event concerns the finding's port (object
`port`), else its filter (`filter`), else the namespace.

A round that saw the pool, the bindings or the learnt addresses change
while it ran (`Engine.generation`) may compare the kernel with rules
compiled before the change: its findings are dropped and the next round
decides.  Drift the nft monitor repairs between two rounds is never seen;
drift a round saw is `resolved` by the next one once repaired.

Locks: a round holds no lock of its own while it audits; the audit takes
the engine's locks in the documented order, for memory work only, and the
backend's lock for each kernel read (docs/locking.md).  The findings of a
round are published after the audit, with no lock held.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

from nwfilter.audit.findings import Finding, sort_findings
from nwfilter.audit.run import Auditor
from nwfilter.events import EventBus, EventKind

if TYPE_CHECKING:
    from nwfilter.domain.manager import DomainManager
    from nwfilter.engine import Engine

log = logging.getLogger(__name__)


def event_target(finding: Finding, namespace: str) -> tuple[str, str]:
    """(object, name) of the event that tells of `finding`."""
    if finding.port:
        return "port", finding.port
    if finding.filter:
        return "filter", finding.filter
    return "namespace", namespace


class PeriodicAudit:
    """Audits `engine` every `interval` seconds and publishes what changed."""

    def __init__(
        self,
        engine: Engine,
        domains: Callable[[], DomainManager | None],
        interval: float,
        *,
        auditor: Auditor | None = None,
        events: EventBus | None = None,
    ) -> None:
        if interval <= 0:
            raise ValueError("the interval of a periodic audit must be positive")
        self.engine = engine
        self.interval = interval
        self.auditor = auditor if auditor is not None else Auditor()
        self.events = events if events is not None else engine.events
        self._domains = domains
        self._known: dict[tuple[str, ...], Finding] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.rounds = 0  # rounds whose findings were compared
        self.last_error: Exception | None = None

    def start(self) -> None:
        if self._thread is not None:
            return
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="periodic audit", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.run_once()
            except Exception as exc:  # keep auditing; the next round retries
                self.last_error = exc
                log.error("periodic audit failed: %s", exc)

    def run_once(self) -> bool:
        """One round; False when the state moved under it (nothing published)."""
        before = self.engine.generation()
        _count, findings = self.auditor.findings(self.engine, self._domains())
        if self.engine.generation() != before:
            log.debug("periodic audit: the bindings or filters changed meanwhile; "
                      "the next round decides")
            return False
        current = {f.key(): f for f in findings}
        found = sort_findings(f for k, f in current.items() if k not in self._known)
        resolved = sort_findings(f for k, f in self._known.items() if k not in current)
        self._known = current
        self.rounds += 1
        namespace = self.engine.backend.netns or "host"
        for state, items in (("resolved", resolved), ("found", found)):
            for finding in items:
                obj, name = event_target(finding, namespace)
                self.events.publish(EventKind.AUDIT, obj, name,
                                    {"state": state, "finding": finding.as_json()})
        if found or resolved:
            log.info("periodic audit: %d new finding(s), %d resolved, %d in all",
                     len(found), len(resolved), len(current))
        return True
