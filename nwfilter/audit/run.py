"""An audit of one state root: every check over the bound ports and the
running domains' interfaces (or the ports asked for), as `audit.run`
serves it.

What it reads: the rulesets the bindings compile to now
(`Engine.compile_bindings`, which hands back the engine's own compiled
rulesets for ports whose sources did not change), the backend's records of
what it rendered for them, and at most one listing of both tables (the
only kernel dump of the audit, whatever the number of ports; nothing is
read per port).  No engine lock is held across that kernel read: the
compile holds the pool and binding locks in memory only, the listing only
the backend's own lock.

An `Auditor` keeps, per port, the exposure and hygiene findings of the
ruleset object it last audited, so an audit of ports whose rules did not
change (the daemon's periodic audit, `nwfilter.audit.periodic`) walks no
probe again; and the last listing of the nft tables with the ruleset
generation it was read at, so while no transaction was committed in the
namespace since (the kernel's generation id did not move) the audit reads
no table at all.  The whole audit runs with the cyclic garbage collector
paused (`nwfilter.gcpause`): it allocates many small objects that all stay
alive until it ends."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from nwfilter.audit import drift, exposure, hygiene
from nwfilter.audit.findings import SEVERITIES, Finding, sort_findings
from nwfilter.compile import port_of
from nwfilter.conf.model import FilterRef
from nwfilter.errors import NwfilterError, UndefinedVariableError, UnresolvedError
from nwfilter.gcpause import gc_paused
from nwfilter.ir import Ruleset, drop_all

if TYPE_CHECKING:
    from nwfilter.domain.manager import DomainManager
    from nwfilter.engine import Engine

log = logging.getLogger(__name__)


def _cause(exc: NwfilterError) -> BaseException:
    return exc.__cause__ if exc.__cause__ is not None else exc


class Auditor:
    """Audits of one engine; keeps what the per-port checks found for the
    ruleset objects it audited last (see the module's docstring)."""

    def __init__(self) -> None:
        # A plain leaf lock: held for dict operations only.
        self._lock = threading.Lock()
        # port -> (ruleset, ip, vm, exposure and shadowed findings)
        self._ports: dict[str, tuple[Ruleset, str | None, str, list[Finding]]] = {}
        # (nf_tables generation id, the listing of our tables at it)
        self._kept_listing: tuple[int, Any] | None = None

    def run(self, engine: Engine, domains: DomainManager | None,
            ports: Sequence[str] | None = None) -> dict[str, Any]:
        """The audit as `audit.run` answers it."""
        count, findings = self.findings(engine, domains, ports)
        ordered = sort_findings(findings)
        counts = {s: sum(1 for f in ordered if f.severity == s) for s in SEVERITIES}
        return {"ports": count, "findings": [f.as_json() for f in ordered], "summary": counts}

    def findings(self, engine: Engine, domains: DomainManager | None,
                 ports: Sequence[str] | None = None) -> tuple[int, list[Finding]]:
        """(ports audited, findings) of the bound ports (all, or `ports`)."""
        with gc_paused():
            return self._findings(engine, domains, ports)

    def _port_checks(self, port: str, rs: Ruleset, ip: str | None, vm: str,
                     backend: str) -> list[Finding]:
        with self._lock:
            known = self._ports.get(port)
        if known is not None and known[0] is rs and known[1] == ip and known[2] == vm:
            return known[3]
        found = exposure.port_exposure(rs, ip, vm, backend) + hygiene.shadowed(rs, vm)
        with self._lock:
            self._ports[port] = (rs, ip, vm, found)
        return found

    def _listing(self, backend: Any) -> Any:
        """Both nft tables as the kernel holds them: the listing read by the
        last audit while the ruleset's generation has not moved since
        (`nwfilter.backends.nft.generation`), else read now (and kept when
        no commit came while it was read).  Nobody changes a listing."""
        from nwfilter.backends.nft import generation

        try:
            before = generation.current(backend.netns)
        except NwfilterError as exc:
            log.warning("%s: the tables are read again", exc.message)
            return backend.listing()
        with self._lock:
            kept = self._kept_listing
        if kept is not None and kept[0] == before:
            return kept[1]
        listing = backend.listing()
        with contextlib.suppress(NwfilterError):
            if generation.current(backend.netns) == before:
                with self._lock:
                    self._kept_listing = (before, listing)
        return listing

    def _forget_except(self, ports: set[str]) -> None:
        with self._lock:
            for gone in set(self._ports) - ports:
                del self._ports[gone]

    def _findings(self, engine: Engine, domains: DomainManager | None,
                  ports: Sequence[str] | None) -> tuple[int, list[Finding]]:
        wanted_ports = None if not ports else set(ports)
        bindings = {b.portdev: b for b in engine.list_bindings()}
        # A binding created or deleted meanwhile is left to the next audit.
        compiled = {p: r for p, r in engine.compile_bindings(None).items() if p in bindings}
        bindings = {p: bindings[p] for p in compiled}
        vms = {p: b.owner_name for p, b in bindings.items()}
        findings: list[Finding] = []
        expected: dict[str, Ruleset] = {}
        good: dict[str, Ruleset] = {}
        for port, result in sorted(compiled.items()):
            binding = bindings[port]
            if isinstance(result, Ruleset):
                expected[port] = good[port] = result
                continue
            expected[port] = drop_all(port_of(binding))
            cause = _cause(result)
            if isinstance(cause, UndefinedVariableError):
                findings.append(hygiene.undefined_variable(
                    port, vms[port], binding.filterref.filter, cause.variable))
            elif not isinstance(cause, UnresolvedError):
                findings.append(Finding("drift.uncompilable", "high",
                                        f"the port's filters do not compile, so it drops all "
                                        f"traffic: {result.message}",
                                        "fix the filter, then 'nwfilter audit --fix'", port=port,
                                        vm=vms[port], filter=binding.filterref.filter))
        backend = engine.backend
        try:
            held = backend.owner()
        except NwfilterError as exc:
            held = None
            findings.append(Finding("drift.base", "critical", f"the kernel cannot be read: "
                                    f"{exc.message}", "check the backend and the namespace"))
        if held is not None and not held.same_root(engine.owner):
            findings.append(Finding("drift.owner", "critical",
                                    f"the nwfilter tables belong to {held.describe()}, not to this "
                                    "root: its rules are not the ones in force",
                                    "move one of the roots (nwfilter host-move)"))
        elif hasattr(backend, "listing"):
            findings.extend(drift.nft_drift(backend, expected, vms, self._listing(backend)))
        elif backend.recorded():
            # A read-only engine (a query without nwfilterd) records nothing:
            # without a listing there is nothing to compare then.
            findings.extend(drift.recorded_drift(backend.recorded(), expected, vms))
        try:
            broken = backend.preconditions(scan=True, cached=True)
        except NwfilterError as exc:
            broken = (f"the preconditions cannot be read: {exc.message}",)
        l3_ports = [p for p, rs in sorted(good.items()) if any(rs.l3.values())]
        findings.extend(drift.precondition_findings(broken, l3_ports, vms))
        if backend.name == "nft" and bindings:
            try:
                findings.extend(drift.unbound_bridge_ports(backend.netns, sorted(bindings)))
            except (OSError, NwfilterError) as exc:
                log.warning("cannot list the bridge ports: %s", exc)
        self._forget_except(set(bindings))
        for port, rs in sorted(good.items()):
            if wanted_ports is not None and port not in wanted_ports:
                continue
            params = bindings[port].filterref.param_dict()
            given = params.get("IP") or list(engine.learnt(port).get("IP", ()))
            ip = given[0] if given else None
            findings.extend(self._port_checks(port, rs, ip, vms[port], backend.name))
        domain_refs: list[tuple[str, str, FilterRef]] = []
        if domains is not None:
            running: list[tuple[str, str, str]] = []
            for summary in domains.list_domains(all_domains=True):
                for row in domains.interfaces(summary.name):
                    if row.filter is not None:
                        if row.interface not in bindings:
                            domain_refs.append((row.interface if row.interface != "-" else "",
                                                summary.name, FilterRef(row.filter)))
                    elif summary.id >= 0 and row.interface != "-":
                        running.append((summary.name, row.interface, row.mac))
            findings.extend(exposure.unfiltered(running))
        filters = dict(engine.pool.snapshot())
        stock = frozenset(p.stem for p in engine.pool.stock_dir.glob("*.xml")) \
            if engine.pool.stock_dir.is_dir() else frozenset()
        findings.extend(hygiene.filter_hygiene(filters, stock, list(bindings.values()),
                                               domain_refs))
        if wanted_ports is not None:
            findings = [f for f in findings if f.port in wanted_ports]
        return len(bindings) if wanted_ports is None else len(wanted_ports), findings


def run_audit(engine: Engine, domains: DomainManager | None,
              ports: Sequence[str] | None = None) -> dict[str, Any]:
    """One audit, as `audit.run` answers it (nothing kept for the next)."""
    return Auditor().run(engine, domains, ports)
