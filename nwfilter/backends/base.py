"""The contract every backend fulfils.

Lifecycle: construct (cheap, no kernel access) → `probe()` (checks that the
technology is usable, changes nothing) → `reconcile()` (an engine's start:
read back what the kernel holds, write only the difference) → any number of
`apply()` calls, each one all-or-nothing → `clear()`/`clear_all()` to remove
what the backend owns.
A backend only ever touches objects it owns, under names derived from the
port, so teardown is "delete what I own" and is idempotent.  Every method is
thread-safe: a backend runs one kernel transaction at a time under its own
lock (level BACKEND), so callers add no lock of their own around it.

What is applied: the backend is its one owner.  `recorded()` answers, per
port, the ruleset the kernel holds as far as the backend knows (set by
`reconcile()` and every accepted `apply()`); the engine keeps no copy.

Deferred rulesets: a start may hand `reconcile()` a `Deferred` for a port
instead of its compiled ruleset: the digest of what it compiles to
(`nwfilter.ir_digest`), known from an earlier compile of the same sources,
and the compile itself.  A backend that can prove from the kernel that the
port holds what that digest stands for keeps it deferred; otherwise, and
whenever the ruleset itself is asked for (`recorded()`, a later apply), it
compiles it then, once.

Ownership: one state root owns a namespace's objects, and the kernel objects
say which (`Owner`).  The engine names its root with `set_owner()` before the
first transaction; every transaction that creates, drops or recreates the
backend's tables first reads the owner and refuses (`ConflictError`, nothing
changed) when another root holds them.  Two roots claiming at once end with
one owner: the kernel refuses the second claim.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from nwfilter.ir import Changes, Port, Ruleset

OWNER_TAG = "nwfilter-owner"


@dataclass(frozen=True)
class Owner:
    """The state root that owns a backend's kernel objects: its absolute
    path (for people) and its random id (what is compared)."""

    root: str
    root_id: str

    def same_root(self, other: Owner | None) -> bool:
        return other is not None and other.root_id == self.root_id

    def describe(self) -> str:
        return f"root '{self.root}' (id {self.root_id})"

    def label(self, limit: int = 120) -> str:
        """The one-line form stored in the kernel: tag, id, path, at most
        `limit` bytes (the path is cut; the id is what counts)."""
        text = f"{OWNER_TAG} {self.root_id} {self.root}"
        return text.encode()[:limit].decode(errors="ignore")

    @classmethod
    def from_label(cls, text: str) -> Owner | None:
        parts = text.split(" ", 2)
        if len(parts) < 2 or parts[0] != OWNER_TAG or not parts[1]:
            return None
        return cls(parts[2] if len(parts) == 3 else "", parts[1])


@dataclass(frozen=True)
class Deferred:
    """A port's ruleset not compiled yet: `digest` is the `ruleset_digest`
    of what `compile()` returns (which must not raise)."""

    port: Port
    digest: str
    compile: Callable[[], Ruleset] = field(compare=False)


Wanted = Ruleset | Deferred


class Recorded(Mapping[str, Ruleset]):
    """What a backend records as applied, per port; a deferred ruleset is
    compiled the first time it is looked up and kept (in `store`, under
    `lock`, which the compile is not run under)."""

    def __init__(self, store: dict[str, Wanted], lock: threading.Lock) -> None:
        self._store = store
        self._lock = lock
        with lock:
            self._items = dict(store)

    def __getitem__(self, portdev: str) -> Ruleset:
        item = self._items[portdev]
        if isinstance(item, Ruleset):
            return item
        ruleset = item.compile()
        self._items[portdev] = ruleset
        with self._lock:
            if self._store.get(portdev) is item:
                self._store[portdev] = ruleset
        return ruleset

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)


def compiled(item: Wanted) -> Ruleset:
    """The ruleset `item` stands for, compiled now if deferred."""
    return item if isinstance(item, Ruleset) else item.compile()


class Backend(Protocol):
    name: str
    netns: str | None  # the network namespace it manages (None: the host's)

    def probe(self) -> None:
        """Raise `UnavailableError` naming what is missing; change nothing."""

    def check(self, ruleset: Ruleset) -> None:
        """Raise `UnsupportedError` if any rule cannot be expressed exactly."""

    def apply(self, changes: Changes) -> None:
        """Install/replace `changes.set` and remove `changes.remove` in one
        transaction.  On failure raise `BackendError` naming the port and the
        rule, and leave the kernel exactly as it was."""

    def reconcile(self, rulesets: Sequence[Wanted]) -> int:
        """Make the kernel hold exactly `rulesets` (one per port; every other
        object of ours goes): read back what it holds, write only what
        differs, in one transaction, or none when nothing differs.  What is
        kept (names, port ids, counters, dynamic set contents) stays.  On
        failure raise `BackendError` and leave the kernel as it was.
        Returns the number of writes (0: the kernel was not written)."""

    def recorded(self) -> Mapping[str, Ruleset]:
        """The ruleset of every port as the kernel holds it (a snapshot;
        deferred rulesets are compiled when looked up)."""

    def clear(self, portdev: str) -> None:
        """Remove everything owned for one port; a no-op if nothing is there."""

    def clear_all(self) -> None:
        """Remove every object this backend owns."""

    def ports(self) -> tuple[str, ...]:
        """The ports this backend currently holds rules for, sorted."""

    def read_back(self, portdev: str) -> str:
        """A human-readable dump of what the kernel holds for the port."""

    def set_owner(self, owner: Owner) -> None:
        """Act for `owner` from now on: transactions that create or recreate
        the tables claim them for it, and refuse if another root holds them."""

    def owner(self) -> Owner | None:
        """The root whose marker the kernel objects carry now (None: no
        objects of ours, or none with a marker); a cheap read."""

    def preconditions(
        self, *, repair: bool = False, scan: bool = True, cached: bool = False
    ) -> tuple[str, ...]:
        """What the layer-3 rules depend on and does not hold now, one
        sentence each (() when all holds).  With `repair`, restore what the
        backend may restore (and log a warning); `scan` also looks for other
        programs' rules that defeat ours (slower: lists foreign tables);
        `cached` reuses the last scan's findings (the daemon's monitor scans
        again after every foreign transaction), for answers on hot paths."""
