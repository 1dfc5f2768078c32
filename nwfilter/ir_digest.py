"""A digest of what a `Ruleset` means, the same in every process.

Backends stamp what they install with it (the nft backend's port stamp,
`nwfilter.backends.nft.render.port_stamp`) so that a later start can tell
an unchanged ruleset without rendering it again.  `repr()` of the IR will
not do: the order of a frozenset of enums (`CT_STATE` values, TCP flags)
follows string hashes, which differ between processes; here every set is
sorted and every other value is written by its deterministic `repr`.

Everything a renderer reads is covered: per hook the chains in order (name,
priority, rules), the layer-3 rules in order, each rule's family, matches
(field, negation, value), verdict, target, priority, comment and origin,
and the port's device name.  The port's MAC and owner are not: rules name
the MAC themselves, and a renderer writes neither.
"""

from __future__ import annotations

import hashlib
from enum import Enum

from nwfilter.ir import Chain, Hook, IntRange, MacMatch, Match, Rule, Ruleset, TcpFlags

_SEP = "\x1f"


# What `ruleset_digest` keeps per chain or rule object: the object (so its
# id is not reused while the entry lives) and its text.
Memo = dict[int, tuple[object, str]]


def ruleset_digest(ruleset: Ruleset, memo: Memo | None = None) -> str:
    """The hex SHA-256 of the ruleset's canonical text.

    A compiler shares the chain and rule objects of port-independent
    filters among the rulesets it builds; with `memo` (one per batch of
    rulesets) each such object is written once."""
    if memo is None:
        memo = {}
    lines = [f"port{_SEP}{ruleset.port.portdev!r}"]
    for hook in (Hook.FROM_VM, Hook.TO_VM):
        for chain in ruleset.chains(hook):
            lines.append(f"chain{_SEP}{hook._value_}")
            lines.append(_chain_text(chain, memo))
        for rule in ruleset.l3_rules(hook):
            lines.append(f"l3{_SEP}{hook._value_}")
            lines.append(_memo_text(rule, memo))
    # An origin may hold lone surrogates (bytes that were not UTF-8).
    return hashlib.sha256("\n".join(lines).encode("utf-8", "surrogatepass")).hexdigest()


def _chain_text(chain: Chain, memo: Memo) -> str:
    kept = memo.get(id(chain))
    if kept is not None:
        return kept[1]
    text = "\n".join([f"{chain.name!r}{_SEP}{chain.priority}",
                      *(_memo_text(rule, memo) for rule in chain.rules)])
    memo[id(chain)] = (chain, text)
    return text


def _memo_text(rule: Rule, memo: Memo) -> str:
    kept = memo.get(id(rule))
    if kept is not None:
        return kept[1]
    text = rule_text(rule)
    memo[id(rule)] = (rule, text)
    return text


def rule_text(rule: Rule) -> str:
    """One rule as canonical text, on one line."""
    origin = rule.origin
    where = "-" if origin is None else f"{origin.filter!r}{_SEP}{origin.index}{_SEP}{origin.text!r}"
    # `_value_`, not `value`: the property costs a descriptor call per use.
    head = (f"{rule.family._value_}{_SEP}{rule.verdict._value_}{_SEP}{rule.target!r}{_SEP}"
            f"{rule.priority}{_SEP}{rule.comment!r}{_SEP}{where}")
    if not rule.matches:
        return head
    return head + _SEP + _SEP.join(map(_match_text, rule.matches))


def _match_text(match: Match) -> str:
    return f"{match.field._value_}{'!=' if match.negate else '=='}{_value_text(match.value)}"


def _value_text(value: object) -> str:
    kind = type(value)
    if kind is MacMatch:
        assert isinstance(value, MacMatch)
        return f"mac {value.addr} {value.mask}"
    if kind is IntRange:
        assert isinstance(value, IntRange)
        return f"range {value.lo} {value.hi}"
    if kind is int:
        return f"int {value}"
    if isinstance(value, frozenset):
        return "{" + ",".join(sorted(_value_text(item) for item in value)) + "}"
    if isinstance(value, TcpFlags):
        return f"TcpFlags({_value_text(value.mask)},{_value_text(value.set)})"
    if isinstance(value, Enum):
        return f"{type(value).__name__}.{value.name}"
    return repr(value)
