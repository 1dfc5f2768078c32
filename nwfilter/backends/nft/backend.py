"""The nft backend's applier: the only code that sends nftables commands.

`NftBackend` renders with `nwfilter.backends.nft.render`, sends each
`apply()` as one libnftables JSON batch (one kernel transaction), and keeps
an in-memory record of what it owns per port, updated only after the kernel
accepted the batch; so the cost of a change grows with what changed and the
tables are never listed on the apply path.  `reconcile()` (an engine's
start) and `repair()` (the monitor's) list both tables once, rebuild those
records from what the kernel holds (`readback`) and write only what
differs; a port whose stamp proves it in force (`readback.proven_record`)
is neither rendered nor, when it was handed over `Deferred`, compiled.
Only the rare transactions that drop and recreate the tables
(`replace_all`: no tables yet, or another layout) first read the
operator-filled ipset sets they recreate, to put their elements back.

Every transaction that creates, drops or recreates our tables first reads
their owner (`ownership`) and refuses when another root holds them; a first
creation claims them with `create`, which the kernel arbitrates.  The
layer-3 preconditions (`preconditions`) are checked, and the sysctls
restored, on request.

All kernel access happens with the calling thread inside the backend's
network namespace (`nwfilter.netns.in_netns`) and under the backend
transaction lock (`Level.BACKEND`).  The libnftables context is created
inside the namespace on first use by an injected factory.
"""

from __future__ import annotations

import ctypes
import heapq
import logging
import re
import threading
from collections.abc import Callable, Collection, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, Protocol

from nwfilter.backends import brnf
from nwfilter.backends.base import Deferred, Owner, Recorded, Wanted, compiled
from nwfilter.errors import BackendError, ConflictError, UnavailableError
from nwfilter.gcpause import gc_paused
from nwfilter.ir import Changes, Ruleset
from nwfilter.ir_digest import Memo, ruleset_digest
from nwfilter.locks import Level, LevelledLock
from nwfilter.netns import in_netns

from . import ownership, preconditions, readback, render
from .readback import ChainKey
from .render import BRIDGE, INET, TABLE, Batch, Capabilities, PortRecord

log = logging.getLogger(__name__)

# New dispatch elements proven one `get element` each (about 0.1 ms); past
# this many, one listing per map (about 5 ms with 1,000 ports) is cheaper.
PROOF_LOOKUPS = 32
# `get element` prints the element as nft text; keys never hold '"'.
_ELEMENT_TEXT = re.compile(r'elements = \{ "([^"]*)" : jump (\S+) \}')

class NftContext(Protocol):
    """The part of libnftables' Python binding we use."""

    def json_cmd(self, json_root: dict[str, Any]) -> tuple[int, Any, str]: ...

    def cmd(self, cmdline: str) -> tuple[int, str, str]: ...

    def set_json_output(self, value: bool) -> bool: ...

    def set_dry_run(self, onoff: bool) -> bool:
        """Switch check mode (the kernel validates, then aborts); return the old value."""
        ...


NftFactory = Callable[[], NftContext]


def default_nft_factory() -> NftContext:
    try:
        import nftables
    except ImportError as exc:  # pragma: no cover - depends on the host
        raise UnavailableError(
            "the libnftables Python binding is missing: install PyPI 'pip-nftables' "
            "(or Debian 'python3-nftables') and Debian 'libnftables1'"
        ) from exc
    try:
        ctx = nftables.Nftables()
    except OSError as exc:  # pragma: no cover
        raise UnavailableError(f"libnftables.so.1 cannot be loaded: {exc}") from exc
    ctx.set_json_output(True)
    ctx.set_handle_output(False)
    if not hasattr(ctx, "set_dry_run"):
        ctx.set_dry_run = _dry_run_switch(ctx)
    return ctx  # type: ignore[no-any-return]


def _dry_run_switch(ctx: Any) -> Callable[[bool], bool]:
    """`Nftables.set_dry_run` for bindings without it.

    pip-nftables 1.0.2 (PyPI's copy of python3-nftables 1.0.2) predates the
    method, which later upstream bindings have; libnftables has had
    nft_ctx_set_dry_run far longer.  The binding keeps its context handle
    private, and the library is loaded once per context, here."""
    raw = getattr(ctx, "_Nftables__ctx", None)
    if raw is None:
        raise UnavailableError("libnftables binding without a usable context")
    try:
        lib = ctypes.CDLL("libnftables.so.1")
    except OSError as exc:  # pragma: no cover - the binding loaded it already
        raise UnavailableError(f"libnftables.so.1 cannot be loaded: {exc}") from exc
    lib.nft_ctx_get_dry_run.argtypes = [ctypes.c_void_p]
    lib.nft_ctx_get_dry_run.restype = ctypes.c_bool
    lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
    lib.nft_ctx_set_dry_run.restype = None

    def set_dry_run(onoff: bool) -> bool:
        old = bool(lib.nft_ctx_get_dry_run(raw))
        lib.nft_ctx_set_dry_run(raw, onoff)
        return old

    return set_dry_run


class _PortIds:
    """Port ids 1..MAX_PORT_ID: ids given back are reused smallest first,
    the others come from a cursor; taking and giving back cost O(log n)."""

    def __init__(self) -> None:
        self._free: list[int] = []  # a heap
        self._next = 1

    @classmethod
    def reserving(cls, used: Iterable[int]) -> _PortIds:
        """Ids with `used` (read back from the kernel) already taken."""
        ids = cls()
        taken = set(used)
        ids._next = max(taken, default=0) + 1
        ids._free = [i for i in range(1, ids._next) if i not in taken]
        heapq.heapify(ids._free)
        return ids

    def take(self) -> int:
        if self._free:
            return heapq.heappop(self._free)
        if self._next > render.MAX_PORT_ID:
            raise BackendError(f"more than {render.MAX_PORT_ID} ports in one namespace")
        self._next += 1
        return self._next - 1

    def give_back(self, ids: Iterable[int]) -> None:
        for port_id in ids:
            heapq.heappush(self._free, port_id)


def _drop_tables() -> Batch:
    """Commands deleting our tables whether or not they exist: 'destroy'
    would say it directly but needs nft >= 1.0.8; 'add' then 'delete' in one
    batch works everywhere."""
    batch = Batch()
    for family in (BRIDGE, INET):
        batch.add({"add": {"table": {"family": family, "name": TABLE}}})
        batch.add({"delete": {"table": {"family": family, "name": TABLE}}})
    return batch


class NftBackend:
    """nftables backend (see render.py for the layout)."""

    name = "nft"
    # Learnt addresses are set elements with the lease as timeout (render.py).
    learnt_sets = True

    def __init__(
        self,
        netns: str | None = None,
        *,
        nft_factory: NftFactory = default_nft_factory,
        lock: LevelledLock | None = None,
        manage_sysctls: bool = True,
    ) -> None:
        self.netns = netns
        self._factory = nft_factory
        self._ctx: NftContext | None = None
        self._lock = lock or LevelledLock(f"nft backend {netns or 'host'}", Level.BACKEND)
        self._manage_sysctls = manage_sysctls
        self._records: dict[str, PortRecord] = {}
        # What each port's records were rendered from (a `Deferred` until
        # its ruleset is needed; `_ruleset` compiles it then).
        self._rulesets: dict[str, Wanted] = {}
        self._ids = _PortIds()
        self._base_ready = False
        self._caps: Capabilities | None = None
        self._state_lock = threading.Lock()
        # What the last scan for foreign mark writers found (None: no scan yet).
        self._mark_scan: tuple[str, ...] | None = None  # guards the records for readers
        self._owner: Owner | None = None

    # -- plumbing ------------------------------------------------------------
    @contextmanager
    def _kernel(self) -> Iterator[NftContext]:
        with self._lock, in_netns(self.netns):
            if self._ctx is None:
                self._ctx = self._factory()
            yield self._ctx

    def _send(self, ctx: NftContext, batch: Batch) -> tuple[int, str]:
        if not batch.commands:
            return 0, ""
        rc, _out, err = ctx.json_cmd(batch.document())
        return rc, err

    def _dry_ok(self, ctx: NftContext, commands: list[dict[str, Any]]) -> bool:
        rc, _out, _err = ctx.json_cmd({"nftables": commands})
        return rc == 0

    def _locate_failure(self, ctx: NftContext, batch: Batch, err: str) -> str:
        """After a refused batch: name the rule at fault.  libnftables names
        the command index of JSON it cannot parse; for refusals by the
        kernel, bisect in check mode (nothing is committed)."""
        parsed = re.search(r"command array at index (\d+)", err)
        if parsed and int(parsed.group(1)) < len(batch.origins):
            origin = batch.origins[int(parsed.group(1))]
            return f"port '{origin[0]}', {origin[1]}" if origin else ""
        ctx.set_dry_run(True)
        try:
            if self._dry_ok(ctx, batch.commands):
                return ""
            rule_idx = [i for i, o in enumerate(batch.origins) if o is not None]
            structural = [c for i, c in enumerate(batch.commands) if batch.origins[i] is None]
            if not self._dry_ok(ctx, structural):
                return ""
            lo, hi = 0, len(rule_idx)  # smallest prefix of rules that fails
            while lo < hi:
                mid = (lo + hi) // 2
                keep = set(rule_idx[: mid + 1])
                cmds = [c for i, c in enumerate(batch.commands)
                        if batch.origins[i] is None or i in keep]
                if self._dry_ok(ctx, cmds):
                    lo = mid + 1
                else:
                    hi = mid
            if lo < len(rule_idx):
                origin = batch.origins[rule_idx[lo]]
                if origin is not None:
                    return f"port '{origin[0]}', {origin[1]}"
            return ""
        finally:
            ctx.set_dry_run(False)

    def _ensure_sysctls(self) -> None:
        if self._manage_sysctls:
            brnf.ensure(self._where())

    def _where(self) -> str:
        return f"namespace '{self.netns}'" if self.netns else "the host's namespace"

    def _read_owner(self, ctx: NftContext) -> Owner | None:
        for family in ownership.FAMILIES:
            rc, out, _err = ctx.json_cmd(ownership.list_commands(family))
            found = ownership.owner_in(out) if rc == 0 else None
            if found is not None:
                return found
        return None

    def _refuse(self, held: Owner) -> ConflictError:
        mine = f" (this is {self._owner.describe()})" if self._owner else ""
        return ConflictError(
            f"the nwfilter tables of {self._where()} are owned by {held.describe()}"
            f"{mine}; nothing was changed"
        )

    def _claim(self, ctx: NftContext) -> None:
        """Make sure the tables are ours before creating or recreating them:
        refuse another root's, claim unowned ones (one transaction that
        fails if anyone claimed meanwhile).  A backend without an owner
        (tests, tools) never claims, and still refuses owned tables."""
        held = self._read_owner(ctx)
        if held is not None:
            if self._owner is not None and held.same_root(self._owner):
                return
            raise self._refuse(held)
        if self._owner is None:
            return
        rc, err = self._send(ctx, ownership.marker(self._owner, claim=True))
        if rc == 0:
            log.info("nft: %s claimed by %s", self._where(), self._owner.describe())
            return
        held = self._read_owner(ctx)
        if held is not None and not held.same_root(self._owner):
            raise self._refuse(held)
        if held is None:
            raise BackendError(f"cannot claim the nwfilter tables of {self._where()}: "
                               f"{err.strip()}")

    def _remark(self, batch: Batch) -> None:
        """After `_drop_tables()` in `batch`: recreate the tables with the
        owner marker first, so it lists first as after a claim."""
        if self._owner is not None:
            batch.extend(ownership.marker(self._owner, claim=True))

    # -- Backend protocol ----------------------------------------------------
    def set_owner(self, owner: Owner) -> None:
        self._owner = owner

    def owner(self) -> Owner | None:
        with self._kernel() as ctx:
            return self._read_owner(ctx)

    def preconditions(
        self, *, repair: bool = False, scan: bool = True, cached: bool = False
    ) -> tuple[str, ...]:
        with self._kernel() as ctx:
            problems = brnf.problems(self._where(), repair=repair and self._manage_sysctls)
            if scan:
                # `list tables` makes libnftables 1.0.6 fetch the whole
                # ruleset: answers on hot paths reuse the last findings.
                if not cached or self._mark_scan is None:
                    self._mark_scan = tuple(self._mark_writers(ctx))
                problems.extend(self._mark_scan)
        return tuple(problems)

    def _mark_writers(self, ctx: NftContext) -> list[str]:
        rc, out, err = ctx.json_cmd({"nftables": [{"list": {"tables": None}}]})
        if rc != 0 or not isinstance(out, dict):
            return [f"the tables of {self._where()} cannot be listed: {err.strip()}"]
        found: list[str] = []
        for item in out.get("nftables", ()):
            table = item.get("table") if isinstance(item, dict) else None
            if not isinstance(table, dict) or preconditions.ours(table["family"], table["name"]):
                continue
            rc, listing, _err = ctx.json_cmd({"nftables": [{"list": {"table": {
                "family": table["family"], "name": table["name"]}}}]})
            if rc == 0 and isinstance(listing, dict):
                found.extend(preconditions.mark_writers(listing.get("nftables", [])))
        return found

    def probe(self) -> None:
        with self._kernel() as ctx:
            self._caps = self._probe(ctx)
            if not brnf.available():
                raise UnavailableError(
                    "br_netfilter is not loaded (modprobe br_netfilter): layer-3 rules "
                    "need it to see bridged traffic"
                )

    def _probe(self, ctx: NftContext) -> Capabilities:
        ctx.set_dry_run(True)
        try:
            name = "nwfilter_probe"
            table = {"family": BRIDGE, "name": name}
            chain = {"family": BRIDGE, "table": name, "name": "p", "type": "filter",
                     "hook": "prerouting", "prio": -300, "policy": "accept"}
            base = [{"add": {"table": table}}, {"add": {"chain": chain}}]
            rc, _o, err = ctx.json_cmd({"nftables": base})
            if rc != 0:
                raise UnavailableError(f"nftables bridge family unusable: {err.strip()}")
            itable = {"family": INET, "name": name}
            ichain = {"family": INET, "table": name, "name": "p", "type": "filter",
                      "hook": "forward", "prio": 0, "policy": "accept"}
            ct = {"add": {"rule": {"family": INET, "table": name, "chain": "p", "expr": [
                {"match": {"op": "in", "left": {"ct": {"key": "state"}},
                           "right": "established"}}, {"accept": None}]}}}
            rc, _o, err = ctx.json_cmd({"nftables": [{"add": {"table": itable}},
                                                     {"add": {"chain": ichain}}, ct]})
            if rc != 0:
                raise UnavailableError(f"nftables inet conntrack unusable: {err.strip()}")
            reject = {"add": {"rule": {"family": BRIDGE, "table": name, "chain": "p", "expr": [
                {"reject": {"type": "icmpx", "expr": "port-unreachable"}}]}}}
            rc, _o, _err = ctx.json_cmd({"nftables": [*base, reject]})
            return Capabilities(bridge_reject=rc == 0)
        finally:
            ctx.set_dry_run(False)

    def capabilities(self) -> Capabilities:
        if self._caps is None:
            self.probe()
        assert self._caps is not None
        return self._caps

    def check(self, ruleset: Ruleset) -> None:
        previous = self._ruleset(ruleset.port.portdev)
        render.check_ruleset(ruleset, self.capabilities(), previous=previous)

    def _ruleset(self, portdev: str) -> Ruleset | None:
        """The recorded ruleset of a port, compiled now if it was deferred."""
        return self.recorded().get(portdev)

    def apply(self, changes: Changes) -> None:
        if changes.is_empty():
            return
        caps = self.capabilities()
        # The lock covers render, send and bookkeeping: two applies never
        # render against the same stale record.
        with self._kernel() as ctx, gc_paused():
            self._apply_locked(ctx, changes, caps)

    def _apply_locked(self, ctx: NftContext, changes: Changes, caps: Capabilities) -> int:
        """`apply` with the lock held; the number of commands sent."""
        fresh = changes.replace_all
        # Only read until the kernel said yes, then updated in place.
        records = {} if fresh else self._records
        previous_rulesets: Mapping[str, Ruleset] = {} if fresh else self.recorded()
        ids = _PortIds() if fresh else self._ids
        batch = Batch()
        if fresh:
            # An earlier process may have left tables we have no record
            # of: replace them wholesale, atomically, in this transaction
            # (if they are ours, or nobody's).
            self._claim(ctx)
            self._ensure_sysctls()
            batch.extend(_drop_tables())
            self._remark(batch)
            batch.extend(render.render_base())
        elif not self._base_ready:
            self._claim(ctx)
            self._ensure_sysctls()
            batch.extend(render.render_base())
        updates: dict[str, PortRecord | None] = {}  # None: removed
        freed: list[int] = []
        taken: list[int] = []
        try:
            for name in sorted(set(changes.remove)):
                old = records.get(name)
                if old is not None:
                    batch.extend(render.render_remove(old))
                    updates[name] = None
                    freed.append(old.port_id)
            for ruleset in sorted(changes.set, key=lambda r: r.port.portdev):
                portdev = ruleset.port.portdev
                previous = updates[portdev] if portdev in updates else records.get(portdev)
                if previous is None:
                    port_id = ids.take()
                    taken.append(port_id)
                else:
                    port_id = previous.port_id
                port_batch, record = render.render_port(
                    ruleset, port_id, previous, caps, previous_rulesets.get(portdev)
                )
                batch.extend(port_batch)
                updates[portdev] = record
            remaining = (
                len(records)
                + sum(1 for n, r in updates.items() if r is not None and n not in records)
                - sum(1 for r in updates.values() if r is None)
            )
            if not remaining:
                # The last port is gone: nothing of ours stays in the namespace.
                batch = _drop_tables()
            elif fresh:
                batch.extend(self._kept_ipset_elements(
                    ctx, (r for r in updates.values() if r is not None)))
            rc, err = self._send(ctx, batch)
            if rc != 0:
                where = self._locate_failure(ctx, batch, err)
                ports = ", ".join(sorted({r.port.portdev for r in changes.set} |
                                         set(changes.remove)))
                raise BackendError(
                    f"nft refused the transaction for {where or 'port(s) ' + ports}: "
                    f"{err.strip() or 'rc ' + str(rc)}; nothing was changed"
                )
            wrong = self._prove_keys(ctx, updates, records) if remaining else []
            if wrong:
                self._undo(ctx, caps)
                raise BackendError(
                    "nft holds a dispatch key other than the port name: "
                    f"{'; '.join(wrong)}; the transaction was undone"
                )
        except BaseException:
            ids.give_back(taken)
            raise
        ids.give_back(freed)
        self._ids = ids if remaining else _PortIds()
        self._base_ready = remaining > 0
        with self._state_lock:
            if fresh:
                self._records = {}
                self._rulesets = {}
            for name, new in updates.items():
                if new is None:
                    del self._records[name]
                else:
                    self._records[name] = new
            for name in changes.remove:
                self._rulesets.pop(name, None)
            for ruleset in changes.set:
                self._rulesets[ruleset.port.portdev] = ruleset
        log.debug("nft: applied %d set, %d remove in %d commands", len(changes.set),
                  len(changes.remove), len(batch.commands))
        return len(batch.commands)

    def reconcile(
        self, rulesets: Sequence[Wanted], *, distrust: Collection[ChainKey] | None = ()
    ) -> int:
        """Make the kernel hold exactly `rulesets`, writing only the difference.

        Reads both tables back (one listing each), rebuilds the records of
        what each port owns from them (chains, dispatch elements, port ids,
        connlimit sets, the digest of every rule), renders `rulesets`
        against those records and sends what differs in one transaction:
        none at all when nothing does.  Port ids, chain names, counters and
        set elements of what is kept survive.  Both tables are replaced
        (one transaction, as `replace_all`) only when there are none yet or
        their layout is not this version's.  Returns the number of commands
        sent (0: the kernel was not written).

        `distrust` names chains ((family, name); None: every chain) whose
        rules are rewritten whatever their comments say: the chains a
        foreign transaction touched (see `repair`).

        A `Deferred` port whose stamp proves it stays deferred; any other
        is compiled and rendered."""
        wanted = {rs.port.portdev: rs for rs in rulesets}
        if len(wanted) != len(rulesets):
            raise BackendError("a port is given twice to reconcile")
        caps = self.capabilities()
        with self._kernel() as ctx, gc_paused():
            listing = self._list_tables(ctx)
            if not listing.tables and not wanted:
                self._forget()
                return 0
            problem = readback.layout_problem(listing) if listing.tables else None
            if not listing.tables or problem is not None:
                if problem is not None:
                    log.warning("nft: the tables of %s are replaced: %s", self._where(), problem)
                return self._apply_locked(ctx, Changes(
                    set=tuple(compiled(rs) for rs in rulesets), replace_all=True), caps)
            readback.distrust(listing, distrust)
            self._claim(ctx)
            if not wanted:
                sent = self._apply_locked(ctx, Changes(replace_all=True), caps)
                self._forget()
                return sent
            self._ensure_sysctls()
            batch, before, records, ids, used = self._reconcile_batch(listing, wanted, caps)
            if batch.commands:
                rc, err = self._send(ctx, batch)
                if rc != 0:
                    where = self._locate_failure(ctx, batch, err)
                    raise BackendError(
                        f"nft refused to reconcile {where or self._where()}: "
                        f"{err.strip() or 'rc ' + str(rc)}; nothing was changed")
            self._ids = ids
            self._base_ready = True
            with self._state_lock:
                self._records = records
                self._rulesets = used
            wrong = self._prove_keys(ctx, dict(records), before)
            if wrong:
                # Port names that reach this are refused by check_port_name;
                # the records say what the kernel holds, the start fails.
                raise BackendError("nft holds a dispatch key other than the port name: "
                                   + "; ".join(wrong))
        log.info("nft: reconciled %d port(s) in %s with %d command(s)", len(wanted),
                 self._where(), len(batch.commands))
        return len(batch.commands)

    def record(self, portdev: str) -> tuple[Ruleset, PortRecord] | None:
        """The ruleset last applied to one port and the record of what it
        rendered to (chains, digests), or None (for stats of a few ports)."""
        ruleset = self.recorded().get(portdev)  # a deferred one is compiled now
        with self._state_lock:
            rec = self._records.get(portdev)
        return None if ruleset is None or rec is None else (ruleset, rec)

    def records(self) -> dict[str, tuple[Wanted, PortRecord]]:
        """Per port, the ruleset last applied (`compiled` gives a deferred
        one) and the record of what it rendered to (chains, digests): one
        snapshot of every port, for audits."""
        with self._state_lock:
            return {port: (self._rulesets[port], rec) for port, rec in self._records.items()
                    if port in self._rulesets}

    def listing(self) -> readback.Listing:
        """Both tables as the kernel holds them now (one listing each; for
        audits), changing nothing."""
        return readback.parse(self.listing_text())

    def listing_text(self) -> dict[str, str | None]:
        """The text listing of each table (None: no such table)."""
        with self._kernel() as ctx:
            return self._table_texts(ctx)

    def chain_texts(self, chains: Iterable[ChainKey]) -> dict[str, str | None]:
        """Per family, the text listing of the given chains ((family, name))
        one after the other, as `listing_text` gives whole tables (a chain
        that does not exist is left out); for reading a few ports' counters
        without listing every port's."""
        parts: dict[str, list[str]] = {BRIDGE: [], INET: []}
        with self._kernel() as ctx:
            was_json = ctx.set_json_output(False)
            try:
                for family, name in chains:
                    rc, out, _err = ctx.cmd(f"list chain {family} {TABLE} {name}")
                    if rc == 0:
                        parts[family].append(out)
            finally:
                ctx.set_json_output(was_json)
        return {family: "".join(texts) for family, texts in parts.items()}

    def _list_tables(self, ctx: NftContext) -> readback.Listing:
        return readback.parse(self._table_texts(ctx))

    def _table_texts(self, ctx: NftContext) -> dict[str, str | None]:
        answers: dict[str, str | None] = {}
        was_json = ctx.set_json_output(False)
        try:
            for family in (BRIDGE, INET):
                rc, out, _err = ctx.cmd(readback.list_command(family))
                answers[family] = out if rc == 0 else None
        finally:
            ctx.set_json_output(was_json)
        return answers

    def _forget(self) -> None:
        self._ids = _PortIds()
        self._base_ready = False
        with self._state_lock:
            self._records = {}
            self._rulesets = {}

    def _reconcile_batch(
        self, listing: readback.Listing, wanted: dict[str, Wanted], caps: Capabilities
    ) -> tuple[Batch, dict[str, PortRecord], dict[str, PortRecord], _PortIds,
               dict[str, Wanted]]:
        """The commands taking the kernel from `listing` to `wanted`, the
        records read back, the records afterwards, the port ids, and what
        each port's record stands for (deferred where proven)."""
        known = readback.port_ids(listing, wanted)
        ids = _PortIds.reserving(known.values())
        before = {
            portdev: readback.port_record(listing, portdev, known.get(portdev) or ids.take())
            for portdev in sorted(wanted)
        }
        batch = Batch()
        drift = readback.base_drift(listing)
        if drift:
            batch.extend(render.render_base(drift))
        # Dispatch elements no port owns exactly go first (before any chain
        # they may point to is deleted); the ports add theirs last.
        owned: set[tuple[tuple[str, str], Any]] = set()
        for record in before.values():
            owned.update(((BRIDGE, render.L2_MAP[h]), record.portdev) for h in record.l2_hooks)
            owned.update(((INET, render.L3_MAP[h]), record.port_id << render.shift(h))
                         for h in record.l3_hooks)
        for (family, vmap), elements in sorted(listing.elements.items()):
            for key in sorted(elements, key=repr):
                if ((family, vmap), key) not in owned:
                    batch.add(render.delete_element(family, vmap, key))
        kept = {(BRIDGE, n) for r in before.values() for n in r.bridge_chains}
        kept |= {(INET, n) for r in before.values() for n in r.inet_chains}
        stale = sorted(listing.port_chains() - kept)
        for family, name in stale:
            batch.add({"flush": {"chain": {"family": family, "table": TABLE, "name": name}}})
        records: dict[str, PortRecord] = {}
        kept_items: dict[str, Wanted] = {}
        memo: Memo = {}
        for portdev, record in before.items():
            item = wanted[portdev]
            digest = item.digest if isinstance(item, Deferred) else ruleset_digest(item, memo)
            proven = readback.proven_record(listing, record, digest, caps)
            if proven is not None:  # its stamp proves a render would write nothing
                records[portdev], kept_items[portdev] = proven, item
                continue
            ruleset = compiled(item)
            port_batch, records[portdev] = render.render_port(
                ruleset, record.port_id, record, caps)
            batch.extend(port_batch)
            kept_items[portdev] = ruleset
        for family, name in stale:
            batch.add({"delete": {"chain": {"family": family, "table": TABLE, "name": name}}})
        used = {name for r in records.values() for names in r.chain_sets.values()
                for name in names}
        handled = {name for r in before.values() for name in r.sets}
        for name in sorted(set(listing.sets) - used - handled):
            batch.add({"delete": {"set": {"family": INET, "table": TABLE, "name": name}}})
        learn_handled = {key for r in before.values() for key in r.learn_sets}
        learn_handled |= {key for r in records.values() for key in r.learn_sets}
        for family, name in sorted(set(listing.learn_sets) - learn_handled):
            batch.add({"delete": {"set": {"family": family, "table": TABLE, "name": name}}})
        return batch, before, records, ids, kept_items

    def _prove_keys(
        self, ctx: NftContext, updates: dict[str, PortRecord | None],
        records: dict[str, PortRecord],
    ) -> list[str]:
        """After a committed transaction: read back every dispatch element
        it added and compare its key, byte for byte, with the port name (and
        its chain with the port's root chain).  One `get element` per new
        element; past `PROOF_LOOKUPS` of them, one listing per map is cheaper.
        What is wrong, as text; empty when every key is exact."""
        wanted: dict[str, dict[str, str]] = {}  # vmap -> portdev -> root chain
        for portdev, record in updates.items():
            if record is None:
                continue
            old = records.get(portdev)
            for hook in record.l2_hooks - (old.l2_hooks if old else frozenset()):
                wanted.setdefault(render.L2_MAP[hook], {})[portdev] = render.l2_chain_name(
                    portdev, hook, "root")
        found: dict[str, dict[str, str]] = {}
        if sum(len(ports) for ports in wanted.values()) <= PROOF_LOOKUPS:
            was_json = ctx.set_json_output(False)
            try:
                for vmap, ports in wanted.items():
                    found[vmap] = {}
                    for portdev in ports:
                        # The rule of port names keeps '"' out of them.
                        _rc, text, _err = ctx.cmd(
                            f'get element {BRIDGE} {TABLE} {vmap} {{ "{portdev}" }}')
                        got = _ELEMENT_TEXT.search(text)
                        if got is not None:
                            found[vmap][got.group(1)] = got.group(2)
            finally:
                ctx.set_json_output(was_json)
        else:
            for vmap in wanted:
                found[vmap] = self._map_elements(ctx, vmap)
        wrong = []
        for vmap, ports in sorted(wanted.items()):
            for portdev, chain in sorted(ports.items()):
                if found[vmap].get(portdev) != chain:
                    wrong.append(f"port '{portdev}' has no exact key in map {vmap}")
        return wrong

    def _map_elements(self, ctx: NftContext, vmap: str) -> dict[str, str]:
        rc, out, _err = ctx.json_cmd({"nftables": [{"list": {"map": {
            "family": BRIDGE, "table": TABLE, "name": vmap}}}]})
        elements: dict[str, str] = {}
        if rc != 0 or not isinstance(out, dict):
            return elements
        for item in out.get("nftables", ()):
            if not isinstance(item, dict) or "map" not in item:
                continue
            for key, data in item["map"].get("elem", ()):
                if isinstance(key, str) and isinstance(data, dict) and "jump" in data:
                    elements[key] = data["jump"].get("target", "")
        return elements

    def _undo(self, ctx: NftContext, caps: Capabilities) -> None:
        """Put back what the records say the kernel held before the last
        transaction (they are updated only after a proven one)."""
        records: dict[str, PortRecord] = {}
        if not self._records:
            batch = _drop_tables()
        else:
            batch, records = self._reinstall_batch(ctx, caps)
        rc, err = self._send(ctx, batch)
        if rc != 0:
            log.error("nft: could not undo a transaction with inexact keys: %s", err.strip())
            return
        self._base_ready = bool(records)
        with self._state_lock:
            self._records = records

    def _kept_ipset_elements(self, ctx: NftContext, records: Iterable[PortRecord]) -> Batch:
        """Commands putting back what the operator added to the ipset sets
        `records` use, read now from the kernel: for transactions that drop
        and recreate our tables (never on the normal apply path).  One
        listing per set; a set not there yet has nothing to keep."""
        names = sorted({name for record in records for used in record.chain_sets.values()
                        for name in used if name.startswith(render.IPSET_PREFIX)})
        batch = Batch()
        for name in names:
            rc, out, _err = ctx.json_cmd({"nftables": [{"list": {"set": {
                "family": INET, "table": TABLE, "name": name}}}]})
            if rc != 0 or not isinstance(out, dict):
                continue
            for item in out.get("nftables", ()):
                elems = item.get("set", {}).get("elem") if isinstance(item, dict) else None
                if elems:
                    batch.add({"add": {"element": {"family": INET, "table": TABLE,
                                                   "name": name, "elem": elems}}})
        if names:
            log.debug("nft: keeping the elements of %d ipset set(s)", len(names))
        return batch

    def clear(self, portdev: str) -> None:
        if portdev in self._records:
            self.apply(Changes(remove=(portdev,)))

    def clear_all(self) -> None:
        with self._kernel() as ctx:
            held = self._read_owner(ctx)
            if held is not None and not held.same_root(self._owner):
                raise self._refuse(held)
            batch = Batch()
            batch.extend(_drop_tables())
            rc, err = self._send(ctx, batch)
            if rc != 0:
                raise BackendError(f"nft refused to delete the nwfilter tables: {err.strip()}")
            self._base_ready = False
            self._ids = _PortIds()
            with self._state_lock:
                self._records = {}
                self._rulesets = {}

    def ports(self) -> tuple[str, ...]:
        with self._state_lock:
            return tuple(sorted(self._records))

    def read_back(self, portdev: str) -> str:
        with self._state_lock:
            record = self._records.get(portdev)
        if record is None:
            return ""
        out: list[str] = []
        with self._kernel() as ctx:
            was_json = ctx.set_json_output(False)
            try:
                for family, chains in ((BRIDGE, record.bridge_chains),
                                       (INET, record.inet_chains)):
                    for chain in sorted(chains):
                        rc, text, err = ctx.cmd(f"list chain {family} {TABLE} {chain}")
                        if rc != 0:
                            raise BackendError(f"cannot read chain {chain}: {err.strip()}")
                        out.append(text)
            finally:
                ctx.set_json_output(was_json)
        return "".join(out)

    # -- state for self-healing ----------------------------------------------
    def recorded(self) -> Mapping[str, Ruleset]:
        """The rulesets the kernel should hold, as last accepted (deferred
        ones compiled when looked up)."""
        return Recorded(self._rulesets, self._state_lock)

    def repair(self, distrust: Collection[ChainKey] | None = None) -> int:
        """Bring the kernel back to the recorded state after a foreign edit,
        in one transaction: `reconcile` with the recorded rulesets, every
        chain in `distrust` ((family, name); None: all of them) rewritten
        whatever its comments say.  Tables, sets (with the operator's ipset
        elements and the connlimit counts), port ids and untouched chains
        stay.  Never "repairs" another root's tables away: after a flush
        the tables are claimed again first, which another root may win.
        Returns the number of commands sent."""
        with self._state_lock:
            rulesets = list(self._rulesets.values())
        if not rulesets:
            return 0  # nothing of ours should be there
        return self.reconcile(rulesets, distrust=distrust)

    def reinstall(self) -> None:
        """Rewrite every chain from the recorded state (`repair` of all)."""
        self.repair(None)

    def _reinstall_batch(
        self, ctx: NftContext, caps: Capabilities
    ) -> tuple[Batch, dict[str, PortRecord]]:
        """Both tables as the records say, with the operator's ipset elements."""
        batch = Batch()
        batch.extend(_drop_tables())
        self._remark(batch)
        batch.extend(render.render_base())
        records: dict[str, PortRecord] = {}
        for portdev, ruleset in sorted(self.recorded().items()):
            port_id = self._records[portdev].port_id
            port_batch, record = render.render_port(ruleset, port_id, None, caps)
            batch.extend(port_batch)
            records[portdev] = record
        batch.extend(self._kept_ipset_elements(ctx, records.values()))
        return batch, records
