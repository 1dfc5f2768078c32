"""The nft backend's applier: the only code that sends nftables commands.

`NftBackend` renders with `nwfilter.backends.nft.render`, sends each
`apply()` as one libnftables JSON batch (one kernel transaction), and keeps
an in-memory record of what it owns per port, updated only after the kernel
accepted the batch; so the cost of a change grows with what changed and the
tables are never listed on the apply path.

All kernel access happens with the calling thread inside the backend's
network namespace (`nwfilter.netlab.in_netns`) and under the backend
transaction lock (`Level.BACKEND`).  The libnftables context is created
inside the namespace on first use by an injected factory.
"""

from __future__ import annotations

import ctypes
import logging
import re
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol

from nwfilter.errors import BackendError, UnavailableError
from nwfilter.gcpause import gc_paused
from nwfilter.ir import Changes, Ruleset
from nwfilter.locks import Level, LevelledLock
from nwfilter.netlab import in_netns

from . import render
from .render import BRIDGE, INET, TABLE, Batch, Capabilities, PortRecord

log = logging.getLogger(__name__)

# br_netfilter hands bridged IPv4/IPv6 frames to the inet hooks only when
# these are 1; they are per network namespace on Linux >= 5.3.
BR_NF_SYSCTLS = ("bridge-nf-call-iptables", "bridge-nf-call-ip6tables")


class NftContext(Protocol):
    """The part of libnftables' Python binding we use."""

    def json_cmd(self, json_root: dict[str, Any]) -> tuple[int, Any, str]: ...

    def cmd(self, cmdline: str) -> tuple[int, str, str]: ...

    def set_json_output(self, value: bool) -> bool: ...


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
    return ctx  # type: ignore[no-any-return]


def _set_dry_run(ctx: NftContext, on: bool) -> bool:
    """Switch libnftables' check mode (kernel validates, then aborts)."""
    raw = getattr(ctx, "_Nftables__ctx", None)
    if raw is None:
        return False
    lib = ctypes.CDLL("libnftables.so.1")
    lib.nft_ctx_set_dry_run.argtypes = [ctypes.c_void_p, ctypes.c_bool]
    lib.nft_ctx_set_dry_run(raw, on)
    return True


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
        self._rulesets: dict[str, Ruleset] = {}
        self._base_ready = False
        self._caps: Capabilities | None = None
        self._state_lock = threading.Lock()  # guards the records for readers

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
        if not _set_dry_run(ctx, True):
            return ""
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
            _set_dry_run(ctx, False)

    def _ensure_sysctls(self) -> None:
        if not self._manage_sysctls:
            return
        for key in BR_NF_SYSCTLS:
            path = Path("/proc/sys/net/bridge") / key
            try:
                if path.read_text().strip() != "1":
                    path.write_text("1\n")
                    log.info("set net.bridge.%s=1 in namespace %s", key, self.netns or "host")
            except OSError as exc:
                raise UnavailableError(
                    f"net.bridge.{key} cannot be set (is br_netfilter loaded?): {exc}"
                ) from exc

    # -- Backend protocol ----------------------------------------------------
    def probe(self) -> None:
        with self._kernel() as ctx:
            self._caps = self._probe(ctx)
            if not Path("/proc/sys/net/bridge/bridge-nf-call-iptables").exists():
                raise UnavailableError(
                    "br_netfilter is not loaded (modprobe br_netfilter): layer-3 rules "
                    "need it to see bridged traffic"
                )

    def _probe(self, ctx: NftContext) -> Capabilities:
        if not _set_dry_run(ctx, True):
            raise UnavailableError("libnftables binding without a usable context")
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
            _set_dry_run(ctx, False)

    def capabilities(self) -> Capabilities:
        if self._caps is None:
            self.probe()
        assert self._caps is not None
        return self._caps

    def check(self, ruleset: Ruleset) -> None:
        with self._state_lock:
            previous = self._rulesets.get(ruleset.port.portdev)
        render.check_ruleset(ruleset, self.capabilities(), previous=previous)

    def apply(self, changes: Changes) -> None:
        if changes.is_empty():
            return
        caps = self.capabilities()
        # The lock covers render, send and bookkeeping: two applies never
        # render against the same stale record.
        with self._kernel() as ctx, gc_paused():
            records = {} if changes.replace_all else self._records
            batch = Batch()
            if changes.replace_all:
                # An earlier process may have left tables we have no record
                # of: replace them wholesale, atomically, in this transaction.
                self._ensure_sysctls()
                batch.extend(_drop_tables())
                batch.extend(render.render_base())
            elif not self._base_ready:
                self._ensure_sysctls()
                batch.extend(render.render_base())
            new_records = dict(records)
            previous_rulesets = {} if changes.replace_all else self._rulesets
            ids_in_use = {r.port_id for r in records.values()}
            for name in sorted(set(changes.remove)):
                old = new_records.pop(name, None)
                if old is not None:
                    batch.extend(render.render_remove(old))
            for ruleset in sorted(changes.set, key=lambda r: r.port.portdev):
                portdev = ruleset.port.portdev
                previous = new_records.get(portdev)
                port_id = previous.port_id if previous else self._free_id(ids_in_use)
                ids_in_use.add(port_id)
                port_batch, record = render.render_port(
                    ruleset, port_id, previous, caps, previous_rulesets.get(portdev)
                )
                batch.extend(port_batch)
                new_records[portdev] = record
            if not new_records:
                # The last port is gone: nothing of ours stays in the namespace.
                batch = _drop_tables()
            rc, err = self._send(ctx, batch)
            if rc != 0:
                where = self._locate_failure(ctx, batch, err)
                ports = ", ".join(sorted({r.port.portdev for r in changes.set} |
                                         set(changes.remove)))
                raise BackendError(
                    f"nft refused the transaction for {where or 'port(s) ' + ports}: "
                    f"{err.strip() or 'rc ' + str(rc)}; nothing was changed"
                )
            self._base_ready = bool(new_records)
            rulesets = {} if changes.replace_all else dict(self._rulesets)
            for name in changes.remove:
                rulesets.pop(name, None)
            for ruleset in changes.set:
                rulesets[ruleset.port.portdev] = ruleset
            with self._state_lock:
                self._records = new_records
                self._rulesets = rulesets
        log.debug("nft: applied %d set, %d remove in %d commands", len(changes.set),
                  len(changes.remove), len(batch.commands))

    @staticmethod
    def _free_id(in_use: set[int]) -> int:
        for candidate in range(1, render.MAX_PORT_ID + 1):
            if candidate not in in_use:
                return candidate
        raise BackendError(f"more than {render.MAX_PORT_ID} ports in one namespace")

    def clear(self, portdev: str) -> None:
        if portdev in self._records:
            self.apply(Changes(remove=(portdev,)))

    def clear_all(self) -> None:
        with self._kernel() as ctx:
            batch = Batch()
            batch.extend(_drop_tables())
            rc, err = self._send(ctx, batch)
            if rc != 0:
                raise BackendError(f"nft refused to delete the nwfilter tables: {err.strip()}")
            self._base_ready = False
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
    def recorded(self) -> dict[str, Ruleset]:
        """The rulesets the kernel should hold, as last accepted."""
        with self._state_lock:
            return dict(self._rulesets)

    def reinstall(self) -> None:
        """Rebuild both tables from the recorded state in one transaction."""
        caps = self.capabilities()
        with self._kernel() as ctx:
            if not self._rulesets:
                return  # nothing of ours should be there
            batch = Batch()
            batch.extend(_drop_tables())
            batch.extend(render.render_base())
            records: dict[str, PortRecord] = {}
            for portdev, ruleset in sorted(self._rulesets.items()):
                port_id = self._records[portdev].port_id
                port_batch, record = render.render_port(ruleset, port_id, None, caps)
                batch.extend(port_batch)
                records[portdev] = record
            rc, err = self._send(ctx, batch)
            if rc != 0:
                raise BackendError(f"nft refused the repair transaction: {err.strip()}")
            self._base_ready = True
            with self._state_lock:
                self._records = records

    def with_ctx(self, fn: Callable[[NftContext], Any]) -> Any:
        """Run `fn` with the libnftables context inside the namespace, locked."""
        with self._kernel() as ctx:
            return fn(ctx)
