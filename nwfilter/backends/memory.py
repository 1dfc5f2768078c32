"""The memory backend: records the rulesets it is given instead of touching a kernel.

Used by tests and by dry runs.  It keeps the backend contract exactly:
`apply` is all-or-nothing (a port listed in `fail_on` makes the whole
transaction fail and nothing changes), and every successful transaction
is counted so tests can check how many kernel transactions an operation took.
"""

from __future__ import annotations

import threading

from nwfilter.errors import BackendError
from nwfilter.ir import Changes, Ruleset
from nwfilter.render_text import render_text


class MemoryBackend:
    """Keeps the applied `Ruleset` of each port in memory."""

    name = "memory"

    def __init__(self) -> None:
        self.rulesets: dict[str, Ruleset] = {}
        self.fail_on: set[str] = set()  # ports whose apply fails
        self.transactions = 0  # successful apply() calls
        self.attempts = 0  # every apply() call
        self.probed = False
        self._mutex = threading.Lock()

    def probe(self) -> None:
        self.probed = True

    def check(self, ruleset: Ruleset) -> None:
        """Everything the IR can say is representable here."""

    def apply(self, changes: Changes) -> None:
        with self._mutex:
            self.attempts += 1
            touched = [rs.port.portdev for rs in changes.set] + list(changes.remove)
            for portdev in touched:
                if portdev in self.fail_on:
                    raise BackendError(
                        f"the kernel refused the rules for port '{portdev}' (simulated failure)"
                    )
            if changes.is_empty():
                return
            new = {} if changes.replace_all else dict(self.rulesets)
            for portdev in changes.remove:
                new.pop(portdev, None)
            for rs in changes.set:
                new[rs.port.portdev] = rs
            self.rulesets = new
            self.transactions += 1

    def clear(self, portdev: str) -> None:
        with self._mutex:
            if portdev in self.rulesets:
                new = dict(self.rulesets)
                del new[portdev]
                self.rulesets = new

    def clear_all(self) -> None:
        with self._mutex:
            self.rulesets = {}

    def ports(self) -> tuple[str, ...]:
        return tuple(sorted(self.rulesets))

    def read_back(self, portdev: str) -> str:
        rs = self.rulesets.get(portdev)
        return "" if rs is None else render_text(rs)
