"""The memory backend: records the rulesets it is given instead of touching a kernel.

Used by tests and by dry runs.  It keeps the backend contract exactly:
`apply` is all-or-nothing (a port listed in `fail_on` makes the whole
transaction fail and nothing changes), and every successful transaction
is counted so tests can check how many kernel transactions an operation took.

Ownership is kept as a kernel would: a `MemoryHost` stands for one network
namespace and remembers which root holds it while rules are applied.  Each
backend gets a private host unless one is shared, so tests can put two roots
on one "namespace" without root privileges.  `preconditions` reports what a
test puts in `MemoryHost.broken`.
"""

from __future__ import annotations

import threading

from nwfilter.backends.base import Owner
from nwfilter.errors import BackendError, ConflictError
from nwfilter.ir import Changes, Ruleset
from nwfilter.render_text import render_text


class MemoryHost:
    """One simulated namespace: who owns it, and what is broken in it."""

    def __init__(self) -> None:
        self.owner: Owner | None = None
        self.broken: list[str] = []  # layer-3 preconditions that do not hold
        self.mutex = threading.Lock()


class MemoryBackend:
    """Keeps the applied `Ruleset` of each port in memory."""

    name = "memory"

    def __init__(self, netns: str | None = None, *, host: MemoryHost | None = None) -> None:
        self.netns = netns
        self.host = host or MemoryHost()
        self._owner: Owner | None = None
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
            with self.host.mutex:
                self._check_owner()
                self.host.owner = self._owner if new else None
            self.rulesets = new
            self.transactions += 1

    def _check_owner(self) -> None:
        held = self.host.owner
        if held is not None and self._owner is not None and not held.same_root(self._owner):
            raise ConflictError(
                f"namespace {self.netns or 'of the host'} is owned by {held.describe()}; "
                "nothing was changed"
            )

    def clear(self, portdev: str) -> None:
        with self._mutex:
            if portdev in self.rulesets:
                new = dict(self.rulesets)
                del new[portdev]
                with self.host.mutex:
                    self._check_owner()
                    if not new:
                        self.host.owner = None
                self.rulesets = new

    def clear_all(self) -> None:
        with self._mutex:
            with self.host.mutex:
                self._check_owner()
                self.host.owner = None
            self.rulesets = {}

    def set_owner(self, owner: Owner) -> None:
        self._owner = owner

    def owner(self) -> Owner | None:
        return self.host.owner

    def preconditions(self, *, repair: bool = False, scan: bool = True) -> tuple[str, ...]:
        return tuple(self.host.broken)

    def ports(self) -> tuple[str, ...]:
        return tuple(sorted(self.rulesets))

    def read_back(self, portdev: str) -> str:
        rs = self.rulesets.get(portdev)
        return "" if rs is None else render_text(rs)
