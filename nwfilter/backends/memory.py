"""The memory backend: records the rulesets it is given instead of touching a kernel.

Used by tests and by dry runs.  It keeps the backend contract exactly:
`apply` is all-or-nothing (a port listed in `fail_on` makes the whole
transaction fail and nothing changes), and every successful transaction
is counted so tests can check how many kernel transactions an operation took.

The "kernel" is a `MemoryHost`: it stands for one network namespace, holds
the rulesets applied there (`MemoryHost.rulesets`) and remembers which root
holds it while rules are applied.  `reconcile` compares what the host holds
with what it is given and counts a transaction only when they differ, so a
restart with nothing changed makes none, as on a real kernel.  Each
backend gets a private host unless one is shared, so tests can put two roots
on one "namespace" without root privileges.  `preconditions` reports what a
test puts in `MemoryHost.broken`.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence

from nwfilter.backends.base import Owner, Wanted, compiled
from nwfilter.errors import BackendError, ConflictError
from nwfilter.ir import Changes, Ruleset
from nwfilter.render_text import render_text


class MemoryHost:
    """One simulated namespace: what it holds, who owns it, what is broken in it."""

    def __init__(self) -> None:
        self.rulesets: dict[str, Ruleset] = {}  # what the "kernel" holds, per port
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
        self._recorded: dict[str, Ruleset] = {}  # what this backend applied
        self.fail_on: set[str] = set()  # ports whose apply fails
        self.transactions = 0  # successful apply() calls
        self.attempts = 0  # every apply() call
        self.probed = False
        self._mutex = threading.Lock()

    def probe(self) -> None:
        self.probed = True

    def check(self, ruleset: Ruleset) -> None:
        """Everything the IR can say is representable here."""

    @property
    def rulesets(self) -> dict[str, Ruleset]:
        """What the simulated kernel holds (tests may set it, as leftovers
        of an earlier process)."""
        return self.host.rulesets

    @rulesets.setter
    def rulesets(self, value: dict[str, Ruleset]) -> None:
        self.host.rulesets = value

    def recorded(self) -> dict[str, Ruleset]:
        with self._mutex:
            return dict(self._recorded)

    def reconcile(self, rulesets: Sequence[Wanted]) -> int:
        # Nothing here proves a ruleset without it: deferred ones compile now.
        return self._reconcile([compiled(item) for item in rulesets])

    def _reconcile(self, rulesets: list[Ruleset]) -> int:
        with self._mutex:
            self.attempts += 1
            wanted = {rs.port.portdev: rs for rs in rulesets}
            if len(wanted) != len(rulesets):
                raise BackendError("a port is given twice to reconcile")
            held = self.host.rulesets
            differ = sorted(
                p for p in set(wanted) | set(held) if wanted.get(p) != held.get(p))
            for portdev in differ:
                if portdev in self.fail_on:
                    raise BackendError(
                        f"the kernel refused the rules for port '{portdev}' (simulated failure)"
                    )
            with self.host.mutex:
                self._check_owner()
                if differ:
                    self.host.owner = self._owner if wanted else None
            if differ:
                # What is equal stays as it was, as a kernel keeps it.
                self.host.rulesets = {p: held[p] if held.get(p) == rs else rs
                                      for p, rs in wanted.items()}
                self.transactions += 1
            self._recorded = dict(wanted)
            return len(differ)

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
            new = {} if changes.replace_all else dict(self.host.rulesets)
            mine = {} if changes.replace_all else dict(self._recorded)
            for portdev in changes.remove:
                new.pop(portdev, None)
                mine.pop(portdev, None)
            for rs in changes.set:
                new[rs.port.portdev] = rs
                mine[rs.port.portdev] = rs
            with self.host.mutex:
                self._check_owner()
                self.host.owner = self._owner if new else None
            self.host.rulesets = new
            self._recorded = mine
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
            if portdev in self.host.rulesets:
                new = dict(self.host.rulesets)
                del new[portdev]
                with self.host.mutex:
                    self._check_owner()
                    if not new:
                        self.host.owner = None
                self.host.rulesets = new
            self._recorded.pop(portdev, None)

    def clear_all(self) -> None:
        with self._mutex:
            with self.host.mutex:
                self._check_owner()
                self.host.owner = None
            self.host.rulesets = {}
            self._recorded = {}

    def set_owner(self, owner: Owner) -> None:
        self._owner = owner

    def owner(self) -> Owner | None:
        return self.host.owner

    def preconditions(
        self, *, repair: bool = False, scan: bool = True, cached: bool = False
    ) -> tuple[str, ...]:
        return tuple(self.host.broken)

    def ports(self) -> tuple[str, ...]:
        return tuple(sorted(self.host.rulesets))

    def read_back(self, portdev: str) -> str:
        rs = self.host.rulesets.get(portdev)
        return "" if rs is None else render_text(rs)
