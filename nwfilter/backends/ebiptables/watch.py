"""Self-healing for the ebtables/iptables backend while nwfilterd runs.

The restore tools report nothing when another program flushes or edits a
chain, so the daemon looks: every `interval` seconds one thread reads the
three tables back (`*-save`, three processes) and the backend writes only
what differs from what it applied last (`EbiptablesBackend.repair`).
Unchanged chains mean no restore run.  A repair is logged and published
as a `drift-repaired` event, like the nft monitor's.
"""

from __future__ import annotations

import logging
import threading

from nwfilter.backends.ebiptables.backend import EbiptablesBackend
from nwfilter.errors import NwfilterError
from nwfilter.events import EventBus, EventKind

log = logging.getLogger(__name__)

INTERVAL = 2.0


class DriftWatch:
    """Repairs foreign edits of the backend's chains, `interval` s apart."""

    def __init__(
        self, backend: EbiptablesBackend, *, events: EventBus | None = None,
        interval: float = INTERVAL,
    ) -> None:
        self.backend = backend
        self.events = events or EventBus()
        self.interval = interval
        self.repairs = 0
        self.last_error: NwfilterError | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._thread is None:
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="ebiptables-watch",
                                            daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    def check(self) -> int:
        """One look: the restore runs a repair took (0: nothing had changed)."""
        writes = self.backend.repair()
        if writes:
            self.repairs += 1
            where = self.backend.netns or "host"
            log.warning("ebtables/iptables chains in %s repaired after a foreign change "
                        "(%d restore run(s))", where, writes)
            self.events.publish(EventKind.DRIFT_REPAIRED, "namespace", where,
                                {"by": [], "restores": writes, "lost_events": False})
        return writes

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.check()
            except NwfilterError as exc:  # keep watching; the next look retries
                self.last_error = exc
                log.error("ebtables/iptables repair failed: %s", exc)
