"""A stable, human-readable text form of a `Ruleset`.

One line per rule, chains in evaluation order, for `nwfilter-binding-dumpxml
--rules`, dry-run plans and tests:

    from-vm root: -800 jump mac
    from-vm mac: 500 eth-src != 52:54:00:00:00:01 -> drop  # no-mac-spoofing rule 2

The text depends only on the ruleset, never on dict or set order, so two
renderings of equal rulesets are equal and a line diff shows what changed.
"""

from __future__ import annotations

import ipaddress

from nwfilter.ir import (
    AddrRange,
    CtState,
    Hook,
    IntRange,
    IPSetMatch,
    LearntSet,
    MacMatch,
    Match,
    MatchValue,
    Rule,
    Ruleset,
    TcpFlag,
    TcpFlags,
    Verdict,
)

_CT_ORDER = tuple(CtState)
_TCP_ORDER = (TcpFlag.FIN, TcpFlag.SYN, TcpFlag.RST, TcpFlag.PSH, TcpFlag.ACK, TcpFlag.URG)
_HEX_FIELDS = frozenset({"eth-type", "vlan-encap", "arp-ptype"})


def format_value(field_name: str, value: MatchValue) -> str:
    """One match value as text."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return f"0x{value:04x}" if field_name in _HEX_FIELDS else str(value)
    if isinstance(value, MacMatch):
        return value.addr if value.mask is None else f"{value.addr}/{value.mask}"
    if isinstance(value, IntRange):
        return str(value.lo) if value.lo == value.hi else f"{value.lo}-{value.hi}"
    if isinstance(value, AddrRange):
        return f"{value.start}-{value.end}"
    if isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network):
        if value.prefixlen == value.max_prefixlen:
            return str(value.network_address)
        return str(value)
    if isinstance(value, TcpFlags):
        mask = ",".join(f.name for f in _TCP_ORDER if f in value.mask) or "NONE"
        flags = ",".join(f.name for f in _TCP_ORDER if f in value.set) or "NONE"
        return f"{mask}/{flags}"
    if isinstance(value, IPSetMatch):
        return f"{value.name}[{','.join(value.flags)}]"
    if isinstance(value, LearntSet):
        return f"@learnt-ipv{value.version}"
    if isinstance(value, frozenset):
        return ",".join(s.value for s in _CT_ORDER if s in value)
    return str(value)


def format_match(match: Match) -> str:
    op = "!=" if match.negate else "=="
    if isinstance(match.value, bool) and not match.negate:
        return match.field.value
    if isinstance(match.value, bool):
        return f"not {match.field.value}"
    return f"{match.field.value} {op} {format_value(match.field.value, match.value)}"


def format_rule(rule: Rule) -> str:
    """`PRIORITY [family] MATCHES -> VERDICT  # origin`."""
    parts = [str(rule.priority)]
    if rule.family.value != "ether":
        parts.append(rule.family.value)
    parts.extend(format_match(m) for m in rule.matches)
    if rule.verdict is Verdict.JUMP:
        text = " ".join(parts) + f" jump {rule.target}"
    else:
        text = " ".join(parts) + f" -> {rule.verdict.value}"
    notes: list[str] = []
    if rule.origin is not None and rule.origin.index:
        notes.append(f"{rule.origin.filter} rule {rule.origin.index}")
    if rule.comment:
        notes.append(repr(rule.comment))
    if notes:
        text += "  # " + "; ".join(notes)
    return text


def render_lines(rs: Ruleset) -> list[str]:
    """The lines of `render_text`, without the header."""
    lines: list[str] = []
    for hook in (Hook.FROM_VM, Hook.TO_VM):
        for chain in rs.chains(hook):
            if not chain.rules:
                lines.append(f"{hook.value} {chain.name}: (empty)")
            for rule in chain.rules:
                lines.append(f"{hook.value} {chain.name}: {format_rule(rule)}")
    for hook in (Hook.FROM_VM, Hook.TO_VM):
        for rule in rs.l3_rules(hook):
            lines.append(f"{hook.value} ip: {format_rule(rule)}")
    if rs.learn is not None:
        # While no IPv4 address is learnt, these rules decide instead.
        for hook in (Hook.FROM_VM, Hook.TO_VM):
            for rule in rs.learn.learning.get(hook, ()):
                lines.append(f"{hook.value} until-learnt: {format_rule(rule)}")
        for addr in rs.learn.addresses:
            lines.append(f"@learnt-ipv{addr.address.version}: {addr.address}")
    return lines


def render_text(rs: Ruleset) -> str:
    """The whole ruleset as text: a header line, then one line per rule."""
    port = rs.port
    header = f"port {port.portdev} mac {port.mac}"
    if port.owner_name:
        header += f" owner {port.owner_name}"
    if rs.filter_names:
        header += " filters " + ",".join(sorted(rs.filter_names))
    lines = [header, *render_lines(rs)]
    return "\n".join(lines) + "\n"
