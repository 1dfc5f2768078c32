"""The contract every backend fulfils.

Lifecycle: construct (cheap, no kernel access) → `probe()` (checks that the
technology is usable, changes nothing) → any number of `apply()` calls, each
one all-or-nothing → `clear()`/`clear_all()` to remove what the backend owns.
A backend only ever touches objects it owns, under names derived from the
port, so teardown is "delete what I own" and is idempotent.  Every method is
thread-safe: a backend runs one kernel transaction at a time under its own
lock (level BACKEND), so callers add no lock of their own around it.
"""

from __future__ import annotations

from typing import Protocol

from nwfilter.ir import Changes, Ruleset


class Backend(Protocol):
    name: str

    def probe(self) -> None:
        """Raise `UnavailableError` naming what is missing; change nothing."""

    def check(self, ruleset: Ruleset) -> None:
        """Raise `UnsupportedError` if any rule cannot be expressed exactly."""

    def apply(self, changes: Changes) -> None:
        """Install/replace `changes.set` and remove `changes.remove` in one
        transaction.  On failure raise `BackendError` naming the port and the
        rule, and leave the kernel exactly as it was."""

    def clear(self, portdev: str) -> None:
        """Remove everything owned for one port; a no-op if nothing is there."""

    def clear_all(self) -> None:
        """Remove every object this backend owns."""

    def ports(self) -> tuple[str, ...]:
        """The ports this backend currently holds rules for, sorted."""

    def read_back(self, portdev: str) -> str:
        """A human-readable dump of what the kernel holds for the port."""
