"""The engine: the filter pool, the active bindings and a backend, wired together.

`Engine` owns the operations that change what the kernel enforces:
defining and undefining filters (rebuilding every affected binding in one
transaction), creating and deleting bindings, reconciling the kernel with
every binding at start, and re-applying a port after IP learning.  What
is applied is the backend's to know (`Backend.recorded`); the engine keeps
no copy (only, for audits, what each port last compiled to and from what:
`compile_bindings`).

Failure rules: every change compiles in memory first, then makes one
kernel transaction, then writes files.  If the kernel refuses, nothing
changes; if a file write fails after the kernel said yes, the previous
rules are applied again.

Lock order (never upwards): all VM drivers (`RebuildCoordinator`) → the
commit slot of binding creates (`nwfilter.groupcommit`) → filter pool →
binding table → backend transaction.

Host and ownership: at start the engine checks (and at first use records)
the host its root manages (`nwfilter.hostrecord`), names its root to the
backend, and refuses to start when another root owns the kernel objects.
It never reports a port as filtered while the kernel says otherwise:
`enforcement()` names, per port, why its rules are not in force (another
root's tables, a broken layer-3 precondition).

Events: each change that succeeded (the kernel and the files agree) is
published on the engine's event bus (`nwfilter.events`) once its locks
are released: filter defined (and the rebuild it made) or undefined,
binding created or deleted.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import ipaddress
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from uuid import UUID

from nwfilter import hostrecord
from nwfilter.backends.base import Backend, Deferred, Owner, Wanted, compiled
from nwfilter.bindings import BindingTable
from nwfilter.compile import Compiler, port_of
from nwfilter.compile.compiler import LEARNT_SET_VARS, LearntSetUnfit
from nwfilter.conf import parse_filter
from nwfilter.conf.model import BindingDef, FilterDef
from nwfilter.conf.values import check_port_name
from nwfilter.errors import (
    ConflictError,
    NotFoundError,
    NwfilterError,
    StateError,
    UndefinedVariableError,
)
from nwfilter.events import EventBus, EventKind
from nwfilter.gcpause import gc_paused
from nwfilter.groupcommit import CommitQueue, Pending, copy_error
from nwfilter.ir import Changes, Hook, Learning, LearntAddr, Ruleset, drop_all
from nwfilter.ir_digest import Memo, ruleset_digest
from nwfilter.learn.policy import (
    LEARNT_VAR,
    learning_mode,
    learning_rules,
    learning_ruleset,
    learns,
)
from nwfilter.learn.store import LearntAddress, LearntStore
from nwfilter.pool import FilterPool, UndefineResult
from nwfilter.printable import printable
from nwfilter.progress import ProgressHook, counted, no_progress
from nwfilter.rebuild import RebuildCoordinator
from nwfilter.render_text import render_lines
from nwfilter.rootlock import RootLock
from nwfilter.sourcestamp import CompiledIndex, SourceStamps

log = logging.getLogger(__name__)

#: who holds a host port (a domain's name and UUID), or None
PortHolder = Callable[[str], "tuple[str, UUID] | None"]


@dataclass(frozen=True)
class PortDiff:
    """How one port's rules change, as `render_text` lines."""

    portdev: str
    added: tuple[str, ...]
    removed: tuple[str, ...]


@dataclass(frozen=True)
class DefineOutcome:
    """What `define_filter` did, or with `dry_run` would do."""

    name: str
    uuid: str
    created: bool
    changed: bool
    dry_run: bool
    rebuilt: tuple[str, ...] = ()  # portdevs whose rules were (or would be) rebuilt
    diffs: tuple[PortDiff, ...] = ()
    warnings: tuple[str, ...] = field(default=())

    def describe(self) -> str:
        """A human-readable summary (the plan, for a dry run)."""
        verb = "would be" if self.dry_run else "was"
        if not self.changed:
            head = f"Network filter {printable(self.name)} is unchanged; no port needs rebuilding"
            return head + "\n"
        kind = "defined" if self.created else "redefined"
        lines = [f"Network filter {printable(self.name)} {verb} {kind}"]
        if not self.rebuilt:
            lines.append("No bound port uses it.")
        else:
            lines.append(
                f"{len(self.rebuilt)} port{'s' if len(self.rebuilt) != 1 else ''} "
                f"{'would be' if self.dry_run else 'were'} rebuilt: {', '.join(self.rebuilt)}"
            )
        for diff in self.diffs:
            if not diff.added and not diff.removed:
                lines.append(f"  {diff.portdev}: rules unchanged")
                continue
            lines.append(f"  {diff.portdev}:")
            lines.extend(f"    - {line}" for line in diff.removed)
            lines.extend(f"    + {line}" for line in diff.added)
        lines.extend(f"warning: {printable(w)}" for w in self.warnings)
        return "\n".join(lines) + "\n"


def diff_rulesets(portdev: str, old: Ruleset | None, new: Ruleset | None) -> PortDiff:
    """The rule lines removed and added going from `old` to `new`."""
    before = render_lines(old) if old is not None else []
    after = render_lines(new) if new is not None else []
    added: list[str] = []
    removed: list[str] = []
    matcher = difflib.SequenceMatcher(a=before, b=after, autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag in ("replace", "delete"):
            removed.extend(before[i1:i2])
        if tag in ("replace", "insert"):
            added.extend(after[j1:j2])
    return PortDiff(portdev, tuple(added), tuple(removed))


@dataclass(frozen=True)
class FiltersReplaced:
    """What `replace_filters` did."""

    defined: tuple[str, ...]
    undefined: tuple[str, ...]
    rebuilt: tuple[str, ...]  # portdevs whose rules were rebuilt
    warnings: tuple[str, ...]  # ports that kept their rules, and why


@dataclass(frozen=True)
class _PreparedDefine:
    """Rulesets compiled for a define before its locks were taken."""

    pool_generation: int
    bindings_generation: int
    affected: tuple[BindingDef, ...]
    rulesets: tuple[Ruleset, ...]


def _set_addresses(
    details: Mapping[str, Sequence[LearntAddress]],
    values: Mapping[str, Sequence[str]],
    versions: frozenset[int],
) -> tuple[LearntAddr, ...]:
    """The elements of a port's learnt address sets: each learnt `IP`/`IPV6`
    address (with its lease) of a version the rules use."""
    out: set[LearntAddr] = set()
    for var, version in LEARNT_SET_VARS.items():
        if version not in versions:
            continue
        known = {a.address: a for a in details.get(var, ())}
        for text in values.get(var, ()):
            try:
                addr = ipaddress.ip_address(text)
            except ValueError:
                continue  # never learnt so; refused by the compiler as a value
            if addr.version == version:
                lease = known.get(text)
                out.add(LearntAddr(addr, None if lease is None else lease.expires))
    return tuple(sorted(out, key=lambda a: (a.address.version, int(a.address))))


class Engine:
    """The filter pool, the binding table and a backend for one state root."""

    def __init__(
        self,
        root: Path,
        backend: Backend,
        *,
        stock_dir: Path | None = None,
        owner: str = "nwfilter",
        lock_timeout: float = 30.0,
        events: EventBus | None = None,
    ) -> None:
        self.root = Path(root)
        self.backend = backend
        self.events = events if events is not None else EventBus()
        self._root_lock = RootLock(self.root, owner)
        self._lock_timeout = lock_timeout
        self.pool = FilterPool.for_root(self.root, stock_dir=stock_dir)
        self.bindings = BindingTable(self.root / "run" / "bindings")
        self.coordinator = RebuildCoordinator()
        # Guarded by bindings.lock: what was learnt.
        self._learnt: dict[str, dict[str, tuple[str, ...]]] = {}
        self._learnt_info: dict[str, dict[str, tuple[LearntAddress, ...]]] = {}
        self._learnt_generation = 0
        # Guarded by bindings.lock: per port, the sources of a compile and
        # what it gave, for `compile_bindings` (a compile is a pure function
        # of its sources, so an entry is never wrong).  The sources are a
        # source stamp, or (cheaper to take where ports are bound) the pool
        # generation with the binding and its learnt addresses.
        self._compiled: dict[str, tuple[tuple[object, ...], Wanted | NwfilterError]] = {}
        self.learnt_store = LearntStore(self.root)
        self._started = False  # set by start(), cleared by close()
        self._read_only = False
        self.owner: Owner | None = None  # this root, as the kernel objects name it
        self.pool.set_usage_provider(self._usage)
        self._port_holders: list[PortHolder] = []
        # What long work reports (compiling many ports): the command line
        # draws it on a terminal.
        self.progress: ProgressHook = no_progress
        self._binding_observers: list[Callable[[], None]] = []
        self.create_queue: CommitQueue[tuple[BindingDef, ...]] = CommitQueue(
            "bindings", self._commit_creates, self._create_locks
        )

    # ------------------------------------------------------------ life cycle

    def start(self, *, read_only: bool = False) -> list[str]:
        """Load the pool and the bindings and reconcile the kernel with them.

        The backend reads back what the kernel holds and writes only what
        differs from what the bindings compile to, in one transaction (none
        when nothing differs), so whatever an earlier process left is
        brought in line while names, port ids, counters and dynamic sets
        survive a restart.  A binding whose sources are those it had when it
        was last compiled (`nwfilter.sourcestamp`) is not compiled: the
        backend gets the digest of its ruleset and compiles it only when the
        kernel does not prove that ruleset in force.  A binding that
        cannot be compiled fails closed: its port drops everything until its
        filters are fixed, and a warning says why.  Returns the warnings.

        With `read_only` the kernel is not touched: the engine answers
        queries (and dry runs) and refuses every change.
        """
        self._root_lock.acquire(self._lock_timeout)
        try:
            return self._start(read_only)
        except BaseException:
            self._root_lock.release()
            raise

    def _start(self, read_only: bool) -> list[str]:
        # The host first: a root never touches a namespace it does not manage.
        record = hostrecord.claim(
            self.root, self.backend.name, self.backend.netns, write=not read_only
        )
        self.owner = record.owner(self.root)
        self.backend.set_owner(self.owner)
        # Safe only now that the lock keeps every other engine out of the root.
        assert self._root_lock.run_dir is not None
        warnings = self._root_lock.run_dir.remove_temporaries()
        warnings.extend(self.pool.load())
        warnings.extend(self.bindings.load())
        warnings.extend(self._load_learnt(prune=not read_only))
        self._read_only = read_only
        if read_only:
            self._started = True
            return warnings
        self.backend.probe()
        self.check_owner()
        assert self._root_lock.run_dir is not None
        index = CompiledIndex(self._root_lock.run_dir)
        known = index.load()
        with self.pool.lock.read(), self.bindings.lock:
            snapshot = self.pool.snapshot()
            with gc_paused():
                wanted, failed, entries = self._compile_start(snapshot, known)
            warnings.extend(failed)
            warnings.extend(self._apply_start(wanted))
        if entries != known:
            index.save(entries)
        broken = self.backend.preconditions(repair=True)
        if broken:
            text = "layer-3 rules are not enforced: " + "; ".join(broken)
            log.warning("%s", text)
            warnings.append(text)
        self._started = True
        return warnings

    def _load_learnt(self, *, prune: bool) -> list[str]:
        """Learnt addresses of the bound ports whose leases still hold."""
        info, warnings = self.learnt_store.load(
            [b.portdev for b in self.bindings.all()], prune=prune
        )
        self._learnt_info = info
        self._learnt = {
            port: {var: tuple(a.address for a in addrs) for var, addrs in byvar.items()}
            for port, byvar in info.items()
        }
        return warnings

    def where(self) -> str:
        """The backend and namespace this engine manages, for messages."""
        return hostrecord.describe(self.backend.name, self.backend.netns)

    def check_owner(self) -> None:
        """Raise `ConflictError` if another root owns the kernel objects."""
        held = self.backend.owner()
        if held is not None and self.owner is not None and not held.same_root(self.owner):
            raise ConflictError(
                f"the nwfilter tables of {self.where()} are owned by {held.describe()}, "
                f"not by this root ('{self.root}'); nothing was changed"
            )

    def _compile_start(
        self, snapshot: Mapping[str, FilterDef], known: Mapping[str, tuple[str, str]]
    ) -> tuple[list[Wanted], list[str], dict[str, tuple[str, str]]]:
        """Per binding, its compiled ruleset, or a `Deferred` one when its
        sources are those `known` (`CompiledIndex`) records for its port;
        the warnings; and the index entries of every binding that compiles."""
        wanted: list[Wanted] = []
        warnings: list[str] = []
        entries: dict[str, tuple[str, str]] = {}
        compiler = Compiler(snapshot)
        stamps = SourceStamps(snapshot, self.pool.reaches)
        memo: Memo = {}
        self._compiled = {}
        # Not checked against the backend here: reconciling renders every
        # rule anyway, and a port it refuses fails closed in `_apply_start`.
        for binding in counted(self.progress, "compiling bindings", self.bindings.all()):
            learnt = self._learnt.get(binding.portdev)
            source = stamps.of(binding, learnt)
            entry = known.get(binding.portdev)
            key = ("stamp", source, self._info_key(binding.portdev))
            if entry is not None and entry[0] == source:
                entries[binding.portdev] = entry
                deferred = Deferred(port_of(binding), entry[1],
                                    self._deferred_compile(compiler, binding, learnt))
                self._compiled[binding.portdev] = (key, deferred)
                wanted.append(deferred)
                continue
            try:
                rs = self._compile(compiler, binding)
                entries[binding.portdev] = (source, ruleset_digest(rs, memo))
                self._compiled[binding.portdev] = (key, rs)
            except NwfilterError as exc:
                warnings.append(
                    f"port '{binding.portdev}' drops all traffic: its binding cannot be "
                    f"compiled: {exc.message}"
                )
                log.warning("%s", warnings[-1])
                rs = drop_all(port_of(binding))
            wanted.append(rs)
        return wanted, warnings, entries

    def _deferred_compile(
        self, compiler: Compiler, binding: BindingDef,
        learnt: Mapping[str, Sequence[str]] | None,
    ) -> Callable[[], Ruleset]:
        """The compile a `Deferred` runs when its ruleset is needed: against
        the pool and the learnt values of the start, which its recorded
        digest stands for (what the kernel holds until a change replaces it)."""
        learnt = dict(learnt or {})
        done: list[Ruleset] = []  # one ruleset object for every caller (backend, audits)

        def run() -> Ruleset:
            if done:
                return done[0]
            try:
                rs = self._compile(compiler, binding, learnt)
            except NwfilterError as exc:  # it compiled with these sources before
                log.error("port '%s': a deferred compile failed: %s", binding.portdev, exc)
                rs = drop_all(port_of(binding))
            done.append(rs)
            return done[0]

        return run

    def _apply_start(self, rulesets: list[Wanted]) -> list[str]:
        self.progress(f"applying the rules of {len(rulesets)} ports", 0, 0)
        try:
            self.backend.reconcile(rulesets)
            return []
        except ConflictError:
            raise  # another root took the namespace meanwhile: change nothing
        except NwfilterError as exc:
            warnings = [f"reconciling the kernel with all bindings at once failed: "
                        f"{exc.message}"]
        # Fail closed first (every port drops), then bring ports up one by one.
        self.backend.reconcile([drop_all(rs.port) for rs in rulesets])
        for item in rulesets:
            rs = compiled(item)
            try:
                self.backend.apply(Changes(set=(rs,)))
            except NwfilterError as exc:
                warnings.append(
                    f"port '{rs.port.portdev}' drops all traffic: its rules were refused: "
                    f"{exc.message}"
                )
        for text in warnings:
            log.warning("%s", text)
        return warnings

    def _check_writable(self) -> None:
        if not self._started:
            raise StateError("the engine is not started; it makes no changes")
        if self._read_only:
            raise StateError("this engine was started read-only; it makes no changes")

    def close(self) -> None:
        """Stop using the engine; the kernel keeps the rules of every binding."""
        self._started = False
        self._root_lock.release()

    # --------------------------------------------------------------- filters

    def define_filter(
        self, xml: str | bytes, *, source: str = "", dry_run: bool = False
    ) -> DefineOutcome:
        """Define (or redefine) a filter and rebuild every binding it reaches."""
        if not dry_run:
            self._check_writable()
        # The canonical form (what the pool stores and a reload gives) is made
        # once, here, outside every lock.
        fdef, text = self.pool.canonical(parse_filter(xml, source=source))
        # Compile outside the driver and pool write locks, against a snapshot;
        # under the locks the work is reused if nothing changed meanwhile, so
        # the locks are held for the kernel transaction, not for the compile.
        began = time.perf_counter()
        prepared = self._prepare_define(fdef, text, dry_run)
        with self.coordinator.filter_change():
            outcome = self._define_locked(fdef, text, dry_run, prepared)
        if outcome.changed and not outcome.dry_run:
            self.events.publish(EventKind.FILTER_DEFINED, "filter", outcome.name, {
                "uuid": outcome.uuid, "created": outcome.created,
                "rebuilt": list(outcome.rebuilt),
            })
            if outcome.rebuilt:
                ms = round((time.perf_counter() - began) * 1000, 1)
                self.events.publish(EventKind.REBUILD, "filter", outcome.name,
                                    {"ports": list(outcome.rebuilt), "ms": ms})
        return outcome

    def _prepare_define(self, fdef: FilterDef, text: str, dry_run: bool) -> _PreparedDefine | None:
        with self.pool.lock.read():
            try:
                result = self.pool.check_define(fdef, text=text)
            except NwfilterError:
                return None  # reported with the locks held, where it counts
            pool_gen = self.pool.generation
            snapshot = {**self.pool.snapshot(), fdef.name: fdef}
        if not result.changed:
            return None
        with self.bindings.lock:
            bindings_gen = self.bindings.generation + self._learnt_generation
            affected = self.bindings.using(result.affected)
            learnt = {b.portdev: self._learnt.get(b.portdev) for b in affected}
        compiler = Compiler(snapshot)
        try:
            with gc_paused():
                new = [
                    self._compile(compiler, b, learnt[b.portdev], check=dry_run)
                    for b in counted(self.progress, "rebuilding ports", affected)
                ]
        except NwfilterError:
            return None  # compiled again under the locks, which raises there
        return _PreparedDefine(pool_gen, bindings_gen, tuple(affected), tuple(new))

    def _define_locked(
        self, fdef: FilterDef, text: str, dry_run: bool, prepared: _PreparedDefine | None
    ) -> DefineOutcome:
        with self.pool.lock.write():
            result = self.pool.check_define(fdef, text=text)

            def outcome(
                changed: bool, rebuilt: tuple[str, ...] = (), diffs: tuple[PortDiff, ...] = ()
            ) -> DefineOutcome:
                return DefineOutcome(
                    result.name, str(result.uuid), result.created, changed, dry_run,
                    rebuilt, diffs,
                )

            if not result.changed:
                return outcome(False)
            with self.bindings.lock:
                if (
                    prepared is not None
                    and prepared.pool_generation == self.pool.generation
                    and prepared.bindings_generation
                    == self.bindings.generation + self._learnt_generation
                ):
                    affected, new = list(prepared.affected), list(prepared.rulesets)
                else:
                    affected = self.bindings.using(result.affected)
                    compiler = Compiler({**self.pool.snapshot(), fdef.name: fdef})
                    with gc_paused():
                        new = [
                            self._compile(compiler, b, check=dry_run)
                            for b in counted(self.progress, "rebuilding ports", affected)
                        ]
                applied = self.backend.recorded()
                old = {b.portdev: applied.get(b.portdev) for b in affected}
                rebuilt = tuple(b.portdev for b in affected)
                if dry_run:
                    # A read-only engine applied nothing itself: what is in
                    # force is what the current pool compiles to.
                    before = Compiler(self.pool.snapshot())
                    for b in affected:
                        if old[b.portdev] is None:
                            with contextlib.suppress(NwfilterError):
                                old[b.portdev] = before.compile(
                                    b, self._learnt.get(b.portdev)
                                )
                    diffs = tuple(
                        diff_rulesets(rs.port.portdev, old[rs.port.portdev], rs) for rs in new
                    )
                    return outcome(True, rebuilt, diffs)
                if new:
                    self.progress(f"applying the rules of {len(new)} ports", 0, 0)
                    self.backend.apply(Changes(set=tuple(new)))
                try:
                    self.pool.define_locked(fdef, text=text)
                except NwfilterError:
                    if new:
                        self._restore(old)
                    raise
        log.info("defined filter '%s'; rebuilt %d port(s)", fdef.name, len(rebuilt))
        return outcome(True, rebuilt)

    def _restore(self, old: Mapping[str, Ruleset | None]) -> None:
        """Put back the rules that were in force before a failed change."""
        keep = tuple(rs for rs in old.values() if rs is not None)
        drop = tuple(p for p, rs in old.items() if rs is None)
        try:
            self.backend.apply(Changes(set=keep, remove=drop))
        except NwfilterError as exc:
            log.error("cannot restore the previous rules of %s: %s", ", ".join(old), exc)

    def undefine_filter(self, name_or_uuid: str) -> UndefineResult:
        """Undefine a filter that no filter and no binding uses."""
        self._check_writable()
        with self.coordinator.filter_change(), self.pool.lock.write():
            result = self.pool.undefine_locked(name_or_uuid)
        self.events.publish(EventKind.FILTER_UNDEFINED, "filter", result.name,
                            {"uuid": str(result.uuid)})
        return result

    def replace_filters(
        self, changes: Mapping[str, tuple[FilterDef, str] | None]
    ) -> FiltersReplaced:
        """Take filter definitions decided elsewhere (the cluster's pool,
        checked by `nwfilter.cluster.view`) and rebuild every binding they
        reach in one kernel transaction.  A binding that no longer compiles
        keeps the rules it has, with a warning: the change is already
        committed elsewhere and cannot be refused here."""
        self._check_writable()
        with self.coordinator.filter_change(), self.pool.lock.write():
            current = self.pool.snapshot()
            real = {
                name: change for name, change in changes.items()
                if current.get(name) != (change[0] if change is not None else None)
            }
            if not real:
                return FiltersReplaced((), (), (), ())
            # A binding reaching a changed filter in the new pool reaches the
            # first changed filter on that path in the old one too.
            names = frozenset().union(*(self.pool.reached_by(n) for n in real))
            snapshot = dict(current)
            for name, change in real.items():
                if change is None:
                    snapshot.pop(name, None)
                else:
                    snapshot[name] = change[0]
            with self.bindings.lock:
                compiler = Compiler(snapshot)
                new: list[Ruleset] = []
                kept: list[str] = []
                with gc_paused():
                    for binding in self.bindings.using(names):
                        try:
                            new.append(self._compile(compiler, binding))
                        except NwfilterError as exc:
                            kept.append(f"port '{binding.portdev}' keeps its rules: "
                                        f"{exc.message}")
                applied = self.backend.recorded()
                old = {rs.port.portdev: applied.get(rs.port.portdev) for rs in new}
                if new:
                    self.backend.apply(Changes(set=tuple(new)))
                try:
                    self.pool.replace_locked(real)
                except NwfilterError:
                    if new:
                        self._restore(old)
                    raise
        for text in kept:
            log.warning("%s", text)
        defined = tuple(sorted(n for n, c in real.items() if c is not None))
        undefined = tuple(sorted(n for n, c in real.items() if c is None))
        rebuilt = tuple(rs.port.portdev for rs in new)
        for name in defined:
            self.events.publish(EventKind.FILTER_DEFINED, "filter", name, {
                "uuid": str(snapshot[name].uuid), "created": name not in current,
                "rebuilt": list(rebuilt),
            })
        for name in undefined:
            self.events.publish(EventKind.FILTER_UNDEFINED, "filter", name,
                                {"uuid": str(current[name].uuid)})
        return FiltersReplaced(defined, undefined, rebuilt, tuple(kept))

    def _usage(self, names: frozenset[str]) -> list[str]:
        return [
            f"binding {b.portdev}" + (f" ({b.owner_name})" if b.owner_name else "")
            for b in self.bindings.using(names)
        ]

    # -------------------------------------------------------------- bindings

    def _compile(
        self,
        compiler: Compiler,
        binding: BindingDef,
        learnt: Mapping[str, Sequence[str]] | None = None,
        *,
        check: bool = False,
        info: Mapping[str, Sequence[LearntAddress]] | None = None,
    ) -> Ruleset:
        """Compile one binding (`learnt`, `info`: its learnt values and
        their details, the recorded ones when not given).  `check` asks the backend whether it can
        express the result; paths that apply it next skip that, since the
        backend refuses an inexpressible rule before touching the kernel."""
        if learnt is None:
            learnt = self._learnt.get(binding.portdev)
        try:
            found = None
            if getattr(self.backend, "learnt_sets", False) and learns(binding):
                if info is None:
                    info = self._learnt_info.get(binding.portdev, {})
                found = self._compile_sets(compiler, binding, learnt, info)
            if found is not None:
                rs = found
            else:
                try:
                    rs = compiler.compile(binding, learnt)
                except UndefinedVariableError as exc:
                    # No IP given and none learnt yet: the port is held to the
                    # learning rules (DHCP and ARP probes only) until one is.
                    if exc.variable != LEARNT_VAR or learning_mode(binding) == "none":
                        raise
                    rs = learning_ruleset(binding)
            if check:
                self.backend.check(rs)
        except NwfilterError as exc:
            raise type(exc)(f"port '{binding.portdev}': {exc.message}", exc.code) from exc
        return rs

    @staticmethod
    def _compile_sets(
        compiler: Compiler,
        binding: BindingDef,
        learnt: Mapping[str, Sequence[str]] | None,
        info: Mapping[str, Sequence[LearntAddress]],
    ) -> Ruleset | None:
        """The ruleset of a learning port whose `IP` (and `IPV6`) are sets
        of learnt addresses (`ir.Learning`), or None when the filter uses
        them in a way a set cannot express, or does not use `IP`: then the
        port is compiled with values and rebuilt on each change."""
        given = binding.filterref.param_dict()
        names = frozenset(n for n in LEARNT_SET_VARS if n not in given)
        try:
            rs = compiler.compile(binding, None, learnt_sets=names)
        except LearntSetUnfit as exc:
            log.debug("port '%s': learnt addresses are applied as rules: %s",
                      binding.portdev, exc)
            return None
        versions = rs.set_versions()
        if 4 not in versions:
            return None
        addresses = _set_addresses(info, learnt or {}, versions)
        return dataclasses.replace(rs, learn=Learning(learning_rules(binding), addresses))

    @staticmethod
    def _check_new_ports(defs: Sequence[BindingDef]) -> None:
        seen: set[str] = set()
        for binding in defs:
            check_port_name(binding.portdev, "port device name")
            if binding.portdev in seen:
                raise ConflictError(f"port '{binding.portdev}' is given more than once")
            seen.add(binding.portdev)

    def _check_unbound(self, defs: Sequence[BindingDef]) -> None:
        for binding in defs:
            self._check_port_holder(binding)
            existing = self.bindings.get(binding.portdev)
            if existing is not None:
                raise ConflictError(
                    f"port '{binding.portdev}' is already bound to filter"
                    f" '{existing.filterref.filter}'"
                )

    def check_bindings(self, defs: Sequence[BindingDef]) -> None:
        """Everything `create_bindings` checks before it touches the kernel:
        names, conflicts, compilation and what the backend can express."""
        self._check_new_ports(defs)
        with self.pool.lock.read():
            self._check_unbound(defs)
            compiler = Compiler(self.pool.snapshot())
            for binding in defs:
                self._compile(compiler, binding, {}, check=True)

    def create_bindings(self, defs: Sequence[BindingDef]) -> None:
        """Bind ports to filters, all or nothing.

        Calls that arrive together (API requests, domain starts) are
        committed together, in one kernel transaction
        (`nwfilter.groupcommit`); each call keeps its own all-or-nothing
        outcome and its own error."""
        self._check_writable()
        self._check_new_ports(defs)
        if not defs:
            return
        self.create_queue.submit(tuple(defs))
        self._bindings_changed()
        for b in defs:
            self.events.publish(EventKind.BINDING_CREATED, "port", b.portdev, {
                "filter": b.filterref.filter, "owner": b.owner_name, "mac": b.mac,
            })

    @contextlib.contextmanager
    def _create_locks(self) -> Iterator[None]:
        with self.pool.lock.read(), self.bindings.lock:
            yield

    def _commit_creates(self, batch: list[Pending[tuple[BindingDef, ...]]]) -> None:
        """Check and compile each request of `batch` on its own, apply the
        good ones in one transaction, then write their files.  A request
        that binds a port an earlier one of the batch binds fails as if
        they had come one after the other.  Runs under `_create_locks`."""
        compiler = Compiler(self.pool.snapshot())
        if len(batch) > 1 or len(batch[0].item) > 1:
            self.progress(f"compiling {sum(len(r.item) for r in batch)} ports", 0, 0)
        claimed: dict[str, str] = {}  # portdev -> filter, bound by this batch
        ready: list[tuple[Pending[tuple[BindingDef, ...]], tuple[Ruleset, ...]]] = []
        with gc_paused():
            for request in batch:
                try:
                    self._check_unbound(request.item)
                    for binding in request.item:
                        if binding.portdev in claimed:
                            raise ConflictError(
                                f"port '{binding.portdev}' is already bound to filter"
                                f" '{claimed[binding.portdev]}'"
                            )
                    rulesets = tuple(self._compile(compiler, b) for b in request.item)
                except NwfilterError as exc:
                    request.fail(exc)
                    continue
                claimed.update((b.portdev, b.filterref.filter) for b in request.item)
                ready.append((request, rulesets))
        ports = 0
        for request, rulesets in self._apply_creates(ready):
            try:
                self.bindings.put_many_locked(request.item)
            except NwfilterError as exc:
                self._restore({b.portdev: None for b in request.item})
                request.fail(exc)
                continue
            request.succeed()
            ports += len(rulesets)
            for binding, rs in zip(request.item, rulesets, strict=True):
                self._compiled[binding.portdev] = (self._generation_key(binding), rs)
        if ports:
            log.info("bound %d port(s) for %d request(s)", ports, len(batch))

    def _apply_creates(
        self, ready: list[tuple[Pending[tuple[BindingDef, ...]], tuple[Ruleset, ...]]]
    ) -> list[tuple[Pending[tuple[BindingDef, ...]], tuple[Ruleset, ...]]]:
        """Apply the rulesets of `ready` in one transaction; if the kernel
        refuses it, apply each request alone, so only the one at fault
        fails.  The requests whose rules are now in force."""
        if not ready:
            return []
        try:
            self.backend.apply(Changes(set=tuple(rs for _, sets in ready for rs in sets)))
            return ready
        except ConflictError as exc:
            # Another root holds the tables: no request of the batch can pass.
            for request, _ in ready:
                request.fail(copy_error(exc))
            return []
        except NwfilterError as exc:
            if len(ready) == 1:
                ready[0][0].fail(exc)
                return []
            log.warning(
                "the kernel refused %d binding requests committed together (%s); "
                "applying each alone", len(ready), exc.message,
            )
        applied = []
        for request, rulesets in ready:
            try:
                self.backend.apply(Changes(set=rulesets))
            except NwfilterError as exc:
                request.fail(exc)
                continue
            applied.append((request, rulesets))
        return applied

    def add_binding_observer(self, observer: Callable[[], None]) -> None:
        """Call `observer` (which must not block) after bindings were
        created or deleted, with no lock held: the learning listener
        follows the bound ports with it."""
        self._binding_observers.append(observer)

    def remove_binding_observer(self, observer: Callable[[], None]) -> None:
        with contextlib.suppress(ValueError):
            self._binding_observers.remove(observer)

    def _bindings_changed(self) -> None:
        for observer in list(self._binding_observers):
            observer()

    def add_port_holder(self, holder: PortHolder) -> None:
        """Let `holder` (the domains) say who holds a port: `create_bindings`
        then refuses a binding of that port for any other owner."""
        self._port_holders.append(holder)

    def _check_port_holder(self, binding: BindingDef) -> None:
        for holder_of in self._port_holders:
            holder = holder_of(binding.portdev)
            if holder is not None and holder != (binding.owner_name, binding.owner_uuid):
                raise ConflictError(
                    f"port '{binding.portdev}' is used by domain '{holder[0]}'"
                )

    def delete_binding(self, portdev: str) -> None:
        """Remove a port's rules and forget its binding."""
        self._check_writable()
        with self.bindings.lock:
            binding = self.bindings.get(portdev)
            if binding is None:
                raise NotFoundError(f"no binding for port '{portdev}'")
            old = self.backend.recorded().get(portdev)
            self.backend.clear(portdev)
            try:
                self.bindings.remove_locked(portdev)
            except NwfilterError:
                self._restore({portdev: old})
                raise
            self._learnt.pop(portdev, None)
            self._compiled.pop(portdev, None)
            if self._learnt_info.pop(portdev, None):
                try:
                    self.learnt_store.save_all(self._learnt_info)
                except NwfilterError as exc:
                    log.warning("port '%s': its learnt addresses stay on disk: %s",
                                portdev, exc)
        self._bindings_changed()
        self.events.publish(EventKind.BINDING_DELETED, "port", portdev, {
            "filter": binding.filterref.filter, "owner": binding.owner_name,
        })

    def binding(self, portdev: str) -> BindingDef:
        binding = self.bindings.get(portdev)
        if binding is None:
            raise NotFoundError(f"no binding for port '{portdev}'")
        return binding

    def list_bindings(self) -> list[BindingDef]:
        return self.bindings.all()

    def ruleset(self, portdev: str) -> Ruleset:
        """The rules in force for a bound port (compiled now if none were applied)."""
        binding = self.binding(portdev)
        applied = self.backend.recorded().get(portdev)
        if applied is not None:
            return applied
        with self.pool.lock.read():
            return self._compile(Compiler(self.pool.snapshot()), binding, check=True)

    def reconcile(self) -> int:
        """Make the kernel hold what every binding compiles to now, writing
        only the difference in one transaction (what a start does; `audit
        --fix`), and restore the layer-3 preconditions the backend may
        restore.  Returns the number of commands sent (0: nothing differed)."""
        self._check_writable()
        with self.pool.lock.read(), self.bindings.lock:
            # Nothing is taken as known: every binding is compiled afresh.
            rulesets, _failed, _entries = self._compile_start(self.pool.snapshot(), {})
            sent = self.backend.reconcile(rulesets)
        self.backend.preconditions(repair=True)
        return sent

    def compile_bindings(
        self, portdevs: Sequence[str] | None = None
    ) -> dict[str, Ruleset | NwfilterError]:
        """What the bound ports (all, or `portdevs`) compile to now, with
        their learnt addresses, or why they do not compile; changes nothing
        (for audits, which compare it with what the kernel holds).  A port
        whose sources (`SourceStamps`: binding, filter tree, learnt
        addresses, code) are those of its last compile at start, when it was
        bound or here is not compiled again: its ruleset is the object
        compiled then, which for a port unchanged since is the one the
        backend applied."""
        wanted = None if portdevs is None else set(portdevs)
        out: dict[str, Ruleset | NwfilterError] = {}
        with self.pool.lock.read(), self.bindings.lock:
            snapshot = self.pool.snapshot()
            compiler = Compiler(snapshot)
            stamps = SourceStamps(snapshot, self.pool.reaches)
            bound = self.bindings.all()
            for gone in set(self._compiled) - {b.portdev for b in bound}:
                del self._compiled[gone]
            for binding in bound:
                port = binding.portdev
                if wanted is not None and port not in wanted:
                    continue
                key = ("stamp", stamps.of(binding, self._learnt.get(port)),
                       self._info_key(port))
                known = self._compiled.get(port)
                if known is not None and (known[0] == key
                                          or known[0] == self._generation_key(binding)):
                    # The same sources: what the engine compiled (at start,
                    # the very ruleset it applied) is what they compile to.
                    result = known[1]
                    if isinstance(result, Deferred):
                        result = compiled(result)
                else:
                    try:
                        result = self._compile(compiler, binding)
                    except NwfilterError as exc:
                        result = exc
                self._compiled[port] = (key, result)
                out[port] = result
        return out

    def _generation_key(self, binding: BindingDef) -> tuple[object, ...]:
        """The sources of a compile of `binding` against the pool as it is
        (pool lock held): its generation, the binding and its learnt
        addresses (under bindings.lock)."""
        port = binding.portdev
        learnt = self._learnt.get(port)
        return ("generation", self.pool.generation, binding,
                repr(sorted(learnt.items())) if learnt else "", self._info_key(port))

    def _info_key(self, portdev: str) -> str:
        """The learnt-address details a compile reads besides the values
        a source stamp covers (leases, for learnt sets); under bindings.lock."""
        info = self._learnt_info.get(portdev)
        return repr(sorted(info.items())) if info else ""

    def set_learnt(
        self,
        portdev: str,
        var: str,
        values: Sequence[str],
        details: Sequence[LearntAddress] | None = None,
    ) -> None:
        """Record learnt values of a variable (e.g. IP) and re-apply the port."""
        if details is None:
            details = [LearntAddress(v, "given", time.time()) for v in values]
        self.set_learnt_many([(portdev, var, tuple(details))])

    def set_learnt_many(
        self, changes: Sequence[tuple[str, str, Sequence[LearntAddress]]]
    ) -> list[str]:
        """Record learnt addresses (an empty list withdraws a variable) of
        many ports and re-apply them all in one kernel transaction; the
        ports re-applied.  A port with no binding is skipped."""
        self._check_writable()
        with self.pool.lock.read(), self.bindings.lock:
            compiler = Compiler(self.pool.snapshot())
            learnt: dict[str, dict[str, tuple[str, ...]]] = {}
            info: dict[str, dict[str, tuple[LearntAddress, ...]]] = {}
            for portdev, var, addrs in changes:
                if self.bindings.get(portdev) is None:
                    continue
                values = learnt.setdefault(portdev, dict(self._learnt.get(portdev, {})))
                details = info.setdefault(portdev, dict(self._learnt_info.get(portdev, {})))
                if addrs:
                    values[var] = tuple(a.address for a in addrs)
                    details[var] = tuple(addrs)
                else:
                    values.pop(var, None)
                    details.pop(var, None)
            new: list[Ruleset] = []
            recorded = self.backend.recorded()
            for portdev, values in sorted(learnt.items()):
                binding = self.bindings.get(portdev)
                assert binding is not None
                old = recorded.get(portdev)
                if old is not None and old.learn is not None:
                    # Learnt into sets: the chains stay, the elements change.
                    addresses = _set_addresses(info[portdev], values, old.set_versions())
                    new.append(dataclasses.replace(
                        old, learn=dataclasses.replace(old.learn, addresses=addresses)))
                    continue
                new.append(self._compile(compiler, binding, values, info=info[portdev]))
            if new:
                self.backend.apply(Changes(set=tuple(new)))
            # Recorded only once the kernel holds the rules that use it.
            for portdev, values in learnt.items():
                self._learnt[portdev] = values
                self._learnt_info[portdev] = info[portdev]
            if learnt:
                try:
                    self.learnt_store.save_all(self._learnt_info)
                except NwfilterError as exc:
                    log.warning("learnt addresses of %s not kept: %s", ", ".join(learnt), exc)
            self._learnt_generation += 1
        return [rs.port.portdev for rs in new]

    def generation(self) -> int:
        """A number that grows with every change of the filter pool, the
        bindings or the learnt addresses (each counter only grows): a reader
        that sees it move while it worked read a state that changed."""
        return self.pool.generation + self.bindings.generation + self._learnt_generation

    def learnt(self, portdev: str) -> dict[str, tuple[str, ...]]:
        return dict(self._learnt.get(portdev, {}))

    def learnt_details(self, portdev: str) -> dict[str, tuple[LearntAddress, ...]]:
        """The learnt addresses of a port, with their sources and leases."""
        with self.bindings.lock:
            return dict(self._learnt_info.get(portdev, {}))

    # ----------------------------------------------------------- enforcement

    def enforcement(self, portdevs: Sequence[str] | None = None) -> dict[str, str]:
        """Why the rules of bound ports are not in force now, per port (all
        bound ports, or `portdevs`); a port not in the answer is enforced.
        Reads the kernel (the owner, the layer-3 preconditions), changes
        nothing."""
        wanted = None if portdevs is None else set(portdevs)
        with self.pool.lock.read(), self.bindings.lock:
            bindings = [b for b in self.bindings.all() if wanted is None or b.portdev in wanted]
            if not bindings:
                return {}
            recorded = self.backend.recorded()
            applied = {b.portdev: recorded.get(b.portdev) for b in bindings}
            snapshot = self.pool.snapshot()
        try:
            held = self.backend.owner()
            broken = self.backend.preconditions(cached=True)
        except NwfilterError as exc:
            return {b.portdev: f"the kernel cannot be read: {exc.message}" for b in bindings}
        if held is not None and not held.same_root(self.owner):
            reason = f"the nwfilter tables of {self.where()} belong to {held.describe()}"
            return {b.portdev: reason for b in bindings}
        if not broken:
            return {}
        reason = "its layer-3 rules are bypassed: " + "; ".join(broken)
        compiler = Compiler(snapshot)
        out: dict[str, str] = {}
        for binding in bindings:
            rs = applied[binding.portdev]
            if rs is None:
                try:
                    rs = compiler.compile(binding, self._learnt.get(binding.portdev))
                except NwfilterError:
                    continue  # it cannot be compiled: at start it drops everything
            if any(rs.l3_rules(hook) for hook in Hook):
                out[binding.portdev] = reason
        return out
