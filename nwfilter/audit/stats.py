"""Per-rule counters of each port, tied to the filter and rule of the XML.

Read from one text listing of our two tables: every rule of a port's
chains, with its origin (the rule comment) and, where the rule carries an
nft `counter`, its packets and bytes.  The renderer does not add counters
to the rules it writes (a counter changes every rule's digest and costs
per packet), so today only rules an operator gave a counter report numbers;
the others report `null`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from nwfilter.engine import Engine

_COUNTER = re.compile(r"\bcounter packets (\d+) bytes (\d+)")
_COMMENT = re.compile(r' comment "(.*)"\Z')
_VERDICT = re.compile(r"\b(accept|drop|reject|return|continue|jump|goto)\b")


def parse_counters(family: str, text: str) -> dict[str, list[dict[str, Any]]]:
    """Per chain of a table listing, its rules: origin, verdict, counters."""
    out: dict[str, list[dict[str, Any]]] = {}
    chain = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("chain ") and line.endswith("{"):
            chain = line[6:-1].strip().strip('"')
            out[chain] = []
            continue
        if line == "}":
            chain = None
            continue
        if chain is None or not line or line.startswith(("type ", "policy ")):
            continue
        found = _COMMENT.search(line)
        comment = found.group(1) if found else ""
        origin = comment.split(" #d=")[0]
        counter = _COUNTER.search(line)
        verdict = _VERDICT.findall(line[:found.start()] if found else line)
        out[chain].append({
            "family": family, "origin": origin,
            "verdict": verdict[-1] if verdict else "",
            "packets": int(counter.group(1)) if counter else None,
            "bytes": int(counter.group(2)) if counter else None,
        })
    return out


def port_stats(engine: Engine, ports: Sequence[str] | None) -> dict[str, Any]:
    from nwfilter.backends.nft import render

    backend = engine.backend
    bound = sorted(b.portdev for b in engine.list_bindings())
    wanted = [p for p in bound if ports is None or p in ports]
    if not hasattr(backend, "listing_text"):
        return {"counters": False, "ports": {p: [] for p in wanted}}
    chains: dict[str, list[dict[str, Any]]] = {}
    for family, text in backend.listing_text().items():
        if text is not None:
            for name, rules in parse_counters(family, text).items():
                chains[f"{family} {name}"] = rules
    out: dict[str, list[dict[str, Any]]] = {}
    for port in wanted:
        tag = render.port_tag(port) + "/"
        rows = []
        for key in sorted(chains):
            name = key.split(" ", 1)[1]
            if name.startswith(tag):
                for index, rule in enumerate(chains[key], 1):
                    rows.append({"chain": name, "index": index, **rule})
        out[port] = rows
    return {"counters": any(r["packets"] is not None for rows in out.values() for r in rows),
            "ports": out}
