"""What our layer-3 dispatch depends on in a namespace, and who breaks it.

Layer-3 rules run in the inet family, reached by bridged frames only through
br_netfilter, and are selected by the packet mark our bridge chains stamp
(render.py).  Two things outside our tables therefore decide whether they
run at all:

* the sysctls net.bridge.bridge-nf-call-iptables/-ip6tables (per namespace):
  at 0, bridged IPv4/IPv6 frames skip every inet hook;
* other rules writing ``meta mark`` between our stamping and our dispatch:
  bridge hooks prerouting/forward/output at priorities -300..0 (ours stamp
  at -300 and -200; br_netfilter hands frames to the inet hooks at 0), and
  inet/ip/ip6 hooks prerouting/forward/input/output at priority <= 0 (our
  dispatch runs at 0; input and output do not reach our dispatch today but
  share the mark, so they are reported too).

This module is pure: it reads the `list table` JSON given to it.  The
sysctls are `nwfilter.backends.brnf`'s; the backend reads (in its
namespace) and repairs.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from .render import BRIDGE, TABLE

# (family, hook) -> (lowest, highest) priority at which a mark writer
# defeats our dispatch.
_WINDOWS: dict[tuple[str, str], tuple[int, int]] = {
    **{(BRIDGE, hook): (-300, 0) for hook in ("prerouting", "forward", "output")},
    **{(fam, hook): (-(2**31), 0)
       for fam in ("inet", "ip", "ip6")
       for hook in ("prerouting", "forward", "input", "output")},
}
_MARK_TARGETS = frozenset({"MARK", "CONNMARK"})


def ours(family: str, name: str) -> bool:
    return name == TABLE and family in ("bridge", "inet")


def _walk(node: Any) -> Iterator[dict[str, Any]]:
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _writes_mark(expr: Any) -> bool:
    for node in _walk(expr):
        mangle = node.get("mangle")
        if isinstance(mangle, dict) and mangle.get("key") == {"meta": {"key": "mark"}}:
            return True
        xt = node.get("xt")
        if isinstance(xt, dict) and str(xt.get("name", "")).upper() in _MARK_TARGETS:
            return True
    return False


def _targets(expr: Any, maps: Mapping[str, set[str]]) -> set[str]:
    found: set[str] = set()
    for node in _walk(expr):
        for verb in ("jump", "goto"):
            jump = node.get(verb)
            if isinstance(jump, dict) and isinstance(jump.get("target"), str):
                found.add(jump["target"])
        for value in node.values():
            if isinstance(value, str) and value.startswith("@"):
                found |= maps.get(value[1:], set())
    return found


def mark_writers(items: list[Any]) -> list[str]:
    """Sentences naming each base chain of a foreign table (the `nftables`
    items of `list table`) that writes the packet mark, itself or in a chain
    it reaches, at a hook and priority where that defeats our dispatch."""
    table = ""
    family = ""
    bases: dict[str, tuple[str, int]] = {}
    rules: dict[str, list[Any]] = {}
    maps: dict[str, set[str]] = {}
    for item in items:
        if not isinstance(item, dict):
            continue
        if "table" in item:
            family, table = item["table"].get("family", ""), item["table"].get("name", "")
        chain = item.get("chain")
        if isinstance(chain, dict) and "hook" in chain:
            bases[chain["name"]] = (chain["hook"], int(chain.get("prio", 0)))
        rule = item.get("rule")
        if isinstance(rule, dict):
            rules.setdefault(rule.get("chain", ""), []).append(rule.get("expr", []))
        mapping = item.get("map")
        if isinstance(mapping, dict):
            maps[mapping.get("name", "")] = _targets(mapping.get("elem", []), {})
    if ours(family, table):
        return []
    edges = {name: set().union(*(_targets(e, maps) for e in exprs)) if exprs else set()
             for name, exprs in rules.items()}
    writers = {name for name, exprs in rules.items() if any(_writes_mark(e) for e in exprs)}
    found: list[str] = []
    for base, (hook, prio) in sorted(bases.items()):
        window = _WINDOWS.get((family, hook))
        if window is None or not window[0] <= prio <= window[1]:
            continue
        seen, todo = {base}, [base]
        while todo:
            for target in edges.get(todo.pop(), set()) - seen:
                seen.add(target)
                todo.append(target)
        hit = sorted(seen & writers)
        if hit:
            via = "" if hit == [base] else f" (in chain {', '.join(hit)})"
            found.append(
                f"table {family} {table} chain {base} (hook {hook}, priority {prio}) "
                f"rewrites the packet mark{via} that selects our layer-3 rules"
            )
    return found
