"""What an audit reports: findings, their severities, and their forms.

A finding names its check (`kind`, e.g. `drift.missing-rule`), a
severity, where it is (port, VM, filter and rule of the XML) and what to do
about it.  `table`, `as_json` and `sarif` are the three outputs of
`nwfilter audit`; `worst_at_least` is what `--fail-on` gates on.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

SEVERITIES = ("info", "low", "medium", "high", "critical")
_SARIF_LEVEL = {"info": "note", "low": "note", "medium": "warning", "high": "error",
                "critical": "error"}

# What each check means, for SARIF's rule table and the docs.
KINDS = {
    "drift.no-rules": "a bound port has no rules in the kernel",
    "drift.missing-chain": "a chain the port's rules need is not in the kernel",
    "drift.extra-chain": "the kernel holds a chain of ours that no binding needs",
    "drift.missing-rule": "a compiled rule is not in the kernel",
    "drift.extra-rule": "the kernel holds a rule the compiled rules do not have",
    "drift.altered-rule": "a rule in the kernel differs from the compiled one",
    "drift.dispatch": "the port's dispatch element is missing or points elsewhere",
    "drift.base": "a base chain or verdict map of ours is missing or altered",
    "drift.layout": "the tables are not of this version's layout",
    "drift.owner": "another state root owns the tables",
    "drift.uncompilable": "the port's filters do not compile: it drops everything",
    "precondition": "something the layer-3 rules depend on does not hold",
    "precondition.unbound-bridge-port": "a port on a filtered bridge has no binding",
    "exposure.unfiltered": "a running VM interface has no filter",
    "exposure.mac-spoofing": "the rules let the guest send with another source MAC",
    "exposure.ip-spoofing": "the rules let the guest send with another source IPv4 address",
    "exposure.ipv6-spoofing": "the rules let the guest send with another source IPv6 address",
    "exposure.arp-spoofing": "the rules let the guest send ARP for an address not its own",
    "exposure.dhcp-server": "the rules let the guest answer as a DHCP server",
    "exposure.ipv6-ra": "the rules let the guest send IPv6 router advertisements",
    "hygiene.shadowed": "a rule can never match: an earlier rule always decides first",
    "hygiene.unused-filter": "a filter no binding, domain or filter uses",
    "hygiene.missing-filter": "a reference to a filter that does not exist",
    "hygiene.unused-parameter": "a parameter given that no rule uses",
    "hygiene.undefined-variable": "a variable a rule uses that nothing gives",
}


@dataclass(frozen=True)
class Finding:
    kind: str
    severity: str
    message: str
    fix: str
    port: str = ""
    vm: str = ""
    filter: str = ""
    rule: str = ""  # the rule of the XML ("rule 3 <ip srcipaddr='$IP'>"), or a chain

    def key(self) -> tuple[str, ...]:
        return (self.kind, self.port, self.filter, self.rule, self.message)

    def as_json(self) -> dict[str, Any]:
        return asdict(self)


def rank(severity: str) -> int:
    return SEVERITIES.index(severity) if severity in SEVERITIES else 0


def sort_findings(findings: Iterable[Finding]) -> list[Finding]:
    """Worst first, then by port, check and place; duplicates dropped."""
    unique = {f.key(): f for f in findings}
    return sorted(unique.values(),
                  key=lambda f: (-rank(f.severity), f.port, f.kind, f.filter, f.rule,
                                 f.message))


def worst_at_least(findings: Sequence[dict[str, Any]], threshold: str) -> bool:
    return any(rank(str(f["severity"])) >= rank(threshold) for f in findings)


def sarif(findings: Sequence[dict[str, Any]], version: str = "") -> dict[str, Any]:
    """A SARIF 2.1.0 log of `findings` (as `Finding.as_json` gives them)."""
    used = sorted({str(f["kind"]) for f in findings})
    results = []
    for f in findings:
        where = ", ".join(f"{k} {f[k]}" for k in ("port", "vm", "filter", "rule") if f.get(k))
        logical = [{"name": f["port"], "kind": "port"}] if f.get("port") else []
        if f.get("filter"):
            logical.append({"name": f["filter"], "kind": "filter"})
        results.append({
            "ruleId": f["kind"],
            "level": _SARIF_LEVEL.get(str(f["severity"]), "warning"),
            "message": {"text": f"{f['message']}" + (f" ({where})" if where else "")},
            "locations": [{"logicalLocations": logical}] if logical else [],
            "fixes": [{"description": {"text": f["fix"]}}] if f.get("fix") else [],
            "properties": {"severity": f["severity"], "vm": f.get("vm", "")},
        })
    return {
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "nwfilter-audit", "version": version,
                "rules": [{"id": k, "shortDescription": {"text": KINDS.get(k, k)}}
                          for k in used],
            }},
            "results": results,
        }],
    }
