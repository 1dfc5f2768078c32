"""What the kernel holds in our two tables, read back from their JSON listings.

A start reconciles instead of replacing: it lists `bridge nwfilter` and
`inet nwfilter` once each, and this module (pure, no kernel access) turns
the two listings into what the applier needs to compare them with what the
compiled rulesets render to:

* `Listing` — the chains, the digests their rules carry (`render.digest`,
  at the end of each rule comment), the dispatch elements of the four
  verdict maps, the sets, and the port ids the mark-stamping rules name;
* `layout_problem` — why the tables cannot be reconciled in place (an
  unknown base chain, a map of another type, another layout version): the
  caller then replaces both tables;
* `port_ids` and `port_record` — per bound port, the id it had (from the
  `l3_from`/`l3_to` elements, else from its mark-stamping rule) and a
  `PortRecord` of what it owns now, which `render.render_port` takes as
  `previous` so that only what differs is written.

Rules are compared by digest, never by expression: libnftables lists
expressions normalised (ether types as names, `th` as `tcp`, ...).
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nwfilter.ir import Hook

from . import render
from .render import BRIDGE, INET, TABLE, PortRecord

Json = dict[str, Any]
ChainKey = tuple[str, str]  # (family, name)
OWNER_CHAIN = "owner"
UNKNOWN = "?"  # the digest of a rule without one of ours: matches nothing rendered


@dataclass
class Listing:
    """Our two tables as the kernel holds them."""

    tables: set[str] = field(default_factory=set)  # families present
    chains: dict[ChainKey, Json] = field(default_factory=dict)
    digests: dict[ChainKey, list[str]] = field(default_factory=dict)
    comments: dict[ChainKey, list[str]] = field(default_factory=dict)
    maps: dict[ChainKey, Json] = field(default_factory=dict)
    # per map, key -> jump target (None: a verdict other than a jump)
    elements: dict[ChainKey, dict[Any, str | None]] = field(default_factory=dict)
    sets: dict[str, Json] = field(default_factory=dict)  # inet sets by name
    odd_elements: bool = False  # an element key of a kind we never write

    def port_chains(self) -> set[ChainKey]:
        """Every chain that is neither a base chain nor the owner chain."""
        base = render.base_chains()
        return {key for key in self.chains
                if key not in base and key[1] != OWNER_CHAIN}


def list_table(family: str) -> Json:
    return {"nftables": [{"list": {"table": {"family": family, "name": TABLE}}}]}


def parse(listings: Mapping[str, Any]) -> Listing:
    """`listings`: family -> the JSON answer to `list_table(family)`, or
    None when the table does not exist."""
    out = Listing()
    for family, answer in listings.items():
        if not isinstance(answer, dict):
            continue
        for item in answer.get("nftables", ()):
            if not isinstance(item, dict):
                continue
            if "table" in item:
                out.tables.add(family)
            elif "chain" in item:
                chain = item["chain"]
                key = (family, str(chain.get("name")))
                out.chains[key] = chain
                out.digests.setdefault(key, [])
                out.comments.setdefault(key, [])
            elif "rule" in item:
                rule = item["rule"]
                key = (family, str(rule.get("chain")))
                comment = rule.get("comment")
                out.digests.setdefault(key, []).append(render.digest_of(comment) or UNKNOWN)
                out.comments.setdefault(key, []).append(
                    comment if isinstance(comment, str) else "")
            elif "map" in item:
                vmap = item["map"]
                key = (family, str(vmap.get("name")))
                out.maps[key] = vmap
                out.elements[key], odd = _elements(vmap.get("elem", ()))
                out.odd_elements |= odd
            elif "set" in item and family == INET:
                out.sets[str(item["set"].get("name"))] = item["set"]
    return out


def _elements(elems: Iterable[Any]) -> tuple[dict[Any, str | None], bool]:
    found: dict[Any, str | None] = {}
    odd = False
    for elem in elems:
        if not isinstance(elem, list) or len(elem) != 2:
            odd = True
            continue
        key, data = elem
        if not isinstance(key, str | int) or isinstance(key, bool):
            odd = True  # a catch-all or a range: never ours
            continue
        target = data.get("jump", {}).get("target") if isinstance(data, dict) else None
        found[key] = target if isinstance(target, str) else None
    return found, odd


def distrust(listing: Listing, chains: Collection[ChainKey] | None) -> None:
    """Forget the digests of `chains` (None: of every chain), so that
    their rules are rewritten: after a foreign transaction touched them, a
    comment of ours may sit on a rule that is not."""
    keys = list(listing.digests) if chains is None else [k for k in chains
                                                         if k in listing.digests]
    for key in keys:
        listing.digests[key] = [UNKNOWN] * max(1, len(listing.digests[key]))


def layout_problem(listing: Listing) -> str | None:
    """Why the tables cannot be reconciled in place, or None.

    Drift inside the layout (a base chain flushed or missing, a map
    deleted) is repaired in place; a layout that is not this version's
    (base chain rules without our layout tag, unknown base chains, maps or
    sets of other types) is replaced."""
    if listing.tables != {BRIDGE, INET}:
        return "one of the two tables is missing"
    base = render.base_chains()
    for key, chain in sorted(listing.chains.items()):
        if "hook" not in chain:
            continue
        want = base.get(key)
        if want is None:
            return f"unknown base chain {key[0]} {key[1]}"
        if (chain.get("hook"), chain.get("prio")) != want or chain.get("type") != "filter" \
                or chain.get("policy") != "accept":
            return f"base chain {key[0]} {key[1]} has another hook, priority or policy"
    for key in base:
        if key in listing.chains and "hook" not in listing.chains[key]:
            return f"chain {key[0]} {key[1]} has no hook"
    types = {(family, name): kind for family, name, kind in render.BASE_MAPS}
    for key, vmap in sorted(listing.maps.items()):
        if types.get(key) != vmap.get("type") or vmap.get("map") != "verdict":
            return f"map {key[0]} {key[1]} is not a verdict map of this layout"
    if listing.odd_elements:
        return "a verdict map holds an element of a kind this layout never writes"
    for name, spec in sorted(listing.sets.items()):
        problem = _set_problem(name, spec)
        if problem is not None:
            return problem
    tags = {comment.split(render.DIGEST_TAG)[0]
            for key in base for comment in listing.comments.get(key, ())}
    if render.BASE_COMMENT not in tags:
        return "no base chain carries this layout's version"
    other = sorted(t for t in tags if t != render.BASE_COMMENT)
    if other:
        return f"base chains carry another layout ({other[0]!r})"
    return None


def _set_problem(name: str, spec: Json) -> str | None:
    for prefix, flags in ((render.CONNLIMIT_PREFIX, False), (render.IPSET_PREFIX, True)):
        for version, kind in (("4", "ipv4_addr"), ("6", "ipv6_addr")):
            if name.startswith(f"{prefix}{version}_"):
                if spec.get("type") != kind or ("interval" in spec.get("flags", ())) != flags:
                    return f"set {name} is not of this layout's type"
                return None
    return None  # not a name of ours: deleted as stale


def base_drift(listing: Listing) -> frozenset[ChainKey]:
    """The base chains and maps to render again: missing, or whose rules
    are not exactly ours."""
    wanted = render.base_digests()
    out = {key for key, digests in wanted.items()
           if tuple(listing.digests.get(key, ())) != digests or key not in listing.chains}
    out |= {(family, name) for family, name, _kind in render.BASE_MAPS
            if (family, name) not in listing.maps}
    return frozenset(out)


def port_ids(listing: Listing, portdevs: Iterable[str]) -> dict[str, int]:
    """The id each port had (ports the kernel names none for are left out);
    no id is given to two ports (the first in sorted order keeps it)."""
    by_tag = {render.port_tag(p): p for p in portdevs}
    found: dict[str, int] = {}
    for hook, vmap in render.L3_MAP.items():
        shift = 0 if hook is Hook.FROM_VM else 16
        for key, target in listing.elements.get((INET, vmap), {}).items():
            if not isinstance(key, int) or target is None:
                continue
            tag, _, word = target.partition("/")
            port_id = key >> shift
            if (by_tag.get(tag) is not None and word == render.HOOK_WORD[hook]
                    and port_id << shift == key and 1 <= port_id <= render.MAX_PORT_ID):
                found.setdefault(by_tag[tag], port_id)
    for (family, name), comments in listing.comments.items():
        tag, _, rest = name.partition("/")
        if family != BRIDGE or tag not in by_tag or not rest.endswith("/root"):
            continue
        for comment in comments:
            stamped = render.port_id_of(comment)
            if stamped is not None and 1 <= stamped <= render.MAX_PORT_ID:
                found.setdefault(by_tag[tag], stamped)
    taken: set[int] = set()
    out: dict[str, int] = {}
    for portdev in sorted(found):
        if found[portdev] not in taken:
            taken.add(found[portdev])
            out[portdev] = found[portdev]
    return out


def port_record(listing: Listing, portdev: str, port_id: int) -> PortRecord:
    """What `portdev` owns in the kernel now, as a record `render_port` can
    replace: its chains (by name), the dispatch elements that are exactly
    right for it and `port_id`, its connlimit sets, and per chain the
    digests of its rules (no `contents`: those are only what we rendered)."""
    tag = render.port_tag(portdev)
    prefix = tag + "/"
    bridge = frozenset(n for f, n in listing.chains if f == BRIDGE and n.startswith(prefix))
    inet = frozenset(n for f, n in listing.chains if f == INET and n.startswith(prefix))
    l2 = frozenset(
        hook for hook, vmap in render.L2_MAP.items()
        if listing.elements.get((BRIDGE, vmap), {}).get(portdev)
        == render.l2_chain_name(portdev, hook, "root")
    )
    l3 = frozenset(
        hook for hook, vmap in render.L3_MAP.items()
        if listing.elements.get((INET, vmap), {}).get(port_id << (0 if hook is Hook.FROM_VM
                                                                  else 16))
        == render.l3_chain_name(portdev, hook)
    )
    sets = frozenset(name for name in listing.sets if set_owner_tag(name) == tag)
    digests = {(f, n): tuple(listing.digests.get((f, n), ()))
               for f, names in ((BRIDGE, bridge), (INET, inet)) for n in names}
    return PortRecord(portdev=portdev, port_id=port_id, bridge_chains=bridge,
                      inet_chains=inet, l2_hooks=l2, l3_hooks=l3, sets=sets,
                      digests=digests)


def set_owner_tag(name: str) -> str | None:
    """The port tag of a connlimit set (`cl<4|6>_<tag>_<key>`), else None."""
    head = render.CONNLIMIT_PREFIX
    if not (name.startswith(head + "4_") or name.startswith(head + "6_")):
        return None
    body = name[len(head) + 2:]
    tag, sep, key = body.rpartition("_")
    if not sep or len(key) != render.RULE_KEY_LEN or not tag:
        return None
    return tag
