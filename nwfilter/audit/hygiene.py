"""Hygiene: rules that never match, filters and parameters nobody uses.

* shadowed — in a compiled chain (or layer-3 list), a rule whose every
  frame an earlier rule with a final verdict (accept, drop, reject,
  return) already takes: each condition of the earlier rule holds
  whenever the later rule's do (the same condition, or a wider range,
  prefix or state set);
* unused filters — defined (not stock) filters that no binding, no domain
  interface and no filter reaches;
* missing filters — references (in filters, bindings, domains) to filters
  that do not exist;
* parameters given but never used by a rule of the binding's filter tree,
  and variables a rule uses that nothing gives (the port then drops
  everything).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping, Sequence

from nwfilter.audit.findings import Finding
from nwfilter.conf.model import BindingDef, FilterDef, FilterRef, VarRef
from nwfilter.ir import IntRange, Match, Rule, Ruleset, Verdict

_FINAL = frozenset({Verdict.ACCEPT, Verdict.DROP, Verdict.REJECT, Verdict.RETURN})
# Read by the engine itself, not by rules: never "unused".
ENGINE_PARAMS = frozenset({"CTRL_IP_LEARNING", "DHCPSERVER", "DHCPSERVERV6", "IP", "IPV6",
                           "MAC"})


def _covers(a: Match, b: Match) -> bool:
    """Whenever `b` holds, `a` holds."""
    if a.field is not b.field or a.negate != b.negate:
        return False
    if a.value == b.value:
        return True
    if a.negate:
        return False
    va, vb = a.value, b.value
    if isinstance(va, IntRange) and isinstance(vb, IntRange):
        return va.lo <= vb.lo and vb.hi <= va.hi
    if isinstance(va, ipaddress.IPv4Network | ipaddress.IPv6Network) and isinstance(
            vb, ipaddress.IPv4Network | ipaddress.IPv6Network):
        return va.version == vb.version and vb.subnet_of(va)  # type: ignore[arg-type]
    if isinstance(va, frozenset) and isinstance(vb, frozenset):
        return vb <= va
    return False


def shadows(earlier: Rule, later: Rule) -> bool:
    if earlier.verdict not in _FINAL or earlier.family is not later.family:
        return False
    return all(any(_covers(a, b) for b in later.matches) for a in earlier.matches)


def _lists(rs: Ruleset) -> Iterable[tuple[str, Sequence[Rule]]]:
    for hook, chains in rs.l2.items():
        for chain in chains:
            yield f"{hook.value} {chain.name}", chain.rules
    for hook, rules in rs.l3.items():
        yield f"{hook.value} ip", rules


def shadowed(rs: Ruleset, vm: str) -> list[Finding]:
    out: list[Finding] = []
    seen: set[object] = set()  # one finding per XML rule (a rule may sit in both hooks)
    for where, rules in _lists(rs):
        for j, later in enumerate(rules):
            if later.origin is None or not later.origin.index or later.origin in seen:
                continue  # the compiler's own rules (jumps, chain policies)
            for earlier in rules[:j]:
                if shadows(earlier, later):
                    seen.add(later.origin)
                    by = str(earlier.origin) if earlier.origin is not None else (
                        earlier.comment or "a rule of the compiler")
                    out.append(Finding(
                        "hygiene.shadowed", "low",
                        f"in {where}, {later.origin} can never match: {by} decides first",
                        "remove the rule, or give it a lower priority than the one before it",
                        port="", vm="", filter=later.origin.filter,
                        rule=f"rule {later.origin.index} {later.origin.text}".strip()))
                    break
    return out


def _vars_of(fdef: FilterDef) -> set[str]:
    names: set[str] = set()
    for rule in fdef.rules:
        if rule.match is None:
            continue
        for attr in rule.match.attrs:
            if isinstance(attr.value, VarRef):
                names.add(attr.value.name)
    return names


def _tree(filters: Mapping[str, FilterDef], top: str) -> tuple[set[str], set[str], list[str]]:
    """(filters reached, variables their rules use, missing names) from `top`."""
    reached: set[str] = set()
    used: set[str] = set()
    missing: list[str] = []
    todo = [top]
    while todo:
        name = todo.pop()
        if name in reached:
            continue
        fdef = filters.get(name)
        if fdef is None:
            missing.append(name)
            continue
        reached.add(name)
        used |= _vars_of(fdef)
        todo.extend(ref.filter for ref in fdef.refs)
        for ref in fdef.refs:
            for param in ref.params:
                used |= {p for p in _param_vars(param.value)}
    return reached, used, missing


def _param_vars(value: str) -> set[str]:
    return {value[1:]} if value.startswith("$") else set()


def filter_hygiene(
    filters: Mapping[str, FilterDef],
    stock: frozenset[str],
    bindings: Sequence[BindingDef],
    domain_refs: Sequence[tuple[str, str, FilterRef]],
) -> list[Finding]:
    """Unused and missing filters, unused parameters."""
    out: list[Finding] = []
    used: set[str] = set()
    for fdef in filters.values():
        for ref in fdef.refs:
            if ref.filter not in filters:
                out.append(Finding("hygiene.missing-filter", "medium",
                                   f"filter '{fdef.name}' references filter '{ref.filter}', "
                                   "which does not exist: a port using it cannot be compiled",
                                   f"define '{ref.filter}' or remove the reference",
                                   filter=fdef.name))
    tops: list[tuple[str, str, FilterRef]] = [(b.portdev, b.owner_name, b.filterref)
                                              for b in bindings]
    tops.extend(domain_refs)
    for port, vm, ref in tops:
        reached, variables, missing = _tree(filters, ref.filter)
        used |= reached
        if ref.filter in missing:
            out.append(Finding("hygiene.missing-filter", "high",
                               f"the port references filter '{ref.filter}', which does not exist",
                               f"define '{ref.filter}' or change the filterref", port=port,
                               vm=vm, filter=ref.filter))
            continue
        for param in sorted({p.name for p in ref.params}):
            if param not in variables and param not in ENGINE_PARAMS:
                out.append(Finding("hygiene.unused-parameter", "low",
                                   f"parameter {param} is given but no rule of "
                                   f"'{ref.filter}' and the filters it references uses it",
                                   f"remove parameter {param}, or check its spelling",
                                   port=port, vm=vm, filter=ref.filter))
    for name in sorted(set(filters) - used - stock):
        reached_by_other = any(name in {r.filter for r in f.refs} for f in filters.values())
        if not reached_by_other:
            out.append(Finding("hygiene.unused-filter", "info",
                               f"filter '{name}' is used by no binding, domain or filter",
                               f"undefine it (nwfilter nwfilter-undefine {name}) if it is "
                               "not needed", filter=name))
    return out


def undefined_variable(port: str, vm: str, filter_name: str, variable: str) -> Finding:
    return Finding("hygiene.undefined-variable", "high",
                   f"variable {variable} is used by a rule but given by nothing: the port "
                   "drops all traffic", f"give parameter {variable} in the filterref",
                   port=port, vm=vm, filter=filter_name)
