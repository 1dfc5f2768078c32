"""Self-healing for the nft backend: notice foreign edits of our tables and undo them.

`NftMonitor` listens on an nfnetlink socket opened in the backend's
namespace and subscribed to the nf_tables multicast group (what `nft
monitor` uses; libnftables offers it only in the CLI).  The kernel reports
every committed transaction as a series of object messages (each carries
its table name in attribute 1) closed by a NEWGEN message that names the
committing task.  A transaction that touched a `nwfilter` table and was
committed by a task outside this process is foreign: the monitor then asks
the backend to repair (`NftBackend.repair`: reconcile with its recorded
state, in one transaction), rewriting every chain the foreign transactions
touched whatever their rule comments say, and logs what it repaired.
Elements added to or deleted from the sets standing for libvirt ipsets are
not foreign edits: the operator fills those sets (docs/backends.md).  Our own transactions are
recognised by the committing thread id (a thread of this process), so they
never trigger a repair.

The monitor also keeps watch over what our layer-3 rules depend on
(`NftBackend.preconditions`): every `watch_interval` (0.5 s) it checks the
bridge-nf sysctls, which no netlink event reports, and restores them; after
every foreign transaction on *other* tables it looks for rules that rewrite
the packet mark our dispatch uses.  Each change in what is broken is logged
as a warning.  A repair never replaces another root's tables: the backend
checks the owner first.

Each repair is published on the event bus as `drift-repaired` (naming the
commands whose transactions it undid), each change in what is broken as
`precondition` (`nwfilter.events`).

Cost when nothing happens: one thread waking every 0.2 s, two sysctl reads
every 0.5 s.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from nwfilter.backends.nft.generation import messages as netlink_messages
from nwfilter.backends.nft.render import IPSET_PREFIX, LEARN_PREFIX
from nwfilter.events import EventBus, EventKind
from nwfilter.netns import in_netns

if TYPE_CHECKING:
    from nwfilter.backends.nft.backend import NftBackend

log = logging.getLogger(__name__)

NETLINK_NETFILTER = 12
NFNLGRP_NFTABLES = 7
SOL_NETLINK = 270
NETLINK_ADD_MEMBERSHIP = 1
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWSETELEM = 12
NFT_MSG_DELSETELEM = 14
NFT_MSG_NEWGEN = 15
NFTA_TABLE_NAME = 1  # the table name's attribute in every object message
NFTA_CHAIN_NAME = 3  # in chain messages
NFTA_RULE_CHAIN = 2  # in rule messages
NFT_MSG_NEWCHAIN, NFT_MSG_DELCHAIN = 3, 5
NFT_MSG_NEWRULE, NFT_MSG_DELRULE = 6, 8
NFTA_SET_ELEM_LIST_SET = 2
NFTA_GEN_PROC_PID = 2
NFTA_GEN_PROC_NAME = 3
NFPROTO_INET = 1
NFPROTO_BRIDGE = 7
MSG_NAMES = {
    0: "new table", 2: "delete table", 3: "new chain", 5: "delete chain",
    6: "new rule", 8: "delete rule", 9: "new set", 11: "delete set",
    12: "new element", 14: "delete element",
}
_NLA = struct.Struct("=HH")


def _attrs(data: bytes) -> dict[int, bytes]:
    out: dict[int, bytes] = {}
    pos = 0
    while pos + 4 <= len(data):
        length, kind = _NLA.unpack_from(data, pos)
        if length < 4:
            break
        out[kind & 0x3FFF] = data[pos + 4: pos + length]
        pos += (length + 3) & ~3
    return out


@dataclass
class Transaction:
    """What one committed transaction did to our tables (and which others it touched)."""

    touched: list[str] = field(default_factory=list)
    others: set[str] = field(default_factory=set)  # "family table" of other tables
    chains: set[tuple[str, str]] = field(default_factory=set)  # (family, chain) of ours


FAMILY_NAMES = {1: "inet", 2: "ip", 3: "arp", 5: "netdev", 7: "bridge", 10: "ip6"}


def parse_events(
    buf: bytes, table: str, pending: Transaction, is_own: Callable[[int], bool],
    *, report_others: bool = False,
) -> list[tuple[Transaction, int, str]]:
    """Feed one datagram; return foreign transactions that touched `table`
    as (transaction, committing tid, committing command name); with
    `report_others` also those that touched other tables only."""
    done: list[tuple[Transaction, int, str]] = []
    for mtype, _seq, body in netlink_messages(buf):
        if mtype >> 8 != NFNL_SUBSYS_NFTABLES or len(body) < 4:
            continue
        kind = mtype & 0xFF
        family = body[0]
        attrs = _attrs(body[4:])
        if kind == NFT_MSG_NEWGEN:
            tid = struct.unpack(">I", attrs.get(NFTA_GEN_PROC_PID, b"\0\0\0\0"))[0]
            comm = _text(attrs.get(NFTA_GEN_PROC_NAME, b""))
            others = pending.others if report_others else set()
            if (pending.touched or others) and not is_own(tid):
                done.append((Transaction(list(pending.touched), set(others),
                                         set(pending.chains)), tid, comm))
            pending.touched.clear()
            pending.others.clear()
            pending.chains.clear()
            continue
        name = _text(attrs.get(NFTA_TABLE_NAME, b""))
        if name != table or family not in (NFPROTO_INET, NFPROTO_BRIDGE):
            if name:
                pending.others.add(f"{FAMILY_NAMES.get(family, family)} {name}")
            continue
        set_name = _text(attrs.get(NFTA_SET_ELEM_LIST_SET, b""))
        if (
            kind in (NFT_MSG_NEWSETELEM, NFT_MSG_DELSETELEM)
            and family == NFPROTO_INET
            and set_name.startswith(IPSET_PREFIX)
        ):
            continue  # the operator filling an ipset set
        if kind == NFT_MSG_DELSETELEM and set_name.startswith(LEARN_PREFIX):
            # A learnt address whose lease ended (the kernel's own expiry);
            # a deletion only narrows what the port may send.
            continue
        pending.touched.append(MSG_NAMES.get(kind, f"message {kind}"))
        chain_attr = {NFT_MSG_NEWCHAIN: NFTA_CHAIN_NAME, NFT_MSG_DELCHAIN: NFTA_CHAIN_NAME,
                      NFT_MSG_NEWRULE: NFTA_RULE_CHAIN, NFT_MSG_DELRULE: NFTA_RULE_CHAIN}.get(kind)
        if chain_attr is not None and chain_attr in attrs:
            pending.chains.add((FAMILY_NAMES[family], _text(attrs[chain_attr])))
    return done


def _text(raw: bytes) -> str:
    return raw.rstrip(b"\0").decode(errors="replace")


def _thread_of_this_process(tid: int) -> bool:
    return os.path.exists(f"/proc/self/task/{tid}")


#: What `repair` is given: the (family, chain) pairs foreign transactions
#: touched, or None when events were lost and every chain is suspect.
Distrust = frozenset[tuple[str, str]] | None


class NftMonitor:
    """Watches the backend's namespace and repairs its state after foreign edits.

    `repair` is called (from the monitor thread) to restore the recorded
    state, with the chains to rewrite (`Distrust`); for a backend, its
    `repair`.
    """

    def __init__(
        self,
        netns: str | None,
        repair: Callable[[Distrust], object],
        *,
        table: str = "nwfilter",
        settle: float = 0.05,
        clock: Callable[[], float] = time.monotonic,
        is_own: Callable[[int], bool] = _thread_of_this_process,
        watch: Callable[[bool], tuple[str, ...]] | None = None,
        watch_interval: float = 0.5,
        events: EventBus | None = None,
    ) -> None:
        self.netns = netns
        self.events = events if events is not None else EventBus()
        self._repair = repair
        self._table = table
        self._settle = settle
        self._clock = clock
        self._is_own = is_own
        self._watch = watch
        self._watch_interval = watch_interval
        self.broken: tuple[str, ...] = ()  # what the last watch found broken
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._sock: socket.socket | None = None
        self.repairs = 0
        self.last_error: Exception | None = None

    @classmethod
    def for_backend(
        cls, backend: NftBackend, *, settle: float = 0.05, events: EventBus | None = None
    ) -> NftMonitor:
        """A monitor repairing `backend` in its namespace and watching its
        layer-3 preconditions."""

        def watch(scan: bool) -> tuple[str, ...]:
            return backend.preconditions(repair=True, scan=scan)

        return cls(backend.netns, backend.repair, settle=settle, watch=watch, events=events)

    def start(self) -> None:
        if self._thread is not None:
            return
        with in_netns(self.netns):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock.bind((0, 0))
        sock.setsockopt(SOL_NETLINK, NETLINK_ADD_MEMBERSHIP, NFNLGRP_NFTABLES)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 * 1024 * 1024)
        sock.settimeout(0.2)
        self._sock = sock
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name=f"nft-monitor {self.netns}",
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> NftMonitor:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        assert self._sock is not None
        sock = self._sock
        pending = Transaction()
        due: float | None = None
        reasons: list[str] = []
        culprits: list[dict[str, object]] = []  # the same, for the event
        suspect: set[tuple[str, str]] | None = set()
        scan_due: float | None = self._clock()  # scan once at start
        next_watch = self._clock()
        while not self._stop.is_set():
            try:
                buf = sock.recv(1 << 20)
                for txn, tid, comm in parse_events(buf, self._table, pending, self._is_own,
                                                   report_others=self._watch is not None):
                    if txn.others:
                        scan_due = scan_due or self._clock() + self._settle
                    if not txn.touched:
                        continue
                    what = ", ".join(sorted(set(txn.touched)))
                    reasons.append(f"{comm or '?'} (tid {tid}): {what}")
                    culprits.append({"command": comm, "tid": tid,
                                     "changes": sorted(set(txn.touched))})
                    if suspect is not None:
                        suspect |= txn.chains
                    due = due or self._clock() + self._settle
            except TimeoutError:
                pass
            except OSError as exc:
                if exc.errno != errno.ENOBUFS:
                    self.last_error = exc
                    log.error("nft monitor in %s stopped: %s", self.netns or "host", exc)
                    return
                # Events were lost; we cannot tell whose they were, so repair.
                reasons.append("event overflow")
                suspect = None
                pending = Transaction()
                due = due or self._clock() + self._settle
            if due is not None and self._clock() >= due:
                # A short settle time folds a burst of foreign edits into one repair.
                try:
                    self._repair(None if suspect is None else frozenset(suspect))
                    self.repairs += 1
                    log.warning("nft state in %s repaired after foreign change: %s",
                                self.netns or "host", "; ".join(reasons))
                    self.events.publish(
                        EventKind.DRIFT_REPAIRED, "namespace", self.netns or "host",
                        {"by": culprits, "lost_events": "event overflow" in reasons},
                    )
                except Exception as exc:  # keep watching; the next edit retries
                    self.last_error = exc
                    log.error("nft repair in %s failed: %s", self.netns or "host", exc)
                due = None
                reasons = []
                culprits = []
                suspect = set()
            now = self._clock()
            if scan_due is not None and now >= scan_due:
                self._check(scan=True)
                scan_due = None
                next_watch = now + self._watch_interval
            elif now >= next_watch:
                self._check(scan=False)
                next_watch = now + self._watch_interval

    def _check(self, *, scan: bool) -> None:
        """Check (and restore what can be restored of) the preconditions;
        warn when what is broken changes.  A sysctl-only check keeps the
        mark findings of the last scan."""
        if self._watch is None:
            return
        try:
            found = self._watch(scan)
        except Exception as exc:  # keep watching
            self.last_error = exc
            log.error("nft precondition check in %s failed: %s", self.netns or "host", exc)
            return
        if not scan:
            found = found + tuple(p for p in self.broken if not p.startswith("net.bridge."))
        if found != self.broken:
            if found:
                log.warning("layer-3 rules in %s are not enforced: %s",
                            self.netns or "host", "; ".join(found))
            else:
                log.warning("layer-3 preconditions in %s hold again", self.netns or "host")
            self.broken = found
            self.events.publish(EventKind.PRECONDITION, "namespace", self.netns or "host", {
                "state": "broken" if found else "restored", "problems": list(found),
            })
