"""An audit of one state root: every check over the bound ports and the
running domains' interfaces (or the ports asked for), as `audit.run`
serves it.  Run by `nwfilterd`, the listing it reads is the only kernel
dump of the audit, whatever the number of ports."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from nwfilter.audit import drift, exposure, hygiene
from nwfilter.audit.findings import SEVERITIES, Finding, sort_findings
from nwfilter.compile import port_of
from nwfilter.conf.model import FilterRef
from nwfilter.errors import NwfilterError, UndefinedVariableError, UnresolvedError
from nwfilter.ir import Ruleset, drop_all

if TYPE_CHECKING:
    from nwfilter.domain.driver import DomainManager
    from nwfilter.engine import Engine

log = logging.getLogger(__name__)


def _cause(exc: NwfilterError) -> BaseException:
    return exc.__cause__ if exc.__cause__ is not None else exc


def run_audit(engine: Engine, domains: DomainManager | None,
              ports: Sequence[str] | None = None) -> dict[str, Any]:
    wanted_ports = None if not ports else set(ports)
    compiled = engine.compile_bindings(None)
    bindings = {b.portdev: b for b in engine.list_bindings()}
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
            findings.append(hygiene.undefined_variable(port, vms[port], binding.filterref.filter,
                                                       cause.variable))
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
        findings.extend(drift.nft_drift(backend, expected, vms))
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
    for port, rs in sorted(good.items()):
        params = bindings[port].filterref.param_dict()
        given = params.get("IP") or list(engine.learnt(port).get("IP", ()))
        ip = given[0] if given else None
        findings.extend(exposure.port_exposure(rs, ip, vms[port]))
        findings.extend(hygiene.shadowed(rs, vms[port]))
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
    ordered = sort_findings(findings)
    counts = {s: sum(1 for f in ordered if f.severity == s) for s in SEVERITIES}
    return {"ports": len(bindings) if wanted_ports is None else len(wanted_ports),
            "findings": [f.as_json() for f in ordered], "summary": counts}
