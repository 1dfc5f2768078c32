"""The filter pool: the defined filters, their files and their reference graph.

`FilterPool` owns the set of defined filters of one state root: one
`<name>.xml` per filter in its configuration directory (written atomically
as `format_filter` output), the one-time seeding of that directory with the
stock filters, and the dependency graph (a networkx `DiGraph`, edge
`a -> b` when filter `a` references filter `b`).  It answers the questions a
define or an undefine raises: is the name or UUID taken, does the new
definition close a reference loop, which filters reach a changed one, and
may a filter be undefined.

Locking.  `lock` is the pool's readers/writer lock (`Level.POOL`).  Callers
hold it for reading while they instantiate filters (so the pool does not
change under a compile) and for writing around a change.  `define` and
`undefine` take the write lock themselves; `define_locked` and
`undefine_locked` expect the caller to hold it already (the rebuild path
holds the VM-driver locks, then the pool write lock, then calls them).  All
query methods (`get`, `lookup`, `snapshot`, `reaches`, ...) take no
levelled lock: an internal leaf mutex, never held while calling out, keeps
them consistent, so they may be called with or without `lock` held.
"""

from __future__ import annotations

import logging
import threading
import uuid as uuidlib
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

import networkx as nx

from nwfilter.conf import parse_filter
from nwfilter.conf.filter_xml import filter_element
from nwfilter.conf.model import FilterDef
from nwfilter.conf.safexml import serialize
from nwfilter.conf.schema import chain_priority
from nwfilter.conf.values import check_object_name
from nwfilter.errors import (
    ConflictError,
    InUseError,
    LoopError,
    NotFoundError,
    NwfilterError,
    StorageError,
    ValidationError,
)
from nwfilter.fileio import DirHandle, SafeDir
from nwfilter.locks import Level, RWLock

log = logging.getLogger(__name__)

# libvirt stores a filter as NAME.xml and writes it through NAME.xml.new, so
# on a 255-byte NAME_MAX file system the longest name it can define is 247
# bytes; refuse longer names up front instead of failing on the write.
MAX_NAME_BYTES = 247

POOL_SUBDIR = "nwfilter"
"""Directory of the filter files under a state root."""

STOCK_MARKER = ".stock-seeded"
"""File in the configuration directory listing the stock filters already
seeded, one name a line, so that none is written a second time."""

UsageProvider = Callable[[frozenset[str]], list[str]]
Listener = Callable[[frozenset[str]], None]


def default_stock_dir() -> Path:
    """The stock filters shipped with the source tree."""
    return Path(__file__).resolve().parent.parent / "filters"


def validate_filter_name(name: str) -> str:
    """Return `name` if it is safe as a filter name and file name; else raise.

    The same rules as the filter language's, checked again where a name
    becomes a path, with the storage limit (libvirt 9.0 stores names of up
    to 247 bytes; the parser may be stricter)."""
    check_object_name(name, f"filter name {name[:40]!r}", max_bytes=MAX_NAME_BYTES)
    return name


def effective_chain(fdef: FilterDef) -> str:
    return fdef.chain if fdef.chain is not None else "root"


def effective_priority(fdef: FilterDef) -> int:
    """The filter's priority, or the default of its chain when it gives none."""
    return chain_priority(fdef)


@dataclass(frozen=True)
class DefineResult:
    """What a define did (or, from `check_define`, would do)."""

    name: str
    uuid: uuidlib.UUID
    created: bool  # no filter of that name existed
    changed: bool  # False: the same definition was already in place
    affected: frozenset[str]  # every filter that reaches this one, itself included


@dataclass(frozen=True)
class UndefineResult:
    name: str
    uuid: uuidlib.UUID
    affected: frozenset[str]


class FilterInfo(NamedTuple):
    name: str
    uuid: uuidlib.UUID
    chain: str
    priority: int
    rule_count: int


class FilterPool:
    """The defined filters of one configuration directory.

    Life cycle: construct, `load()` once (creates and seeds the directory,
    reads every file), then define, undefine and query from any thread.
    """

    def __init__(self, config_dir: Path, *, stock_dir: Path | None = None) -> None:
        self.config_dir = Path(config_dir)
        self.stock_dir = stock_dir if stock_dir is not None else default_stock_dir()
        self.lock = RWLock("filter-pool", Level.POOL)
        self._mutex = threading.RLock()
        # Replaced, never mutated, on each change: a snapshot is just the
        # current dict behind a read-only proxy.
        self._defs: dict[str, FilterDef] = {}
        # Bumped on every committed change: lets a caller that compiled against
        # a snapshot outside the lock check that the snapshot is still current.
        self.generation = 0
        self._by_uuid: dict[uuidlib.UUID, str] = {}
        self._graph: nx.DiGraph[str] = nx.DiGraph()
        self._listeners: list[Listener] = []
        self._usage: UsageProvider | None = None
        self._dir = DirHandle(self.config_dir, "filter directory")

    @classmethod
    def for_root(cls, root: Path, *, stock_dir: Path | None = None) -> FilterPool:
        """The pool of a state root: its filters live in `ROOT/nwfilter/`."""
        return cls(Path(root) / POOL_SUBDIR, stock_dir=stock_dir)

    # ------------------------------------------------------------------ load

    def load(self) -> list[str]:
        """(Re)load the pool from its directory; return the warnings.

        A file that cannot be read or parsed, whose name does not match the
        filter it holds, whose UUID is taken, or that would close a
        reference loop is skipped with a warning naming it; it is never
        deleted.  Listeners are not called.
        """
        directory = self._dir.reopen()
        warnings = directory.remove_temporaries()
        self._seed_stock(directory, warnings)
        loaded: dict[str, FilterDef] = {}
        by_uuid: dict[uuidlib.UUID, str] = {}
        graph: nx.DiGraph[str] = nx.DiGraph()
        for name in directory.names(".xml"):
            path = directory.path / name
            try:
                data = directory.read(name)
            except StorageError as exc:
                self._warn(warnings, f"skipping '{path}': {exc.message}")
                continue
            fdef = self._parse_file(data, path, warnings)
            if fdef is None:
                continue
            other = by_uuid.get(fdef.uuid)
            if other is not None:
                self._warn(
                    warnings,
                    f"skipping '{path}': filter '{fdef.name}' has the UUID {fdef.uuid}"
                    f" of filter '{other}'",
                )
                continue
            cycle = _find_cycle(graph, fdef.name, fdef.referenced_names())
            if cycle is not None:
                self._warn(
                    warnings,
                    f"skipping '{path}': filter '{fdef.name}' closes the reference loop "
                    + " -> ".join(cycle),
                )
                continue
            loaded[fdef.name] = fdef
            by_uuid[fdef.uuid] = fdef.name
            _set_edges(graph, fdef.name, fdef.referenced_names())
        with self._mutex:
            self._defs = loaded
            self.generation += 1
            self._by_uuid = by_uuid
            self._graph = graph
        log.info("loaded %d filters from %s", len(loaded), self.config_dir)
        return warnings

    def _parse_file(self, data: bytes, path: Path, warnings: list[str]) -> FilterDef | None:
        try:
            fdef = parse_filter(data, source=str(path))
        except NwfilterError as exc:
            self._warn(warnings, f"skipping '{path}': {exc.message}")
            return None
        try:
            validate_filter_name(fdef.name)
        except ValidationError as exc:
            self._warn(warnings, f"skipping '{path}': {exc.message}")
            return None
        if path.name != f"{fdef.name}.xml":
            self._warn(
                warnings,
                f"skipping '{path}': the file name does not match the name of the filter"
                f" it holds ('{fdef.name}')",
            )
            return None
        return fdef

    def _seed_stock(self, directory: SafeDir, warnings: list[str]) -> None:
        """Write each stock filter once in the pool's life, unless present."""
        marker = directory.read_if_exists(STOCK_MARKER)
        seeded = set(marker.decode("utf-8", errors="replace").split()) if marker else set()
        if not self.stock_dir.is_dir():
            if not seeded:
                self._warn(warnings, f"no stock filters: '{self.stock_dir}' is not a directory")
            return
        new_names: list[str] = []
        for path in sorted(self.stock_dir.glob("*.xml")):
            if path.stem in seeded:
                continue  # a stock file is named after its filter (checked on read)
            try:
                data = path.read_bytes()
            except OSError as exc:
                self._warn(warnings, f"skipping '{path}': cannot read it: {exc.strerror}")
                continue
            fdef = self._parse_file(data, path, warnings)
            if fdef is None or fdef.name in seeded:
                continue
            target = f"{fdef.name}.xml"
            if not directory.exists(target):
                directory.write(target, self.canonical(fdef)[1])
                log.info("seeded stock filter '%s'", fdef.name)
            new_names.append(fdef.name)
        if new_names:
            directory.write(
                STOCK_MARKER, "".join(f"{n}\n" for n in sorted(seeded | set(new_names)))
            )

    @staticmethod
    def _warn(warnings: list[str], message: str) -> None:
        log.warning("%s", message)
        warnings.append(message)

    # ------------------------------------------------------------- listeners

    def add_listener(self, fn: Listener) -> None:
        """Call `fn(affected)` after each committed define or undefine.

        It runs in the changing thread while the pool write lock is still
        held, so it must not take `lock`; the query methods are fine.
        """
        with self._mutex:
            self._listeners.append(fn)

    def set_usage_provider(self, fn: UsageProvider | None) -> None:
        """Tell the pool who uses filters outside it (bindings, running VMs).

        `fn(names)` gets every filter that reaches the one about to be
        undefined (itself included) and returns a description of each user
        whose root filter is among them, e.g. "binding vnet0 (vm1)".  It is
        called with the pool write lock held and must not take it.
        """
        with self._mutex:
            self._usage = fn

    def _notify(self, affected: frozenset[str]) -> None:
        with self._mutex:
            listeners = list(self._listeners)
        for fn in listeners:
            fn(affected)

    # --------------------------------------------------------------- queries

    def get(self, name: str) -> FilterDef | None:
        return self._defs.get(name)

    def lookup(self, name_or_uuid: str) -> FilterDef:
        """The filter with this UUID, else with this name; `NotFoundError`."""
        with self._mutex:
            defs, by_uuid = self._defs, self._by_uuid
            try:
                key = uuidlib.UUID(name_or_uuid)
            except ValueError:
                key = None
            if key is not None and key in by_uuid:
                return defs[by_uuid[key]]
            fdef = defs.get(name_or_uuid)
        if fdef is None:
            raise NotFoundError(f"no network filter with matching name or uuid '{name_or_uuid}'")
        return fdef

    def names(self) -> list[str]:
        return sorted(self._defs)

    def __len__(self) -> int:
        return len(self._defs)

    def __contains__(self, name: object) -> bool:
        return name in self._defs

    def snapshot(self) -> Mapping[str, FilterDef]:
        """An immutable view of the filters as they are now, by name."""
        return MappingProxyType(self._defs)

    def list_info(self) -> list[FilterInfo]:
        defs = self._defs
        return [
            FilterInfo(
                name,
                fdef.uuid,
                effective_chain(fdef),
                effective_priority(fdef),
                len(fdef.rules),
            )
            for name, fdef in sorted(defs.items())
        ]

    def reaches(self, name: str) -> frozenset[str]:
        """Every filter `name` references, directly or not (defined or not)."""
        with self._mutex:
            if name not in self._graph:
                return frozenset()
            return frozenset(nx.descendants(self._graph, name))

    def reached_by(self, name: str) -> frozenset[str]:
        """Every defined filter that references `name`, directly or not, and `name`."""
        with self._mutex:
            if name not in self._graph:
                return frozenset({name})
            return frozenset(nx.ancestors(self._graph, name)) | {name}

    def referrers(self, name: str) -> list[str]:
        """The defined filters that reference `name` directly, sorted."""
        with self._mutex:
            if name not in self._graph:
                return []
            return sorted(self._graph.predecessors(name))

    def find_loop(self, fdef: FilterDef) -> list[str] | None:
        """The loop `fdef` would close if defined (`[a, b, ..., a]`), or None."""
        with self._mutex:
            return _find_cycle(self._graph, fdef.name, fdef.referenced_names())

    # ---------------------------------------------------------------- define

    def check_define(self, fdef: FilterDef, *, text: str | None = None) -> DefineResult:
        """Validate a define without changing anything (for dry runs).

        `text` says `fdef` came from `canonical()` already (with that text),
        which spares the caller a second format and parse.  Raises
        `ValidationError` (unsafe name), `ConflictError` (name or UUID taken
        by another filter) or `LoopError` (the cycle, by name).
        """
        if text is None:
            fdef, text = self.canonical(fdef)
        return self._check_define(fdef)

    @staticmethod
    def canonical(fdef: FilterDef) -> tuple[FilterDef, str]:
        """The definition as it reads back from its file, and that file's text.

        Formatting fills in libvirt's defaults (a chain's priority, ...), so
        the pool keeps what a reload would give, not what it was handed; the
        parse of the text is also the check that it can be printed.
        """
        validate_filter_name(fdef.name)
        text = serialize(filter_element(fdef))
        return parse_filter(text, source=f"filter '{fdef.name}'"), text

    def _check_define(self, fdef: FilterDef) -> DefineResult:
        with self._mutex:
            old = self._defs.get(fdef.name)
            if old is not None and old.uuid != fdef.uuid:
                raise ConflictError(
                    f"filter '{fdef.name}' already exists with uuid {old.uuid}"
                )
            owner = self._by_uuid.get(fdef.uuid)
            if owner is not None and owner != fdef.name:
                raise ConflictError(
                    f"filter with same UUID {fdef.uuid} but different name ('{owner}')"
                    " already exists"
                )
            cycle = _find_cycle(self._graph, fdef.name, fdef.referenced_names())
            if cycle is not None:
                raise LoopError(
                    f"filter '{fdef.name}' would close the reference loop "
                    + " -> ".join(cycle)
                )
            changed = old != fdef
            affected = (
                frozenset(nx.ancestors(self._graph, fdef.name)) | {fdef.name}
                if fdef.name in self._graph
                else frozenset({fdef.name})
            )
        return DefineResult(fdef.name, fdef.uuid, old is None, changed, affected)

    def define(self, fdef: FilterDef) -> DefineResult:
        """Add or replace a filter, taking the pool write lock."""
        with self.lock.write():
            return self.define_locked(fdef)

    def define_locked(self, fdef: FilterDef, *, text: str | None = None) -> DefineResult:
        """`define` for a caller that holds `lock` for writing (`text` as in
        `check_define`)."""
        if text is None:
            fdef, text = self.canonical(fdef)
        with self._mutex:
            result = self._check_define(fdef)
            if not result.changed:
                return result
            self._dir.get().write(self._file_name(fdef.name), text)
            defs = dict(self._defs)
            defs[fdef.name] = fdef
            self._defs = defs
            self.generation += 1
            self._by_uuid[fdef.uuid] = fdef.name
            _set_edges(self._graph, fdef.name, fdef.referenced_names())
        log.info("defined filter '%s' (%s)", fdef.name, "new" if result.created else "replaced")
        self._notify(result.affected)
        return result

    def replace_locked(self, changes: Mapping[str, tuple[FilterDef, str] | None]) -> None:
        """Take definitions checked elsewhere (`nwfilter.cluster.view`): each
        name gets its canonical definition and text, or is removed (None).
        The caller holds `lock` for writing.  Writes the files, then calls
        the listeners once with every filter that reached a changed one."""
        if not changes:
            return
        with self._mutex:
            affected = frozenset().union(
                *(nx.ancestors(self._graph, n) | {n} if n in self._graph else {n}
                  for n in changes)
            )
            directory = self._dir.get()
            defs = dict(self._defs)
            for name, change in sorted(changes.items()):
                old = defs.pop(name, None)
                if old is not None:
                    self._by_uuid.pop(old.uuid, None)
                if change is None:
                    if old is not None:
                        directory.remove(self._file_name(name))
                    _set_edges(self._graph, name, frozenset())
                    _drop_if_orphan(self._graph, name)
                    continue
                fdef, text = change
                directory.write(self._file_name(name), text)
                defs[name] = fdef
                self._by_uuid[fdef.uuid] = name
                _set_edges(self._graph, name, fdef.referenced_names())
            self._defs = defs
            self.generation += 1
        log.info("replaced %d filter(s): %s", len(changes), ", ".join(sorted(changes)))
        self._notify(affected)

    # -------------------------------------------------------------- undefine

    def users(self, name: str) -> list[str]:
        """Who keeps `name` from being undefined: referencing filters, then
        the users the usage provider reports."""
        users = [f"filter '{ref}'" for ref in self.referrers(name)]
        with self._mutex:
            provider = self._usage
        if provider is not None:
            users.extend(provider(self.reached_by(name)))
        return users

    def check_undefine(self, name_or_uuid: str) -> UndefineResult:
        fdef = self.lookup(name_or_uuid)
        users = self.users(fdef.name)
        if users:
            raise InUseError(
                f"filter '{fdef.name}' is in use by " + ", ".join(users)
            )
        return UndefineResult(fdef.name, fdef.uuid, frozenset({fdef.name}))

    def undefine(self, name_or_uuid: str) -> UndefineResult:
        """Remove a filter nothing uses, taking the pool write lock."""
        with self.lock.write():
            return self.undefine_locked(name_or_uuid)

    def undefine_locked(self, name_or_uuid: str) -> UndefineResult:
        """`undefine` for a caller that holds `lock` for writing."""
        # The usage provider is called outside the mutex; the caller's
        # write lock keeps every other change out until we are done.
        result = self.check_undefine(name_or_uuid)
        with self._mutex:
            fdef = self._defs[result.name]
            self._dir.get().remove(self._file_name(fdef.name))
            defs = dict(self._defs)
            del defs[fdef.name]
            self._defs = defs
            self.generation += 1
            del self._by_uuid[fdef.uuid]
            _set_edges(self._graph, fdef.name, frozenset())
            _drop_if_orphan(self._graph, fdef.name)
        log.info("undefined filter '%s'", fdef.name)
        self._notify(result.affected)
        return result

    @staticmethod
    def _file_name(name: str) -> str:
        return f"{validate_filter_name(name)}.xml"


# ---------------------------------------------------------------- the graph


def _set_edges(graph: nx.DiGraph[str], name: str, refs: Iterable[str]) -> None:
    """Make `name`'s out-edges exactly `refs`, dropping orphaned targets."""
    new = set(refs)
    if name in graph:
        old = set(graph.successors(name))
    else:
        graph.add_node(name)
        old = set()
    for gone in old - new:
        graph.remove_edge(name, gone)
    for target in new - old:
        graph.add_edge(name, target)
    for gone in old - new:
        _drop_if_orphan(graph, gone)


def _drop_if_orphan(graph: nx.DiGraph[str], name: str) -> None:
    """Forget a node that nothing references and that has no edges of its own.

    A defined filter without edges is dropped from the graph too; every
    query treats a missing node as an isolated one.
    """
    if name in graph and graph.in_degree(name) == 0 and graph.out_degree(name) == 0:
        graph.remove_node(name)


def _find_cycle(
    graph: nx.DiGraph[str], name: str, refs: frozenset[str]
) -> list[str] | None:
    """The loop that giving `name` the references `refs` would close.

    Only paths from one of `refs` back to `name` matter (`name`'s current
    out-edges are replaced).  A bidirectional breadth-first search, forward
    from `refs` and backward from `name`, expands the smaller frontier each
    round, so the cost is bounded by the smaller of "what the references
    reach" and "what reaches the filter".
    """
    if name in refs:
        return [name, name]
    if name not in graph or not refs:
        return None
    starts = sorted(r for r in refs if r in graph)
    if not starts:
        return None
    # fwd[n]: predecessor of n on a path from a ref; None for a ref itself.
    fwd: dict[str, str | None] = dict.fromkeys(starts)
    # bwd[n]: successor of n on a path to `name`; None for `name` itself.
    bwd: dict[str, str | None] = {name: None}
    fwd_frontier: deque[str] = deque(starts)
    bwd_frontier: deque[str] = deque([name])
    meet: str | None = None  # `name` is not among `starts` (checked above)
    while meet is None and fwd_frontier and bwd_frontier:
        if len(fwd_frontier) <= len(bwd_frontier):
            nxt: deque[str] = deque()
            for node in fwd_frontier:
                for succ in sorted(graph.successors(node)):
                    if succ in fwd:
                        continue
                    fwd[succ] = node
                    if succ in bwd:
                        meet = succ
                        break
                    nxt.append(succ)
                if meet is not None:
                    break
            fwd_frontier = nxt
        else:
            nxt = deque()
            for node in bwd_frontier:
                for pred in sorted(graph.predecessors(node)):
                    # `name`'s own out-edges are about to be replaced.
                    if pred in bwd or pred == name:
                        continue
                    bwd[pred] = node
                    if pred in fwd:
                        meet = pred
                        break
                    nxt.append(pred)
                if meet is not None:
                    break
            bwd_frontier = nxt
    if meet is None:
        return None
    head: list[str] = []
    step: str | None = meet
    while step is not None:
        head.append(step)
        step = fwd[step]
    head.reverse()
    tail: list[str] = []
    step = bwd[meet]
    while step is not None:
        tail.append(step)
        step = bwd[step]
    return [name, *head, *tail]
