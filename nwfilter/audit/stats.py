"""Per-rule counters of each port, tied to the filter and rule of the XML.

Both kernel backends count every rule of a port's chains:

* nft: the renderer puts a `counter` in each rule (`render.COUNTER`) and a
  counter-only first rule in each root chain (`render.ENTRY_TEXT`) that
  every frame entering the port's chains passes.  One text listing of the
  two tables gives every rule's packets and bytes; a rule is tied to its
  origin by the digest its comment carries (`render.digest`), looked up in
  what the engine rendered for the port, or else by its comment, looked
  up among the origins of the port's ruleset (`_nft_origins`).
* ebiptables: the tools count every rule themselves (`*-save -c`); rules
  are tied to their origin by their position in what the port's ruleset
  renders to (`render.port_origins`), or by their text where the chain
  was edited.
  The links from PREROUTING/POSTROUTING into the port's root chains count
  the frames entering them.

Per port and direction (`out`: sent by the guest, `in`: delivered to it)
the totals are: dropped, the sum of the port's drop and reject rules of
both layers (a frame is dropped once); accepted, the frames entering its
chains less those dropped, whichever way they left (an accept, a return,
the end of a chain, the chain's policy).
"""

from __future__ import annotations

import re
from collections.abc import Collection, Iterable, Sequence
from typing import TYPE_CHECKING, Any

from nwfilter.errors import NotFoundError, NwfilterError

if TYPE_CHECKING:
    from nwfilter.backends.ebiptables.backend import EbiptablesBackend
    from nwfilter.backends.ebiptables.render import Tables
    from nwfilter.backends.nft.backend import NftBackend
    from nwfilter.engine import Engine
    from nwfilter.ir import Origin, Ruleset

Json = dict[str, Any]

DIRECTIONS = ("out", "in")
DROPS = frozenset({"drop", "reject"})
FEW_PORTS = 16  # up to this many ports, their chains are listed one by one
_COUNTER = re.compile(r"\bcounter packets (\d+) bytes (\d+)")
_COMMENT = re.compile(r' comment "(.*)"\Z')
_VERDICT = re.compile(r"\b(accept|drop|reject|return|continue|jump|goto)\b")
_XT_VERDICT = re.compile(r"(?:^| )-([jg]) (\S+)")


def parse_counters(family: str, text: str,
                   tags: Collection[str] | None = None) -> dict[str, list[Json]]:
    """Per chain of an nft table listing (with `tags`, only the chains of
    ports with those tags), its rules: comment, digest, verdict and
    counters (None where a rule has no counter)."""
    from nwfilter.backends.nft import render

    out: dict[str, list[Json]] = {}
    chain = None
    for raw in text.splitlines():
        line = raw.strip()
        if line.startswith("chain ") and line.endswith("{"):
            chain = line[6:-1].strip().strip('"')
            if tags is not None and chain.partition("/")[0] not in tags:
                chain = None
                continue
            out[chain] = []
            continue
        if line == "}":
            chain = None
            continue
        if chain is None or not line or line.startswith(("type ", "policy ")):
            continue
        found = _COMMENT.search(line)
        comment = found.group(1) if found else ""
        body = line[:found.start()] if found else line
        counter = _COUNTER.search(body)
        verdict = _VERDICT.findall(_COUNTER.sub("", body))
        out[chain].append({
            "family": family, "comment": comment.split(render.DIGEST_TAG)[0],
            "digest": render.digest_of(comment),
            "verdict": verdict[-1] if verdict else "",
            "packets": int(counter.group(1)) if counter else None,
            "bytes": int(counter.group(2)) if counter else None,
        })
    return out


def port_stats(engine: Engine, ports: Sequence[str] | None) -> Json:
    """`stats.get`: per bound port (all, or `ports`), its rules with their
    origin and counters, and its totals per direction."""
    from nwfilter.backends.ebiptables.backend import EbiptablesBackend
    from nwfilter.backends.nft.backend import NftBackend

    bound = sorted(b.portdev for b in engine.list_bindings())
    if ports:
        unknown = sorted(set(ports) - set(bound))
        if unknown:
            raise NotFoundError(f"no binding for port '{unknown[0]}'")
    wanted = [p for p in bound if not ports or p in ports]
    backend = engine.backend
    rulesets = {port: _ruleset(engine, port) for port in wanted}
    if isinstance(backend, NftBackend):
        out = _nft_ports(backend, rulesets)
    elif isinstance(backend, EbiptablesBackend):
        out = _ebiptables_ports(backend, rulesets)
    else:  # no kernel, no counters
        out = {p: {"rules": [], "totals": _totals([], None)} for p in wanted}
    return {"backend": backend.name,
            "counters": any(r["packets"] is not None for port in out.values()
                            for r in port["rules"]),
            "ports": out}


# -- common ------------------------------------------------------------------


def _ruleset(engine: Engine, port: str) -> Ruleset | None:
    """The rules in force for a port: as applied, else (an engine that
    applies nothing, answering a query without nwfilterd) compiled now;
    None when they do not compile (its rules are then shown by their text)."""
    try:
        return engine.ruleset(port)
    except NwfilterError:
        return None


def _origins(ruleset: Ruleset) -> dict[str, Origin]:
    """Every rule origin of a ruleset by its text (as the renderers write it)."""
    from nwfilter.ir import Hook

    out: dict[str, Origin] = {}
    rules = [rule for hook in (Hook.FROM_VM, Hook.TO_VM)
             for rule in (*(r for c in ruleset.chains(hook) for r in c.rules),
                          *ruleset.l3_rules(hook))]
    if ruleset.learn is not None:
        rules.extend(r for gate in ruleset.learn.learning.values() for r in gate)
    for rule in rules:
        if rule.origin is not None:
            out.setdefault(str(rule.origin), rule.origin)
    return out


def _row(chain: str, index: int, table: str, direction: str, verdict: str,
         origin: Origin | None, text: str, packets: int | None, size: int | None) -> Json:
    return {"chain": chain, "index": index, "table": table, "direction": direction,
            "verdict": verdict, "filter": origin.filter if origin is not None else None,
            "rule": origin.index if origin is not None else None,
            "origin": str(origin) if origin is not None else text,
            "packets": packets, "bytes": size}


def _totals(rows: Iterable[Json], entered: dict[str, tuple[int, int]] | None) -> Json:
    """Accepted and dropped packets and bytes per direction and in all;
    accepted is None where the frames entering are not known, everything
    is None for a backend without counters (`entered` None)."""
    rows = list(rows)
    out: Json = {}
    if entered is None:
        out = {d: {"accepted": None, "dropped": None} for d in DIRECTIONS}
        return {**out, "accepted": None, "dropped": None}
    for direction in DIRECTIONS:
        dropped = [0, 0]
        for row in rows:
            if row["direction"] == direction and row["verdict"] in DROPS \
                    and row["packets"] is not None:
                dropped[0] += row["packets"]
                dropped[1] += row["bytes"]
        seen = None if entered is None else entered.get(direction)
        accepted = None if seen is None else {
            "packets": max(0, seen[0] - dropped[0]), "bytes": max(0, seen[1] - dropped[1])}
        out[direction] = {"accepted": accepted,
                          "dropped": {"packets": dropped[0], "bytes": dropped[1]}}
    both = [out[d]["accepted"] for d in DIRECTIONS]
    out["accepted"] = None if None in both else {
        key: sum(a[key] for a in both) for key in ("packets", "bytes")}
    out["dropped"] = {key: sum(out[d]["dropped"][key] for d in DIRECTIONS)
                      for key in ("packets", "bytes")}
    return out


# -- nft ---------------------------------------------------------------------


def _nft_ports(backend: NftBackend, rulesets: dict[str, Ruleset | None]) -> dict[str, Json]:
    from nwfilter.backends.nft import render

    by_tag: dict[str, list[tuple[tuple[str, str], list[Json]]]] = {}
    tags = {render.port_tag(port) for port in rulesets}
    for family, text in _nft_texts(backend, list(rulesets)).items():
        if text is not None:
            for name, rules in parse_counters(family, text, tags).items():
                tag, slash, _rest = name.partition("/")
                if slash:  # a port's chain (base chains have no '/')
                    by_tag.setdefault(tag, []).append(((family, name), rules))
    out: dict[str, Json] = {}
    for port, ruleset in rulesets.items():
        known, origins = _nft_origins(backend, port, ruleset)
        rows: list[Json] = []
        entered: dict[str, tuple[int, int]] = {}
        for key, rules in sorted(by_tag.get(render.port_tag(port), ()), key=lambda c: c[0]):
            family, name = key
            word = name.split("/", 2)[1]
            if word not in ("from", "to"):
                continue  # the stamp chain: no packet walks it
            direction = "out" if word == "from" else "in"
            mine = known.get(key, {})
            for index, rule in enumerate(rules, 1):
                text = mine.get(rule["digest"] or "") or known.get(None, {}).get(rule["comment"])
                if text is None:  # not what we render: say what its comment says
                    text = rule["comment"] or "(a rule without a comment of ours)"
                if text == render.ENTRY_TEXT and rule["packets"] is not None:
                    entered[direction] = (rule["packets"], rule["bytes"])
                rows.append(_row(name, index, family, direction, rule["verdict"],
                                 origins.get(text), text, rule["packets"], rule["bytes"]))
        out[port] = {"rules": rows, "totals": _totals(rows, entered)}
    return out


def _nft_texts(backend: NftBackend, ports: Sequence[str]) -> dict[str, str | None]:
    """The listing to read counters from: for a few ports whose chains the
    backend knows, those chains alone (a listing of both tables costs
    about 0.5 s at 1,000 ports); else both tables."""
    from nwfilter.backends.nft import render

    if len(ports) <= FEW_PORTS:
        chains: list[tuple[str, str]] = []
        for port in ports:
            held = backend.record(port)
            if held is None:
                break
            record = held[1]
            chains.extend((render.BRIDGE, name) for name in sorted(record.bridge_chains))
            chains.extend((render.INET, name) for name in sorted(record.inet_chains))
        else:
            return backend.chain_texts(chains)
    return backend.listing_text()


def _nft_origins(
    backend: NftBackend, port: str, ruleset: Ruleset | None
) -> tuple[dict[tuple[str, str] | None, dict[str, str]], dict[str, Origin]]:
    """How to tie a listed rule of `port` to its origin text: per chain,
    rule digest -> origin text, from what the backend rendered for the port
    (exact); or, under the key None, rule comment -> origin text, from the
    origins of its ruleset (a port proven at start has nothing rendered in
    memory: rendering every port on every call would cost more than the
    listing).  A port whose ruleset has two origins that cut to one comment
    is rendered.  And the origins of the ruleset by their text."""
    from nwfilter.backends.nft import render

    if ruleset is None:
        return {}, {}
    origins = _origins(ruleset)
    held = backend.record(port)
    record = held[1] if held is not None and held[0] == ruleset else None
    if record is None or not record.contents:
        room = render.MAX_COMMENT_BYTES - len(render.DIGEST_TAG) - render.DIGEST_LEN
        comments: dict[str, str] = {}
        for text in origins:
            cut = render.comment_text(text, room)
            if comments.setdefault(cut, text) != text:
                break  # ambiguous: render it
        else:
            return {None: comments}, origins
        # The port id only names the mark rule, which has no origin.
        _batch, record = render.render_port(
            ruleset, record.port_id if record is not None else 1, None,
            backend.capabilities())
    known: dict[tuple[str, str] | None, dict[str, str]] = {}
    for key, rendered in record.contents.items():
        sigs = record.digests.get(key, ())
        known[key] = {sig: origin for (_e, origin), sig in zip(rendered, sigs, strict=True)
                      if origin is not None}
    return known, origins


# -- ebiptables ----------------------------------------------------------------


def _xt_verdict(spec: str) -> str:
    found = list(_XT_VERDICT.finditer(spec))
    if not found:
        return ""
    kind, target = found[-1].group(1), found[-1].group(2)
    if target in ("ACCEPT", "DROP", "RETURN", "REJECT", "CONTINUE"):
        return target.lower()
    return "goto" if kind == "g" else "jump"


def _rendered(ruleset: Ruleset | None) -> Tables | None:
    from nwfilter.backends.ebiptables import render

    if ruleset is None:
        return None
    try:
        return render.render_port(ruleset)
    except NwfilterError:
        return None


def _held_chains(chains: dict[str, list[tuple[str, int, int]]], port: str) -> list[str]:
    """The port's chains the kernel holds (by libvirt's names)."""
    from nwfilter.backends.ebiptables import render

    heads = render.port_chain_names(port)
    return [name for name in chains
            if any(name == h or (h.endswith("-") and name.startswith(h)) for h in heads)]


def _xt_direction(chain: str) -> str:
    return "in" if chain.startswith(("libvirt-O-", "O-", "FO-")) else "out"


def _ebiptables_ports(backend: EbiptablesBackend,
                      rulesets: dict[str, Ruleset | None]) -> dict[str, Json]:
    from nwfilter.backends.ebiptables import plan, render

    kernel = {table: plan.counted(text) for table, text in backend.counted_tables().items()}
    out: dict[str, Json] = {}
    for port, ruleset in rulesets.items():
        tables = _rendered(ruleset)
        if tables is None:  # no rules to compare with: the chains of its name, untied
            origins: dict[str, dict[str, tuple[Origin | None, ...]]] = {
                t: {} for t in render.TABLES}
            tables = render.Tables()
            for t in render.TABLES:
                tables.chains[t] = {c: () for c in _held_chains(kernel[t], port)}
        else:
            assert ruleset is not None
            origins = render.port_origins(ruleset)
        mine_chains = tables.chains
        rows: list[Json] = []
        for table in render.TABLES:
            for chain in sorted(mine_chains[table]):
                specs = mine_chains[table][chain]
                mine = origins[table].get(chain, ())
                held = kernel[table].get(chain, [])
                free = list(range(len(specs)))
                for index, (spec, packets, size) in enumerate(held, 1):
                    # By position while the kernel holds what was rendered,
                    # else by the first rendered rule of the same text.
                    at = index - 1 if index - 1 in free and specs[index - 1] == spec else next(
                        (i for i in free if specs[i] == spec), None)
                    origin = None
                    if at is not None:
                        free.remove(at)
                        origin = mine[at] if at < len(mine) else None
                    text = "" if origin is not None else (
                        "(not a rule the filters render)" if at is None else "")
                    rows.append(_row(chain, index, table, _xt_direction(chain),
                                     _xt_verdict(spec), origin, text, packets, size))
        entered: dict[str, tuple[int, int]] = {}
        for base, spec in tables.links[render.EB]:
            for held_spec, packets, size in kernel[render.EB].get(base, ()):
                if held_spec == spec:
                    entered["out" if base == "PREROUTING" else "in"] = (packets, size)
        out[port] = {"rules": rows, "totals": _totals(rows, entered)}
    return out
