"""What the kernel holds in our two tables, read back from their listings.

A start reconciles instead of replacing: it lists `bridge nwfilter` and
`inet nwfilter` once each, and this module (pure, no kernel access) turns
the two listings into what the applier needs to compare them with what the
compiled rulesets render to:

* `Listing` — parsed from the text of `list table` (`parse`): the
  chains, the digests their rules carry (`render.digest`, at the end of
  each rule comment), the dispatch elements of the four verdict maps, the
  sets, and the port ids the mark-stamping rules name;
* `layout_problem` — why the tables cannot be reconciled in place (an
  unknown base chain, a map of another type, another layout version): the
  caller then replaces both tables;
* `port_ids` and `port_record` — per bound port, the id it had (from the
  `l3_from`/`l3_to` elements, else from its mark-stamping rule) and a
  `PortRecord` of what it owns now, which `render.render_port` takes as
  `previous` so that only what differs is written;
* `proven_record` — for a port whose stamp (`render.stamp_comment`) shows
  that the kernel holds what its ruleset renders to, the full record
  without rendering anything.

Rules are compared by digest, never by expression: libnftables lists
expressions normalised (ether types as names, `th` as `tcp`, ...).  A rule
is one line of the listing; its digest is read from the end of the line
(`comment "... #d=<hex>"`), so whatever a foreign rule holds before it
cannot pass for a digest of ours unless it ends exactly so.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from nwfilter.ir import Hook

from . import render
from .render import BRIDGE, INET, TABLE, Capabilities, PortRecord

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
    # per chain, each rule's counter values (packets, bytes), None without one
    counts: dict[ChainKey, list[tuple[int, int] | None]] = field(default_factory=dict)
    maps: dict[ChainKey, Json] = field(default_factory=dict)
    # per map, key -> jump target (None: a verdict other than a jump)
    elements: dict[ChainKey, dict[Any, str | None]] = field(default_factory=dict)
    sets: dict[str, Json] = field(default_factory=dict)  # inet sets by name
    # learnt-address sets (both tables) and the keys of their elements
    learn_sets: dict[ChainKey, Json] = field(default_factory=dict)
    learn_elements: dict[ChainKey, set[str]] = field(default_factory=dict)
    odd_elements: bool = False  # an element key of a kind we never write
    by_tag: dict[str, list[ChainKey]] = field(default_factory=dict)  # port chains by tag
    sets_by_tag: dict[str, list[str]] = field(default_factory=dict)  # connlimit sets by tag
    # per inet chain, the sets its rules name ('@name')
    set_refs: dict[ChainKey, set[str]] = field(default_factory=dict)

    def port_chains(self) -> set[ChainKey]:
        """Every chain that is neither a base chain nor the owner chain."""
        base = render.base_chains()
        return {key for key in self.chains
                if key not in base and key[1] != OWNER_CHAIN}


def list_command(family: str) -> str:
    """The listing to read one table (text: libnftables 1.0.6 builds its
    JSON listing about five times slower, 1.2 s against 0.25 s for the
    bridge table of 1,000 ports)."""
    return f"list table {family} {TABLE}"


# Standard priority names as `nft list` prints them, per family.
_PRIORITIES = {
    BRIDGE: {"dstnat": -300, "filter": -200, "out": 100, "srcnat": 300},
    INET: {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50,
           "srcnat": 100},
}
_BASE_LINE = re.compile(
    r"type (\S+) hook (\S+)(?: device \S+)? priority ([^;]+);(?: policy (\S+);)?")
_COMMENT = re.compile(r' comment "(.*)"\Z')
_SET_REF = re.compile(r"@([A-Za-z0-9_.-]+)")
_COUNTER = re.compile(r"\bcounter packets (\d+) bytes (\d+)")
_ELEMENT = re.compile(r'\s*("[^"]*"|[^\s:,]+) : (.+?)\s*\Z')


def parse(listings: Mapping[str, str | None]) -> Listing:
    """`listings`: family -> the text answer to `list_command(family)`, or
    None when the table does not exist."""
    out = Listing()
    for family, text in listings.items():
        if text is None:
            continue
        out.tables.add(family)
        _parse_table(out, family, text.splitlines())
    return out


def _name(word: str) -> str:
    return word[1:-1] if len(word) >= 2 and word[0] == word[-1] == '"' else word


def _open_block(out: Listing, kind: str, key: ChainKey) -> Json:
    obj: Json = {}
    if kind == "chain":
        out.chains[key] = obj
        out.digests.setdefault(key, [])
        out.comments.setdefault(key, [])
        out.counts.setdefault(key, [])
        tag, slash, _rest = key[1].partition("/")
        if slash:
            out.by_tag.setdefault(tag, []).append(key)
    elif kind == "map":
        out.maps[key] = obj
        out.elements[key] = {}
    elif render.learn_set_tag(key[1]) is not None:
        out.learn_sets[key] = obj
        out.learn_elements[key] = set()
    elif key[0] == INET:
        out.sets[key[1]] = obj
        owner = set_owner_tag(key[1])
        if owner is not None:
            out.sets_by_tag.setdefault(owner, []).append(key[1])
    return obj


def _parse_table(out: Listing, family: str, lines: list[str]) -> None:
    kind = ""  # "chain", "map" or "set": the block we are in
    key: ChainKey = (family, "")
    obj: Json = {}
    pos = 0
    while pos < len(lines):
        line = lines[pos].strip()
        pos += 1
        if line == "}":
            kind = ""
            continue
        if not line or line.startswith("table "):
            continue
        head, _, rest = line.partition(" ")
        if not kind and head in ("chain", "map", "set") and rest.endswith("{"):
            kind, key = head, (family, _name(rest[:-1].strip()))
            obj = _open_block(out, kind, key)
            continue
        if kind == "chain":
            base = _BASE_LINE.match(line)
            if base is not None and not out.digests[key]:
                obj.update(type=base.group(1), hook=base.group(2),
                           prio=_priority(family, base.group(3).strip()),
                           policy=base.group(4))
                continue
            found = _COMMENT.search(line)
            comment = found.group(1) if found else ""
            out.digests[key].append(render.digest_of(comment) or UNKNOWN)
            out.comments[key].append(comment)
            counted = _COUNTER.search(line, 0, found.start() if found else len(line))
            out.counts[key].append(None if counted is None else
                                   (int(counted.group(1)), int(counted.group(2))))
            if "@" in line and family == INET:
                body = line[:found.start()] if found else line
                out.set_refs.setdefault(key, set()).update(_SET_REF.findall(body))
        elif head == "type":
            key_type, _, data = rest.partition(" : ")
            obj["type"] = key_type.strip()
            if data:
                obj["map"] = data.strip()
        elif head == "flags":
            obj["flags"] = [f.strip() for f in rest.split(",")]
        elif line.startswith("elements = {"):
            body, pos = _block(lines, pos, line[len("elements = {"):])
            if kind == "map":
                out.odd_elements |= _map_elements(body, out.elements[key])
            elif key in out.learn_elements:
                out.learn_elements[key] = _set_keys(body)


def _block(lines: list[str], pos: int, first: str) -> tuple[str, int]:
    """The text of an `elements = { ... }` block without its braces; it
    may span lines, and quoted keys may hold braces."""
    parts: list[str] = []
    quoted = False
    text = first
    while True:
        if "}" not in text and '"' not in text:
            parts.append(text)  # the common line: nothing to look at
        else:
            for index, char in enumerate(text):
                if char == '"':
                    quoted = not quoted
                elif char == "}" and not quoted:
                    parts.append(text[:index])
                    return " ".join(parts), pos
            parts.append(text)
        if pos >= len(lines):
            return " ".join(parts), pos
        text = lines[pos].strip()
        pos += 1


def _split_elements(body: str) -> list[str]:
    items: list[str] = []
    current: list[str] = []
    quoted = False
    for char in body:
        if char == '"':
            quoted = not quoted
        if char == "," and not quoted:
            items.append("".join(current))
            current = []
        else:
            current.append(char)
    if "".join(current).strip():
        items.append("".join(current))
    return items


def _set_keys(body: str) -> set[str]:
    """The keys of a set's elements (`10.0.0.5 timeout 1h expires 59m`,
    `"vnet0" timeout ...`): the first word of each, unquoted."""
    keys = set()
    for item in _split_elements(body):
        words = item.split()
        if words:
            keys.add(_name(words[0]))
    return keys


def _map_elements(body: str, found: dict[Any, str | None]) -> bool:
    """Fill `found` (key -> jump target, None for another verdict) from a
    map's elements; True when one of them is of a kind we never write."""
    odd = False
    for item in _split_elements(body):
        match = _ELEMENT.match(item)
        if match is None:
            odd = True
            continue
        raw, data = match.group(1), match.group(2)
        key: Any
        if raw.startswith('"'):
            key = raw[1:-1]
        else:
            try:
                key = int(raw, 0)
            except ValueError:
                odd = True  # a catch-all, a range, an unquoted name: never ours
                continue
        verdict, _, target = data.partition(" ")
        found[key] = _name(target.strip()) if verdict == "jump" and target else None
    return odd


def _priority(family: str, text: str) -> int | str:
    words = text.split()
    try:
        value = int(words[0])
    except ValueError:
        named = _PRIORITIES.get(family, {}).get(words[0])
        if named is None:
            return text
        value = named
    if len(words) == 3 and words[1] in ("+", "-") and words[2].isdigit():
        value += int(words[2]) * (1 if words[1] == "+" else -1)
    elif len(words) != 1:
        return text
    return value


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
    for (family, name), spec in sorted(listing.learn_sets.items()):
        kind = name[len(render.LEARN_PREFIX)]
        if spec.get("type") != render.LEARN_SET_TYPES[kind] \
                or "timeout" not in spec.get("flags", ()) or (kind == "t" and family != BRIDGE):
            return f"set {family} {name} is not of this layout's type"
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
    digests of its rules and their counter values (no `contents`: those
    are only what we rendered)."""
    tag = render.port_tag(portdev)
    mine = listing.by_tag.get(tag, ())
    bridge = frozenset(n for f, n in mine if f == BRIDGE)
    inet = frozenset(n for f, n in mine if f == INET)
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
    sets = frozenset(listing.sets_by_tag.get(tag, ()))
    learn_sets = {key: frozenset(listing.learn_elements.get(key, ()))
                  for key in listing.learn_sets if render.learn_set_tag(key[1]) == tag}
    digests = {(f, n): tuple(listing.digests.get((f, n), ()))
               for f, names in ((BRIDGE, bridge), (INET, inet)) for n in names}
    counts = {key: tuple(listing.counts.get(key, ())) for key in digests}
    return PortRecord(portdev=portdev, port_id=port_id, bridge_chains=bridge,
                      inet_chains=inet, l2_hooks=l2, l3_hooks=l3, sets=sets,
                      learn_sets=learn_sets, digests=digests, counts=counts)


def proven_record(
    listing: Listing, record: PortRecord, digest: str, caps: Capabilities
) -> PortRecord | None:
    """`record` (from `port_record`) completed as `render_port` would
    complete it, when the port's stamp proves that rendering the ruleset
    whose `ruleset_digest` is `digest` would write nothing; else None, and
    the port is rendered.

    The proof: the stamp rule is ours and intact (its digest is that of its
    comment); its second half is the digest of the port's chains as listed
    now (names and rule digests in order: a rule or chain deleted, added,
    reordered or distrusted since changes it); its first half is the stamp
    of `digest` with this port id and this renderer, so a render now gives
    the digests a render gave then.  The dispatch elements exactly right
    for the port must be those of its root and layer-3 chains, its
    connlimit sets those its rules name, and every set they name must
    exist."""
    key = (BRIDGE, render.stamp_chain_name(record.portdev))
    comments = listing.comments.get(key)
    if comments is None or len(comments) != 1:
        return None
    stamp = render.stamp_of(comments[0])
    if stamp is None or record.digests.get(key) != (render.digest_of(comments[0]),):
        return None
    if stamp[1] != render.chains_stamp(record.digests):
        return None
    portdev = record.portdev
    if stamp[0] != render.digest_stamp(digest, bool(record.inet_chains), record.port_id, caps):
        return None
    l2 = frozenset(h for h in Hook
                   if render.l2_chain_name(portdev, h, "root") in record.bridge_chains)
    l3 = frozenset(h for h in Hook if render.l3_chain_name(portdev, h) in record.inet_chains)
    if record.l2_hooks != l2 or record.l3_hooks != l3 or len(l3) != len(record.inet_chains):
        return None
    chain_sets = {name: frozenset(listing.set_refs.get((INET, name), ()))
                  for name in record.inet_chains}
    named = {name for names in chain_sets.values() for name in names}
    if record.sets != {n for n in named if n.startswith(render.CONNLIMIT_PREFIX)} \
            or not named <= listing.sets.keys():
        return None
    return dataclasses.replace(record, chain_sets=chain_sets)


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
