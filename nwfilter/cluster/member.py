"""This host's part in the cluster: follow the shared pool, change it, say how it is.

Keys, under the cluster's prefix P (default `/nwfilter/`):

| key | value | lease |
| --- | --- | --- |
| `P pool/NAME` | the canonical XML of filter NAME | none |
| `P head` | who made the last pool change; its mod revision is the pool's | none |
| `P hosts/HOST` | when HOST joined (JSON); stays after it is gone | none |
| `P live/HOST` | HOST's applied revision, refused revisions (JSON) | HOST's |
| `P uses/HOST` | the root filters of HOST's bindings (JSON) | HOST's |

Following: a watcher thread reads the pool's changes from the revision
after the last one applied, checks each (`nwfilter.cluster.view`), and
hands every watch response to the engine as one batch, one kernel
transaction (`Engine.replace_filters`); then it records the revision
(`ROOT/cluster/state.json`), so a restart resumes from there.  When etcd
has compacted that history away, or at the first start, it compares the
whole pool instead.  A document that fails the checks is not applied: the
host keeps the last good definition and reports the revision.

Changing: a define or undefine waits until this host has applied the
pool's revision, checks against its copy (which is then the cluster's
pool), and commits one transaction guarded by the filter key's mod
revision and the pool's head: if anything changed meanwhile, it is
checked again on the newer pool, so no update is lost and two hosts
never both win.

Publishing: a second thread holds this host's lease (keep-alives every
third of its TTL) and writes `live/` and `uses/` when they change.  When
the host dies its lease expires and both keys go: `cluster status` shows
it gone, and its ports no longer hold filters in use.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from nwfilter.cluster.config import ClusterConfig
from nwfilter.cluster.store import CompactedError, Compare, Delete, EtcdStore, Put, WatchBatch
from nwfilter.cluster.view import PoolView
from nwfilter.conf import parse_filter
from nwfilter.errors import (
    ConflictError,
    InUseError,
    NwfilterError,
    StorageError,
    UnavailableError,
)
from nwfilter.fileio import SafeDir
from nwfilter.pool import FilterPool, UndefineResult

if TYPE_CHECKING:
    from nwfilter.engine import DefineOutcome, Engine

log = logging.getLogger(__name__)

STATE_DIR = "cluster"
STATE_FILE = "state.json"
#: times a define is checked again after other hosts' changes came first
MAX_TRIES = 30
#: seconds a change waits for this host to apply the pool's revision
CATCH_UP_WAIT = 10.0
#: refused revisions kept for `cluster status`
MAX_BAD = 20
#: filters the first host puts into an empty cluster in one transaction
#: (etcd's default --max-txn-ops is 128; one more operation writes the head)
MAX_SEED = 127


@dataclass(frozen=True)
class BadRevision:
    """A pool document this host refused to apply."""

    revision: int
    key: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return {"revision": self.revision, "key": self.key, "reason": self.reason}


class ClusterMember:
    """The cluster side of one `nwfilterd`."""

    def __init__(self, engine: Engine, config: ClusterConfig) -> None:
        self.engine = engine
        self.config = config
        self.host = config.host
        self._store = EtcdStore(config)  # changes, status, the lease
        self._watch_store = EtcdStore(config)  # the watcher's own connections
        self._cond = threading.Condition()
        # Guarded by _cond: how far this host follows the pool.
        self.applied = 0
        self._cluster_id = ""
        self._mod: dict[str, int] = {}  # filter name -> mod revision applied
        self._compare = True  # a full compare is due before watching
        self.connected = False
        self.error: str | None = None
        self.bad: list[BadRevision] = []
        self.full_compares = 0
        self._stopped = threading.Event()
        self._wake = threading.Event()
        self._publish_live = True
        self._publish_uses = True
        self._lease = 0
        self._threads: list[threading.Thread] = []
        self._ready = threading.Event()
        self._started_at = 0.0
        #: seconds from `start` until this host had applied the pool's head
        self.caught_up_after: float | None = None

    # ------------------------------------------------------------- keys

    def key(self, *parts: str) -> str:
        return self.config.prefix + "/".join(parts)

    @property
    def pool_prefix(self) -> str:
        return self.key("pool", "")

    # ------------------------------------------------------- life cycle

    def start(self, wait: float = 10.0) -> None:
        """Follow the pool and publish this host; wait up to `wait`
        seconds for the first catch-up (the host serves its own copy
        meanwhile, and after, if etcd cannot be reached)."""
        self._load_state()
        self._started_at = time.monotonic()
        self.engine.add_binding_observer(self._bindings_changed)
        for name, target in (("cluster-watch", self._run_watch),
                             ("cluster-lease", self._run_lease)):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        if not self._ready.wait(wait):
            log.warning("not caught up with the cluster's pool after %.0f s (%s); serving "
                        "this host's copy of it", wait, self.error or "no answer yet")

    def stop(self, *, revoke: bool = True) -> None:
        """Stop following.  The lease is revoked so the host shows as gone
        at once; without `revoke` it expires (as when the host dies)."""
        self._stopped.set()
        self._wake.set()
        self._watch_store.cancel_watches()
        self.engine.remove_binding_observer(self._bindings_changed)
        for thread in self._threads:
            thread.join(10)
        if self._lease and revoke:
            try:
                self._store.lease_revoke(self._lease)
            except NwfilterError as exc:
                log.info("cluster lease not revoked (it expires by itself): %s", exc)

    def _state_dir(self) -> SafeDir:
        with SafeDir.open(self.engine.root, what="state root") as root:
            return root.subdir(STATE_DIR)

    def _load_state(self) -> None:
        with self._state_dir() as directory:
            data = directory.read_if_exists(STATE_FILE)
        if data is None:
            return
        try:
            state = json.loads(data)
            applied, cluster_id, prefix = (int(state["applied"]), str(state["cluster_id"]),
                                           str(state["prefix"]))
            mods = {str(k): int(v) for k, v in state.get("mod", {}).items()}
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            log.warning("ignoring %s/%s (%s): the pool is compared in full",
                        STATE_DIR, STATE_FILE, exc)
            return
        if prefix != self.config.prefix:
            return
        with self._cond:
            self.applied, self._cluster_id, self._mod = applied, cluster_id, mods
            self._compare = applied == 0

    def _save_state(self) -> None:
        with self._cond:
            state = {"applied": self.applied, "cluster_id": self._cluster_id,
                     "prefix": self.config.prefix, "mod": dict(sorted(self._mod.items()))}
        try:
            with self._state_dir() as directory:
                directory.write(STATE_FILE, json.dumps(state, indent=1) + "\n")
        except StorageError as exc:
            log.error("cluster state not saved (a restart compares the pool in full): %s", exc)

    # ---------------------------------------------------------- following

    def _set_connected(self, connected: bool, error: str | None = None) -> None:
        if connected != self.connected:
            if connected:
                log.info("etcd reached: following the cluster's pool from revision %d",
                         self.applied)
            else:
                log.warning("etcd cannot be reached: %s; this host keeps its rules and "
                            "serves its copy of the pool", error)
        self.connected, self.error = connected, error

    def _run_watch(self) -> None:
        pause = 0.1
        while not self._stopped.is_set():
            try:
                self._follow()
                pause = 0.1
            except CompactedError as exc:
                log.warning("the pool's history after revision %d is compacted (%s): "
                            "comparing the whole pool", self.applied, exc)
                self._compare = True
            except UnavailableError as exc:
                if self._stopped.is_set():
                    break  # the watch was cancelled by `stop`
                self._set_connected(False, exc.message)
                self._stopped.wait(pause)
                pause = min(pause * 2, 1.0)
            except Exception as exc:
                log.exception("cluster watcher failed; starting it again")
                self._set_connected(False, f"internal error: {exc}")
                self._stopped.wait(1.0)

    def _follow(self) -> None:
        _, head = self._watch_store.get(self.key("head"))
        target = head.mod_revision if head is not None else 0
        if not self._compare and (self._watch_store.cluster_id != self._cluster_id
                                  or target < self.applied):
            log.warning("etcd is not the cluster this host followed: comparing the pool")
            self._compare = True
        if self._compare:
            self._full_compare()
        self._set_connected(True)
        if self.applied >= target:
            self._caught_up_now()
        for batch in self._watch_store.watch(self.pool_prefix, self.applied + 1,
                                             self._stopped):
            if batch.events and not self._stopped.is_set():
                self._apply_batch(batch)
            if self.applied >= target:
                self._caught_up_now()

    def _caught_up_now(self) -> None:
        if not self._ready.is_set():
            self.caught_up_after = time.monotonic() - self._started_at
            self._ready.set()

    def _keep_if_used(self, view: PoolView, name: str, revision: int, key: str) -> bool:
        """True (and the revision reported) when a binding here still uses
        a filter the cluster removed: the host keeps it."""
        users = self.engine.bindings.using(self.engine.pool.reached_by(name))
        if not users:
            return False
        self._refuse(revision, key, f"filter '{name}' is still used here by port "
                     + ", ".join(b.portdev for b in users) + "; kept")
        return True

    def _refuse(self, revision: int, key: str, reason: str) -> None:
        log.error("refused revision %d of '%s': %s; keeping the last good definition",
                  revision, key, reason)
        with self._cond:
            self.bad = [*self.bad, BadRevision(revision, key, reason)][-MAX_BAD:]
        self._publish_live = True
        self._wake.set()

    def _name_of(self, key: str) -> str:
        return key[len(self.pool_prefix):]

    def _apply_batch(self, batch: WatchBatch) -> None:
        view = PoolView(self.engine.pool.snapshot())
        last = self.applied
        mods: dict[str, int | None] = {}
        for event in batch.events:
            kv = event.kv
            name = self._name_of(kv.key)
            last = max(last, kv.mod_revision)
            if event.deleted:
                if view.get(name) is not None and not self._keep_if_used(
                        view, name, kv.mod_revision, kv.key):
                    view.delete(name)
                mods[name] = None
                continue
            try:
                view.apply_put(name, kv.value,
                               f"revision {kv.mod_revision} of key '{kv.key}'")
            except NwfilterError as exc:
                self._refuse(kv.mod_revision, kv.key, exc.message)
            mods[name] = kv.mod_revision
        self._replace(view, f"revision {last}")
        with self._cond:
            for name, mod in mods.items():
                if mod is None:
                    self._mod.pop(name, None)
                else:
                    self._mod[name] = mod
            self.applied = last
            self._cond.notify_all()
        self._save_state()
        self._publish_live = True
        self._wake.set()

    def _replace(self, view: PoolView, what: str) -> None:
        try:
            outcome = self.engine.replace_filters(view.changes)
        except NwfilterError as exc:
            # Committed in etcd, refused here (the kernel, the files): the
            # host keeps its rules; a restart compares the pool again.
            for name in sorted(view.changes):
                self._refuse(0, self.key("pool", name), f"{what} not applied: {exc.message}")
            return
        if outcome.defined or outcome.undefined:
            log.info("applied %s: defined %s, undefined %s, rebuilt %d port(s)", what,
                     ", ".join(outcome.defined) or "-", ", ".join(outcome.undefined) or "-",
                     len(outcome.rebuilt))

    def _full_compare(self) -> None:
        revision, kvs = self._watch_store.range(self.pool_prefix, prefix=True)
        _, head = self._watch_store.get(self.key("head"))
        if head is None and not kvs:
            if self._seed():
                return
            revision, kvs = self._watch_store.range(self.pool_prefix, prefix=True)
        local = self.engine.pool.snapshot()
        view = PoolView({})
        seen: set[str] = set()
        for kv in sorted(kvs, key=lambda kv: kv.key):
            name = self._name_of(kv.key)
            seen.add(name)
            try:
                view.apply_put(name, kv.value, f"revision {kv.mod_revision} of key '{kv.key}'")
            except NwfilterError as exc:
                self._refuse(kv.mod_revision, kv.key, exc.message)
                if name in local:
                    view.put(*FilterPool.canonical(local[name]))
        changes = {n: c for n, c in view.changes.items() if local.get(n) != (c and c[0])}
        for name in sorted(set(local) - seen):
            if not self._keep_if_used(view, name, revision, self.key("pool", name)):
                changes[name] = None
        view.changes = changes
        self._replace(view, f"the full compare at revision {revision}")
        with self._cond:
            self._mod = {self._name_of(kv.key): kv.mod_revision for kv in kvs}
            self.applied = revision
            self._cluster_id = self._watch_store.cluster_id
            self._compare = False
            self.full_compares += 1
            self._cond.notify_all()
        log.info("compared the whole pool at revision %d: %d change(s)", revision, len(changes))
        self._save_state()
        self._publish_live = True
        self._wake.set()

    def _seed(self) -> bool:
        """Put this host's pool into an empty cluster; False if another came first."""
        local = self.engine.pool.snapshot()
        names = sorted(local)[:MAX_SEED]
        if len(local) > MAX_SEED:
            log.warning("seeding the cluster with %d of %d filters (one transaction)",
                        MAX_SEED, len(local))
        ops: list[Put | Delete] = [
            Put(self.key("pool", n), FilterPool.canonical(local[n])[1].encode()) for n in names
        ]
        ops.append(Put(self.key("head"), self.host.encode()))
        ok, revision = self._watch_store.txn([Compare(self.key("head"), 0)], ops)
        if not ok:
            return False
        with self._cond:
            self._mod = dict.fromkeys(names, revision)
            self.applied = revision
            self._cluster_id = self._watch_store.cluster_id
            self._compare = False
            self._cond.notify_all()
        log.info("seeded the cluster's empty pool with this host's %d filters at revision %d",
                 len(names), revision)
        self._save_state()
        return True

    # ------------------------------------------------------------ changing

    def _unavailable(self, exc: UnavailableError, what: str) -> UnavailableError:
        return UnavailableError(
            f"cannot {what}: {exc.message}; this host keeps its rules and serves its copy "
            f"of the pool (revision {self.applied}) until etcd answers again"
        )

    def _caught_up(self, what: str) -> int:
        """The pool's head revision, once this host has applied it."""
        try:
            _, head = self._store.get(self.key("head"))
        except UnavailableError as exc:
            raise self._unavailable(exc, what) from exc
        target = head.mod_revision if head is not None else 0
        with self._cond:
            if not self._cond.wait_for(lambda: self.applied >= target and not self._compare,
                                       CATCH_UP_WAIT):
                raise UnavailableError(
                    f"cannot {what}: this host has applied the cluster's pool up to "
                    f"revision {self.applied}, not yet {target} ({self.error or 'catching up'})"
                )
        return target

    def _wait_applied(self, revision: int) -> bool:
        with self._cond:
            return self._cond.wait_for(lambda: self.applied >= revision, CATCH_UP_WAIT)

    def _commit(self, what: str, compares: Sequence[Compare],
                ops: Sequence[Put | Delete]) -> tuple[bool, int]:
        try:
            return self._store.txn(compares, [*ops, Put(self.key("head"), self.host.encode())])
        except UnavailableError as exc:
            raise self._unavailable(exc, what) from exc

    def define(self, xml: str, *, source: str = "<request>") -> DefineOutcome:
        """Define a filter in the cluster's pool; in force here when it returns."""
        fdef, text = FilterPool.canonical(parse_filter(xml, source=source))
        what = f"define filter '{fdef.name}'"
        key = self.key("pool", fdef.name)
        for _ in range(MAX_TRIES):
            head = self._caught_up(what)
            outcome = self.engine.define_filter(xml, source=source, dry_run=True)
            if not outcome.changed:
                return dataclasses.replace(outcome, dry_run=False, diffs=())
            with self._cond:
                mod = self._mod.get(fdef.name, 0)
            ok, revision = self._commit(what, [Compare(key, mod), Compare(self.key("head"), head)],
                                        [Put(key, text.encode())])
            if not ok:
                continue  # another change came first: check again on the newer pool
            warnings = outcome.warnings
            if not self._wait_applied(revision):
                warnings += (f"defined in the cluster at revision {revision}, not yet in "
                             "force on this host",)
            return dataclasses.replace(outcome, dry_run=False, diffs=(), warnings=warnings)
        raise ConflictError(f"cannot {what}: other hosts changed the pool {MAX_TRIES} times "
                            "while it was checked; try again")

    def undefine(self, name_or_uuid: str) -> UndefineResult:
        """Undefine a filter no filter, no port here and no other host uses."""
        what = f"undefine filter '{name_or_uuid}'"
        for _ in range(MAX_TRIES):
            head = self._caught_up(what)
            pool = self.engine.pool
            fdef = pool.lookup(name_or_uuid)
            users = pool.users(fdef.name)
            try:
                _, uses = self._store.range(self.key("uses", ""), prefix=True)
            except UnavailableError as exc:
                raise self._unavailable(exc, what) from exc
            reach = pool.reached_by(fdef.name)
            others = [kv for kv in uses if kv.key != self.key("uses", self.host)]
            for kv in others:
                needed = sorted(set(_json_list(kv.value, "uses")) & reach)
                if needed:
                    users.append(f"host '{kv.key.rsplit('/', 1)[-1]}' (ports bound to "
                                 + ", ".join(f"'{n}'" for n in needed) + ")")
            if users:
                raise InUseError(f"filter '{fdef.name}' is in use by " + ", ".join(users))
            key = self.key("pool", fdef.name)
            with self._cond:
                mod = self._mod.get(fdef.name, 0)
            compares = [Compare(key, mod), Compare(self.key("head"), head),
                        *(Compare(kv.key, kv.mod_revision) for kv in others)]
            ok, revision = self._commit(what, compares, [Delete(key)])
            if not ok:
                continue
            self._wait_applied(revision)
            return UndefineResult(fdef.name, fdef.uuid, frozenset({fdef.name}))
        raise ConflictError(f"cannot {what}: other hosts changed the pool {MAX_TRIES} times "
                            "while it was checked; try again")

    # ---------------------------------------------------------- publishing

    def _bindings_changed(self) -> None:
        self._publish_uses = True
        self._wake.set()

    def _live(self) -> bytes:
        with self._cond:
            data = {"applied": self.applied, "time": time.time(),
                    "bad": [b.to_json() for b in self.bad]}
        return json.dumps(data, sort_keys=True).encode()

    def _uses(self) -> bytes:
        roots = sorted({b.filterref.filter for b in self.engine.bindings.all()})
        return json.dumps({"uses": roots}).encode()

    def _run_lease(self) -> None:
        interval = self.config.ttl / 3
        next_keepalive = 0.0
        while not self._stopped.is_set():
            try:
                if not self._lease:
                    self._lease = self._store.lease_grant(self.config.ttl)
                    self._store.put(self.key("hosts", self.host),
                                    json.dumps({"joined": time.time()}).encode())
                    self._publish_live = self._publish_uses = True
                    next_keepalive = time.monotonic() + interval
                if self._publish_uses:
                    self._publish_uses = False
                    self._store.put(self.key("uses", self.host), self._uses(), self._lease)
                if self._publish_live:
                    self._publish_live = False
                    self._store.put(self.key("live", self.host), self._live(), self._lease)
                if time.monotonic() >= next_keepalive:
                    if self._store.lease_keepalive(self._lease) <= 0:
                        log.warning("this host's cluster lease expired; taking a new one")
                        self._lease = 0
                        continue
                    next_keepalive = time.monotonic() + interval
            except NwfilterError as exc:
                self._publish_live = self._publish_uses = True
                log.debug("cluster lease: %s", exc)
                self._stopped.wait(min(interval, 1.0))
                continue
            self._wake.wait(max(0.0, next_keepalive - time.monotonic()))
            self._wake.clear()

    # -------------------------------------------------------------- status

    def status(self) -> dict[str, Any]:
        """Every host the cluster has seen: alive, applied revision, lag."""
        with self._cond:
            out: dict[str, Any] = {
                "host": self.host, "endpoints": self.config.urls(), "prefix": self.config.prefix,
                "connected": self.connected, "error": self.error, "applied": self.applied,
                "full_compares": self.full_compares, "head": None, "hosts": [],
            }
        try:
            _, head = self._store.get(self.key("head"))
            _, hosts = self._store.range(self.key("hosts", ""), prefix=True)
            _, lives = self._store.range(self.key("live", ""), prefix=True)
        except UnavailableError as exc:
            out["error"] = exc.message
            out["hosts"] = [{"host": self.host, "alive": None, "applied": self.applied,
                             "lag": None, "updated": None,
                             "bad": [b.to_json() for b in self.bad]}]
            return out
        head_rev = head.mod_revision if head is not None else 0
        out["head"] = head_rev
        live = {kv.key.rsplit("/", 1)[-1]: _json_object(kv.value) for kv in lives}
        names = sorted({kv.key.rsplit("/", 1)[-1] for kv in hosts} | set(live))
        for name in names:
            data = live.get(name)
            applied = data.get("applied") if data is not None else None
            applied = applied if isinstance(applied, int) else None
            out["hosts"].append({
                "host": name, "alive": data is not None, "applied": applied,
                "lag": max(0, head_rev - applied) if applied is not None else None,
                "updated": data.get("time") if data is not None else None,
                "bad": data.get("bad", []) if data is not None else [],
            })
        return out


def _json_object(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data)
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _json_list(data: bytes, key: str) -> list[str]:
    value = _json_object(data).get(key, [])
    return [v for v in value if isinstance(v, str)] if isinstance(value, list) else []
