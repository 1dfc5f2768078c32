"""Pure rendering of IR rulesets into libnftables JSON commands.

This module owns the nft layout of nwfilter and the mapping of every IR
field and verdict onto nft expressions.  It never touches the kernel: it
turns a `Ruleset` (plus the numeric id the backend gave the port) into a
list of JSON commands and a `PortRecord` describing what those commands
create, so the applier can later replace or delete exactly that.

Layout (see docs/backends.md):

* ``table bridge nwfilter`` holds layer 2.  Base chains dispatch through
  verdict maps keyed by interface name, so the per-packet cost does not grow
  with the number of ports:

  - ``pre``  hook prerouting, priority -300 (ebtables' nat PREROUTING, where
    libvirt hooks direction 'out'): ``iifname vmap @from_vm``;
  - ``fwd``  hook forward, priority -200, and ``out`` hook output, priority
    -200: ``oifname vmap @to_vm``.  Between them they see every frame
    leaving through a port (bridged or sent by the host), as libvirt's
    POSTROUTING chain does, but *before* br_netfilter (priority 0) runs the
    IPv4/IPv6 hooks, so layer 2 is decided first, as in the IR.

  Each port owns a chain tree per hook, ``<port>/from/<chain>`` and
  ``<port>/to/<chain>``, mirroring the IR chains.

* ``table inet nwfilter`` holds layer 3.  The bridge family of this kernel
  has no connection tracking (``ct`` in a bridge table fails with EPROTO and
  nf_conntrack_bridge is not built), so layer-3 rules run in the inet family,
  reached through br_netfilter (net.bridge.bridge-nf-call-ip{,6}tables=1 in
  the namespace).  There the input device is the bridge, not the port, so
  the port's root chain stamps the packet mark: the low 16 bits carry the id
  of the port the frame came from, the high 16 bits the id of the port it
  leaves by.  ``pre`` (prerouting, priority 0: after conntrack at -200)
  dispatches ``meta mark & 0xffff vmap @l3_from``; ``fwd`` (forward,
  priority 0) dispatches ``meta mark & 0xffff0000 vmap @l3_to``.  Each port
  owns one flat chain per hook, ``<port>/from`` and ``<port>/to``.

Names: a port's tag is its interface name when that is a plain identifier,
otherwise ``_`` followed by the hex of its bytes; interface names cannot hold
``/``, so ``<tag>/<hook>/<chain>`` is injective.  Names are capped at
`MAX_NAME` characters.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import ipaddress
import math
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from nwfilter.conf.values import check_port_name
from nwfilter.errors import UnsupportedError
from nwfilter.ir import (
    AddrRange,
    Chain,
    CtState,
    Family,
    Field,
    Hook,
    IntRange,
    IPSetMatch,
    Learning,
    LearntSet,
    MacMatch,
    Match,
    Rule,
    Ruleset,
    TcpFlag,
    TcpFlags,
    Verdict,
)
from nwfilter.ir_digest import rule_text, ruleset_digest

Json = dict[str, Any]

TABLE = "nwfilter"
BRIDGE = "bridge"
INET = "inet"
MAX_NAME = 128
MAX_PORT_ID = 0xFFFF
FROM_MASK = 0x0000FFFF
TO_MASK = 0xFFFF0000
MAX_COMMENT_BYTES = 120
# Every rule's comment ends with the digest of what it renders, so that
# what the kernel holds can be compared with what we would render without
# parsing libnftables' normalised listing back (see `digest`).
DIGEST_TAG = " #d="
DIGEST_LEN = 10
RULE_KEY_LEN = 10  # hex digits of `rule_key`, the end of a connlimit set's name
# Name prefixes of our inet sets: per-port connlimit counters, and the sets
# standing for libvirt ipsets, which the operator fills.
CONNLIMIT_PREFIX = "cl"
IPSET_PREFIX = "ipset"
# Per learning port, in either table: its learnt addresses (`learn4_<tag>`,
# `learn6_<tag>`) and, in the bridge table, the flag that it has an IPv4
# address (`learnt_<tag>`, holding the port's name); every element carries
# its lease as timeout, so the kernel ends it by itself.
LEARN_PREFIX = "learn"
LEARNING_CHAIN = "learning"  # no libvirt chain name: those start with a protocol

# Base chains: name, hook, priority, dispatch key, verdict map.
# Their names are no nft keywords ('fwd' is one), so that what `nft list
# ruleset` prints of our tables loads back with `nft -f`.
BRIDGE_BASE = (
    ("l2_pre", "prerouting", -300, "iifname", "from_vm"),
    ("l2_fwd", "forward", -200, "oifname", "to_vm"),
    ("l2_out", "output", -200, "oifname", "to_vm"),
)
INET_BASE = (
    ("l3_pre", "prerouting", 0, FROM_MASK, "l3_from"),
    ("l3_fwd", "forward", 0, TO_MASK, "l3_to"),
)
L2_MAP = {Hook.FROM_VM: "from_vm", Hook.TO_VM: "to_vm"}
L3_MAP = {Hook.FROM_VM: "l3_from", Hook.TO_VM: "l3_to"}
HOOK_WORD = {Hook.FROM_VM: "from", Hook.TO_VM: "to"}

_PLAIN = re.compile(r"[A-Za-z][A-Za-z0-9_.-]*\Z")

ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_RARP = 0x8035
ETH_P_IPV6 = 0x86DD
ETH_P_8021Q = 0x8100
STP_DST = "01:80:c2:00:00:00"
# libvirt's port attributes exist on tcp, udp, sctp and on ip/ipv6 with
# protocol tcp, udp, dccp or sctp only (its udplite element has none).
PORT_PROTOS = frozenset({6, 17, 33, 132})  # tcp, udp, dccp, sctp
TCP_BITS = {
    TcpFlag.FIN: 0x01,
    TcpFlag.SYN: 0x02,
    TcpFlag.RST: 0x04,
    TcpFlag.PSH: 0x08,
    TcpFlag.ACK: 0x10,
    TcpFlag.URG: 0x20,
}

# ARP header fields as (bit offset, bit length) from the network header; raw
# payloads because nft's typed 'arp' payloads pull in an 'ether type arp'
# dependency that would contradict RARP (0x8035) rules.
ARP_RAW = {
    Field.ARP_HTYPE: (0, 16),
    Field.ARP_PTYPE: (16, 16),
    Field.ARP_OP: (48, 16),
    Field.ARP_SHA: (64, 48),
    Field.ARP_SPA: (112, 32),
    Field.ARP_THA: (144, 48),
    Field.ARP_TPA: (192, 32),
}
# ebtables' arp match only compares MACs when hlen is 6 and htype Ethernet,
# and IP addresses when ptype is IPv4 and plen 4; these guards reproduce it.
ARP_MAC_GUARD = ((0, 16, 1), (32, 8, 6))
ARP_IP_GUARD = ((16, 16, ETH_P_IP), (40, 8, 4))

# STP: LLC header (DSAP 0x42, SSAP 0x42, UI) then the BPDU, offsets in bits
# from the network header as in the kernel's ebt_stp.
STP_LLC = (0, 24, 0x424203)
STP_RAW = {
    Field.STP_TYPE: (48, 8),
    Field.STP_FLAGS: (56, 8),
    Field.STP_ROOT_PRIO: (64, 16),
    Field.STP_ROOT_ADDR: (80, 48),
    Field.STP_ROOT_COST: (128, 32),
    Field.STP_SENDER_PRIO: (160, 16),
    Field.STP_SENDER_ADDR: (176, 48),
    Field.STP_PORT: (224, 16),
    Field.STP_MSG_AGE: (240, 16),
    Field.STP_MAX_AGE: (256, 16),
    Field.STP_HELLO_TIME: (272, 16),
    Field.STP_FORWARD_DELAY: (288, 16),
}
STP_FIELDS = frozenset(STP_RAW)
STP_CONFIG_FIELDS = STP_FIELDS - {Field.STP_TYPE}

L2_ONLY = frozenset(
    {Field.ETH_SRC, Field.ETH_DST, Field.ETH_TYPE, Field.VLAN_ID, Field.VLAN_ENCAP}
    | STP_FIELDS
    | frozenset(ARP_RAW)
    | {Field.ARP_GRATUITOUS}
)
L3_ONLY = frozenset({Field.CT_STATE, Field.CONNLIMIT_ABOVE, Field.IPSET})
# Ethernet fields a layer-3 rule may use (libvirt's iptables '-m mac
# --mac-source'): frames reach the inet chains through br_netfilter with
# their Ethernet header, which 'ether saddr' reads (nft adds 'meta iiftype
# ether', true for the bridge).
L3_ETHER = frozenset({Field.ETH_SRC})
# Fields of the IP header and above: in layer 2 they need ethertype IPv4/IPv6.
IP_FIELDS = frozenset({
    Field.IP_SRC, Field.IP_DST, Field.IP_SRC_RANGE, Field.IP_DST_RANGE, Field.IP_PROTO,
    Field.IP_DSCP, Field.L4_SPORT, Field.L4_DPORT, Field.ICMP_TYPE, Field.ICMP_CODE,
    Field.TCP_FLAGS,
})


@dataclass(frozen=True)
class Capabilities:
    """What the kernel in the target namespace can do (found by `probe`)."""

    bridge_reject: bool = False


@dataclass(frozen=True)
class PortRecord:
    """What the kernel holds for one port: enough to replace or delete it."""

    portdev: str
    port_id: int
    bridge_chains: frozenset[str] = frozenset()
    inet_chains: frozenset[str] = frozenset()
    l2_hooks: frozenset[Hook] = frozenset()  # hooks with a vmap element in the bridge table
    l3_hooks: frozenset[Hook] = frozenset()  # hooks with a vmap element in the inet table
    sets: frozenset[str] = frozenset()  # inet sets the port owns (connlimit counters)
    # Per inet chain, every set its rules name (connlimit and ipset): a
    # chain left in place still needs them after a replacement.
    chain_sets: dict[str, frozenset[str]] = field(
        default_factory=dict, compare=False, hash=False
    )
    # The rendered rules of every chain, so a replacement rewrites only the
    # chains whose rules changed: the cost of a change grows with the change.
    contents: dict[tuple[str, str], list[tuple[list[Json], str | None]]] = field(
        default_factory=dict, compare=False, hash=False
    )
    # The learnt-address sets ((family, name)) and the keys of their
    # elements (addresses as text, or the port name), as the kernel holds them.
    learn_sets: dict[tuple[str, str], frozenset[str]] = field(
        default_factory=dict, compare=False, hash=False
    )
    # Per chain, the digests of its rules in order (`digest`): what decides
    # whether a chain is rewritten.  A record read back from the kernel has
    # these (from the rule comments) and no `contents`.
    digests: dict[tuple[str, str], tuple[str, ...]] = field(
        default_factory=dict, compare=False, hash=False
    )
    # Per chain, the counter values (packets, bytes) of its rules in order,
    # for a record read back from the kernel: a chain rewritten gives each
    # rule whose digest it held its old values, so a rule that did not
    # change keeps counting from where it was.
    counts: dict[tuple[str, str], tuple[tuple[int, int] | None, ...]] = field(
        default_factory=dict, compare=False, hash=False
    )


@dataclass
class Batch:
    """JSON commands plus, per command, the rule origin it renders (for errors)."""

    commands: list[Json] = field(default_factory=list)
    origins: list[tuple[str, str] | None] = field(default_factory=list)  # (portdev, origin)

    def add(self, command: Json, origin: tuple[str, str] | None = None) -> None:
        self.commands.append(command)
        self.origins.append(origin)

    def extend(self, other: Batch) -> None:
        self.commands.extend(other.commands)
        self.origins.extend(other.origins)

    def document(self) -> Json:
        return {"nftables": list(self.commands)}


# -- names -----------------------------------------------------------------


def _tag(text: str) -> str:
    if _PLAIN.match(text):
        return text
    return "_" + text.encode().hex()


def port_tag(portdev: str) -> str:
    """The prefix of every chain name (and connlimit set name) of a port."""
    return _tag(portdev)


def l2_chain_name(portdev: str, hook: Hook, chain: str) -> str:
    name = f"{_tag(portdev)}/{HOOK_WORD[hook]}/{_tag(chain)}"
    if len(name) > MAX_NAME:
        raise UnsupportedError(f"port '{portdev}': chain name '{chain}' is too long")
    return name


def l3_chain_name(portdev: str, hook: Hook) -> str:
    return f"{_tag(portdev)}/{HOOK_WORD[hook]}"


def stamp_chain_name(portdev: str) -> str:
    """The bridge chain holding the port's stamp; one '/' keeps it apart
    from the port's layer-2 chains (`<tag>/<hook>/<chain>`)."""
    return f"{_tag(portdev)}/{STAMP_CHAIN}"


def ipset_name(name: str, family: Family) -> str:
    """The nft set standing for libvirt ipset `name`, per address family."""
    return f"{IPSET_PREFIX}{'4' if family is Family.IPV4 else '6'}_{_tag(name)}"


# -- base objects ----------------------------------------------------------


#: What the tables' base objects are: (family, name) of every verdict map
#: and base chain.  Anything else with a hook in our tables is not ours.
BASE_MAPS = (
    (BRIDGE, "from_vm", "ifname"), (BRIDGE, "to_vm", "ifname"),
    (INET, "l3_from", "mark"), (INET, "l3_to", "mark"),
)
# The layout of our tables (names, hooks, maps, how rules are commented).
# Base chain rules carry it in their comment; a start that finds another
# value (or none) replaces both tables instead of reconciling them.
LAYOUT_VERSION = 1
LAYOUT_TAG = "nwfilter layout "
BASE_COMMENT = f"{LAYOUT_TAG}{LAYOUT_VERSION}"
# What a port's rules render to: bump by hand with any change of how a
# ruleset renders (expressions, comments, names).  A port stamp (see
# `stamp_comment`) records it, together with a digest of this module's source
# and of the base layout, so a start after an upgrade renders every port
# again instead of trusting stamps of another renderer.
RENDER_VERSION = 2  # 2: every rule of a port carries a counter
# Each port owns one chain nothing jumps to, holding one rule whose comment
# is the port's stamp: no packet ever walks it.
STAMP_CHAIN = "stamp"
STAMP_TAG = "nwfilter stamp "
STAMP_LEN = 16  # hex digits of each half of a stamp
_STAMP_EXPRS: list[Json] = [{"continue": None}]
# Every rule of a port's chains carries a counter (the stamp rule, which no
# packet walks, does not); `nwfilter stats` reads them.  Digests cover the
# statement, never its values: a listed `counter packets 5 bytes 300` is the
# rule rendered with `counter`.
COUNTER: Json = {"counter": None}
# The first rule of each root chain: a counter of every frame the port's
# chains see in that direction, so that accepted = entered - dropped holds
# whatever way a frame leaves them (accept, return, the end of a chain).
ENTRY_TEXT = "nwfilter: frames entering the port's chains"
_ENTRY_EXPRS: list[Json] = [COUNTER]


def base_chains() -> dict[tuple[str, str], tuple[str, int]]:
    """(family, name) -> (hook, priority) of every base chain."""
    out = {(BRIDGE, name): (hook, prio) for name, hook, prio, _k, _m in BRIDGE_BASE}
    out.update({(INET, name): (hook, prio) for name, hook, prio, _k, _m in INET_BASE})
    return out


def render_base(only: frozenset[tuple[str, str]] | None = None) -> Batch:
    """Tables, base chains and verdict maps; 'add' is idempotent in nft.
    With `only`, just those maps and base chains ((family, name)), without
    the tables: the repair of a base object that drifted."""
    batch = Batch()
    if only is None:
        batch.add({"add": {"table": {"family": BRIDGE, "name": TABLE}}})
        batch.add({"add": {"table": {"family": INET, "name": TABLE}}})
    for family, vmap, key_type in BASE_MAPS:
        if only is None or (family, vmap) in only:
            batch.add({"add": {"map": {"family": family, "table": TABLE, "name": vmap,
                                       "type": key_type, "map": "verdict"}}})
    for name, hook, prio, key, vmap in BRIDGE_BASE:
        if only is not None and (BRIDGE, name) not in only:
            continue
        keep = TO_MASK if key == "iifname" else FROM_MASK
        batch.add({"add": {"chain": {"family": BRIDGE, "table": TABLE, "name": name,
                                     "type": "filter", "hook": hook, "prio": prio,
                                     "policy": "accept"}}})
        batch.add({"flush": {"chain": {"family": BRIDGE, "table": TABLE, "name": name}}})
        # Clear our half of the mark first so a stale value can never select
        # another port's layer-3 chain.
        batch.add(_rule(BRIDGE, name, [_mark_set(keep, 0)], BASE_COMMENT))
        batch.add(_rule(BRIDGE, name, [
            {"vmap": {"key": {"meta": {"key": key}}, "data": f"@{vmap}"}}], BASE_COMMENT))
    for name, hook, prio, mask, vmap in INET_BASE:
        if only is not None and (INET, name) not in only:
            continue
        batch.add({"add": {"chain": {"family": INET, "table": TABLE, "name": name,
                                     "type": "filter", "hook": hook, "prio": prio,
                                     "policy": "accept"}}})
        batch.add({"flush": {"chain": {"family": INET, "table": TABLE, "name": name}}})
        batch.add(_rule(INET, name, [
            {"vmap": {"key": {"&": [{"meta": {"key": "mark"}}, mask]}, "data": f"@{vmap}"}}],
            BASE_COMMENT))
    return batch


def base_digests() -> dict[tuple[str, str], tuple[str, ...]]:
    """(family, name) -> the digests of each base chain's rules, in order."""
    out: dict[tuple[str, str], list[str]] = {}
    for command in render_base().commands:
        rule = command.get("add", {}).get("rule")
        if rule is not None:
            out.setdefault((rule["family"], rule["chain"]), []).append(
                digest_of(rule["comment"]) or "")
    return {key: tuple(value) for key, value in out.items()}


# -- one port --------------------------------------------------------------


def render_port(
    ruleset: Ruleset,
    port_id: int,
    previous: PortRecord | None,
    caps: Capabilities,
    previous_ruleset: Ruleset | None = None,
    now: float | None = None,
) -> tuple[Batch, PortRecord]:
    """Commands that make the kernel hold `ruleset` for its port, replacing
    `previous` in place (flush and refill, vmap elements swapped in the same
    transaction), and the record of what exists afterwards.

    With `previous_ruleset` (what `previous` was rendered from), chains equal
    in the IR are neither rendered nor rewritten: a filter edit touching one
    chain of every port costs one chain per port.  A learning port's
    address sets change by their elements alone (`now`, the wall-clock
    time, turns leases into timeouts)."""
    when = time.time() if now is None else now
    if previous is not None and _only_learnt_differ(ruleset, previous_ruleset, previous,
                                                    port_id):
        learn_sets, batch = render_learnt(ruleset, previous_ruleset, previous.learn_sets, when)
        return batch, dataclasses.replace(previous, learn_sets=learn_sets)
    check_ruleset(ruleset, caps, rules=False)
    if previous is None:
        previous_ruleset = None
    if not 1 <= port_id <= MAX_PORT_ID:
        raise UnsupportedError(f"port id {port_id} out of range")
    portdev = ruleset.port.portdev
    batch = Batch()
    old_bridge = previous.bridge_chains if previous else frozenset()
    old_inet = previous.inet_chains if previous else frozenset()
    old_l2 = previous.l2_hooks if previous else frozenset()
    old_l3 = previous.l3_hooks if previous else frozenset()
    old_contents = previous.contents if previous else {}
    old_digests = previous.digests if previous else {}
    old_counts = previous.counts if previous else {}
    mark_text = port_id_comment(port_id)

    bridge_chains: dict[str, list[tuple[list[Json], str | None]]] = {}
    inet_chains: dict[str, list[tuple[list[Json], str | None]]] = {}
    l2_hooks: set[Hook] = set()
    l3_hooks: set[Hook] = set()
    sets: dict[tuple[str, str], Json] = {}  # sets to add for the chains rendered now
    chain_sets: dict[str, frozenset[str]] = {}
    old_sets = previous.sets if previous else frozenset()
    old_chain_sets = previous.chain_sets if previous else {}

    learning = ruleset.learn.learning if ruleset.learn is not None else {}
    prev_learning = (previous_ruleset.learn.learning if previous_ruleset is not None
                     and previous_ruleset.learn is not None else None)
    for hook in (Hook.FROM_VM, Hook.TO_VM):
        chains = ruleset.chains(hook)
        l3 = ruleset.l3_rules(hook)
        gate = learning.get(hook)
        if not chains and not l3 and gate is None:
            continue
        l2_hooks.add(hook)
        by_name = {c.name: c for c in chains}
        root = by_name.get("root", Chain("root", 0, ()))
        order = [root, *(c for c in chains if c.name != "root")]
        prev_chains: dict[str, Chain] = {}
        prev_l3: tuple[Rule, ...] = ()
        if previous_ruleset is not None:
            prev_chains = {c.name: c for c in previous_ruleset.chains(hook)}
            prev_l3 = previous_ruleset.l3_rules(hook)
            if "root" not in prev_chains and prev_l3:
                prev_chains["root"] = Chain("root", 0, ())
        for chain in order:
            cname = l2_chain_name(portdev, hook, chain.name)
            kept = old_contents.get((BRIDGE, cname))
            same = kept is not None and prev_chains.get(chain.name) == chain
            if chain is root:
                same = (same and bool(prev_l3) == bool(l3)
                        and (prev_learning or {}).get(hook) == gate)
            if same:
                assert kept is not None
                bridge_chains[cname] = kept
                continue
            rules: list[tuple[list[Json], str | None]] = []
            if chain is root:
                rules.append((_ENTRY_EXPRS, ENTRY_TEXT))
            if chain is root and gate is not None:
                rules.append(learning_gate(portdev, hook))
            if chain is root and l3:
                shift = 0 if hook is Hook.FROM_VM else 16
                keep = TO_MASK if hook is Hook.FROM_VM else FROM_MASK
                rules.append(([_mark_set(keep, port_id << shift), COUNTER], None))
            for rule in chain.rules:
                for exprs in _l2_rule(rule, portdev, hook, caps):
                    rules.append((_counted(exprs), _origin(rule)))
            bridge_chains[l2_chain_name(portdev, hook, chain.name)] = rules
        if gate is not None:
            cname = l2_chain_name(portdev, hook, LEARNING_CHAIN)
            kept = old_contents.get((BRIDGE, cname))
            if kept is not None and prev_learning is not None and prev_learning.get(hook) == gate:
                bridge_chains[cname] = kept
            else:
                bridge_chains[cname] = [(_counted(exprs), _origin(rule)) for rule in gate
                                        for exprs in _l2_rule(rule, portdev, hook, caps)]
        if l3:
            l3_hooks.add(hook)
            cname = l3_chain_name(portdev, hook)
            kept = old_contents.get((INET, cname))
            if kept is not None and previous_ruleset is not None and prev_l3 == l3:
                inet_chains[cname] = kept
                chain_sets[cname] = old_chain_sets.get(cname, frozenset())
                continue
            rules = []
            used: dict[tuple[str, str], Json] = {}
            for rule in l3:
                for exprs in _l3_rule(rule, portdev, hook, used):
                    rules.append((_counted(exprs), _origin(rule)))
            inet_chains[cname] = rules
            chain_sets[cname] = frozenset(name for (_, name) in used)
            sets.update(used)

    digests: dict[tuple[str, str], tuple[str, ...]] = {}
    for fam, new in ((BRIDGE, bridge_chains), (INET, inet_chains)):
        for name, rules in new.items():
            before = old_contents.get((fam, name))
            if before is rules and (fam, name) in old_digests:
                digests[(fam, name)] = old_digests[(fam, name)]
            else:
                digests[(fam, name)] = tuple(
                    digest(exprs, origin if origin is not None else mark_text)
                    for exprs, origin in rules)
    stamp = stamp_comment(ruleset, port_id, caps, digests)
    stamp_name = stamp_chain_name(portdev)
    bridge_chains[stamp_name] = [(_STAMP_EXPRS, stamp)]
    digests[(BRIDGE, stamp_name)] = (digest(_STAMP_EXPRS, stamp),)
    unchanged = {key for key, value in digests.items() if old_digests.get(key) == value}
    # Sets the rewritten chains use ('add' keeps an existing ipset set and its
    # elements).  A connlimit set the port has is never added again: a set
    # statement made it 'dynamic' in the kernel, a flag libnftables 1.0.6's
    # JSON cannot say, so 'add' would differ from it and fail with EEXIST.
    needed = {name for cname in inet_chains if (INET, cname) not in unchanged
              for name in chain_sets.get(cname, ())} - old_sets
    for (family, name), spec in sorted(sets.items()):
        if name in needed:
            batch.add({"add": {"set": {"family": family, "table": TABLE, "name": name,
                                       **spec}}})
    old_learn = previous.learn_sets if previous else {}
    learn_sets, learn_batch = render_learnt(ruleset, previous_ruleset, old_learn, when)
    batch.extend(learn_batch)
    # 1. chains: create new ones, flush kept ones whose rules changed (drops
    # their jumps too); a chain whose rules are the same is left alone.
    for fam, new, old in ((BRIDGE, bridge_chains, old_bridge), (INET, inet_chains, old_inet)):
        for name in sorted(new):
            if (fam, name) in unchanged:
                continue
            verb = "flush" if name in old else "add"
            batch.add({verb: {"chain": {"family": fam, "table": TABLE, "name": name}}})
        for name in sorted(old - set(new)):
            batch.add({"flush": {"chain": {"family": fam, "table": TABLE, "name": name}}})
    # 2. vmap elements that go away, before their chains are deleted.
    for hook in sorted(old_l2 - l2_hooks, key=lambda h: h.value):
        batch.add(_element("delete", BRIDGE, L2_MAP[hook], portdev, None))
    for hook in sorted(old_l3 - l3_hooks, key=lambda h: h.value):
        batch.add(_element("delete", INET, L3_MAP[hook], port_id << _shift(hook), None))
    # 3. rules.
    for fam, table_chains in ((BRIDGE, bridge_chains), (INET, inet_chains)):
        for name, chain_rules in table_chains.items():
            if (fam, name) in unchanged:
                continue
            carried = _carried(old_digests.get((fam, name), ()), old_counts.get((fam, name), ()))
            for (exprs, origin), sig in zip(chain_rules, digests[(fam, name)], strict=True):
                text = origin if origin is not None else mark_text
                values = carried.get(sig)
                if values:
                    exprs = _with_counts(exprs, values.pop(0))
                batch.add(_rule(fam, name, exprs, text, sig),
                          (portdev, origin) if origin is not None else None)
    # 4. chains no longer used.
    for fam, new, old in ((BRIDGE, bridge_chains, old_bridge), (INET, inet_chains, old_inet)):
        for name in sorted(old - set(new)):
            batch.add({"delete": {"chain": {"family": fam, "table": TABLE, "name": name}}})
    own_sets = frozenset(
        name for names in chain_sets.values() for name in names
        if name.startswith(CONNLIMIT_PREFIX)
    )
    for name in sorted(old_sets - own_sets):
        batch.add({"delete": {"set": {"family": INET, "table": TABLE, "name": name}}})
    for family, name in sorted(set(old_learn) - set(learn_sets)):
        batch.add({"delete": {"set": {"family": family, "table": TABLE, "name": name}}})
    # 5. new dispatch elements last: the port's chains are complete by then.
    for hook in sorted(l2_hooks - old_l2, key=lambda h: h.value):
        batch.add(_element("add", BRIDGE, L2_MAP[hook], portdev,
                           l2_chain_name(portdev, hook, "root")))
    for hook in sorted(l3_hooks - old_l3, key=lambda h: h.value):
        batch.add(_element("add", INET, L3_MAP[hook], port_id << _shift(hook),
                           l3_chain_name(portdev, hook)))

    record = PortRecord(
        portdev=portdev,
        port_id=port_id,
        bridge_chains=frozenset(bridge_chains),
        inet_chains=frozenset(inet_chains),
        l2_hooks=frozenset(l2_hooks),
        l3_hooks=frozenset(l3_hooks),
        sets=own_sets,
        chain_sets=chain_sets,
        learn_sets=learn_sets,
        contents={
            **{(BRIDGE, name): rules for name, rules in bridge_chains.items()},
            **{(INET, name): rules for name, rules in inet_chains.items()},
        },
        digests=digests,
    )
    return batch, record


def _only_learnt_differ(
    ruleset: Ruleset, before: Ruleset | None, previous: PortRecord, port_id: int
) -> bool:
    """Whether `ruleset` is `before` with other learnt addresses alone (the
    learning listener's change): then only set elements are written."""
    return (
        before is not None
        and ruleset.learn is not None
        and before.learn is not None
        and bool(previous.contents)
        and previous.port_id == port_id
        and ruleset.port == before.port
        and ruleset.l2 == before.l2
        and ruleset.l3 == before.l3
        and ruleset.learn.learning == before.learn.learning
    )


def render_remove(record: PortRecord) -> Batch:
    """Commands deleting everything `record` says the port owns."""
    batch = Batch()
    for hook in sorted(record.l2_hooks, key=lambda h: h.value):
        batch.add(_element("delete", BRIDGE, L2_MAP[hook], record.portdev, None))
    for hook in sorted(record.l3_hooks, key=lambda h: h.value):
        batch.add(_element("delete", INET, L3_MAP[hook], record.port_id << _shift(hook), None))
    for fam, names in ((BRIDGE, record.bridge_chains), (INET, record.inet_chains)):
        for name in sorted(names):
            batch.add({"flush": {"chain": {"family": fam, "table": TABLE, "name": name}}})
        for name in sorted(names):
            batch.add({"delete": {"chain": {"family": fam, "table": TABLE, "name": name}}})
    for name in sorted(record.sets):
        batch.add({"delete": {"set": {"family": INET, "table": TABLE, "name": name}}})
    for family, name in sorted(record.learn_sets):
        batch.add({"delete": {"set": {"family": family, "table": TABLE, "name": name}}})
    return batch


# -- learnt address sets ---------------------------------------------------


def learn_set_name(portdev: str, version: int | None) -> str:
    """`learn4_<tag>`/`learn6_<tag>` (addresses), `learnt_<tag>` (None: the flag)."""
    kind = "t" if version is None else str(version)
    return f"{LEARN_PREFIX}{kind}_{_tag(portdev)}"


def learn_set_tag(name: str) -> str | None:
    """The port tag of a learnt-address set's name, else None."""
    for kind in ("4", "6", "t"):
        head = f"{LEARN_PREFIX}{kind}_"
        if name.startswith(head) and len(name) > len(head):
            return name[len(head):]
    return None


LEARN_SET_TYPES = {"4": "ipv4_addr", "6": "ipv6_addr", "t": "ifname"}


def learning_gate(portdev: str, hook: Hook) -> tuple[list[Json], str]:
    """The first rule of a learning port's root chain: until the port has a
    learnt IPv4 address (its flag element), its learning rules decide."""
    key = "iifname" if hook is Hook.FROM_VM else "oifname"
    exprs = [_cmp({"meta": {"key": key}}, f"@{learn_set_name(portdev, None)}", True),
             COUNTER, {"goto": {"target": l2_chain_name(portdev, hook, LEARNING_CHAIN)}}]
    return exprs, "nwfilter: the learning rules until an address is learnt"


def _timeout(expires: float | None, now: float) -> int | None:
    return None if expires is None else max(1, math.ceil(expires - now))


def _learn_elements(learn: Learning, portdev: str, now: float
                    ) -> dict[str, list[tuple[str, int | None]]]:
    """Per set kind ('4', '6', 't'), its elements as (key, timeout)."""
    out: dict[str, list[tuple[str, int | None]]] = {"4": [], "6": [], "t": []}
    for addr in learn.addresses:
        if addr.expires is not None and addr.expires <= now:
            continue  # its lease ended: the listener withdraws it
        out[str(addr.address.version)].append((str(addr.address), _timeout(addr.expires, now)))
    if learn.learning and out["4"]:
        # The flag lasts as long as the longest IPv4 lease.
        leases = [t for _k, t in out["4"]]
        out["t"].append((portdev, None if None in leases else max(
            t for t in leases if t is not None)))
    return out


def _elem(key: str, timeout: int | None) -> Any:
    return key if timeout is None else {"elem": {"val": key, "timeout": timeout}}


def render_learnt(
    ruleset: Ruleset,
    previous_ruleset: Ruleset | None,
    previous: dict[tuple[str, str], frozenset[str]],
    now: float,
) -> tuple[dict[tuple[str, str], frozenset[str]], Batch]:
    """The learnt-address sets `ruleset` needs (per set, its element keys)
    and the commands that create them and set their elements: a set whose
    elements are unchanged is not written (compared with `previous_ruleset`
    when given, which knows the leases, else by key with `previous`, what
    the kernel holds)."""
    batch = Batch()
    learn = ruleset.learn
    if learn is None:
        return {}, batch
    portdev = ruleset.port.portdev
    elements = _learn_elements(learn, portdev, now)
    prev_elements = None
    if previous_ruleset is not None and previous_ruleset.learn is not None:
        prev_elements = _learn_elements(previous_ruleset.learn, portdev, now)
    wanted: list[tuple[str, str]] = []  # (family, kind)
    for family, l3 in ((BRIDGE, False), (INET, True)):
        wanted.extend((family, str(v)) for v in sorted(ruleset.set_versions(l3=l3)))
    if learn.learning:
        wanted.append((BRIDGE, "t"))
    out: dict[tuple[str, str], frozenset[str]] = {}
    for family, kind in wanted:
        name = learn_set_name(portdev, None if kind == "t" else int(kind))
        key = (family, name)
        items = elements[kind]
        keys = frozenset(k for k, _t in items)
        out[key] = keys
        exists = key in previous
        if exists and (previous[key] == keys if prev_elements is None
                       else prev_elements[kind] == items and previous[key] == keys):
            continue
        if not exists:
            batch.add({"add": {"set": {"family": family, "table": TABLE, "name": name,
                                       "type": LEARN_SET_TYPES[kind], "flags": ["timeout"]}}})
        else:
            batch.add({"flush": {"set": {"family": family, "table": TABLE, "name": name}}})
        if items:
            batch.add({"add": {"element": {"family": family, "table": TABLE, "name": name,
                                           "elem": [_elem(k, t) for k, t in items]}}})
    return out, batch


def delete_element(family: str, vmap: str, key: str | int) -> Json:
    """The command deleting one dispatch element."""
    return _element("delete", family, vmap, key, None)


def shift(hook: Hook) -> int:
    """Where a port id sits in the mark for `hook`."""
    return _shift(hook)


def _shift(hook: Hook) -> int:
    return 0 if hook is Hook.FROM_VM else 16


def _element(verb: str, family: str, vmap: str, key: str | int, target: str | None) -> Json:
    elem: Any = key if target is None else [key, {"jump": {"target": target}}]
    return {verb: {"element": {"family": family, "table": TABLE, "name": vmap,
                               "elem": [elem]}}}


def _rule(
    family: str, chain: str, exprs: list[Json], text: str, sig: str | None = None
) -> Json:
    body: Json = {"family": family, "table": TABLE, "chain": chain, "expr": exprs,
                  "comment": rule_comment(text, sig or digest(exprs, text))}
    return {"add": {"rule": body}}


def digest(exprs: list[Json], text: str) -> str:
    """A short digest of one rendered rule (its expressions and the text of
    its comment), carried at the end of the rule's comment.

    Comparing these per chain is how a start tells what the kernel holds
    from what it would render: libnftables lists expressions normalised
    (ether types as names, `th` as `tcp`, ...), so the rendered JSON and the
    listed JSON differ for equal rules.  The digest says what we wrote; a
    foreign edit that keeps our comment is the monitor's or the audit's to
    find (docs/backends.md, Trust boundary)."""
    # repr, not json.dumps (three times slower): the renderer builds every
    # expression in a fixed key order, and a change of that order only
    # rewrites chains once.
    # An origin may hold lone surrogates (bytes that were not UTF-8).
    raw = f"{text}\0{exprs!r}".encode("utf-8", "surrogatepass")
    return hashlib.sha256(raw).hexdigest()[:DIGEST_LEN]


def rule_comment(text: str, sig: str) -> str:
    """`text` (cut to fit) followed by the digest tag."""
    room = MAX_COMMENT_BYTES - len(DIGEST_TAG) - DIGEST_LEN
    return comment_text(text, room) + DIGEST_TAG + sig


_DIGEST = re.compile(re.escape(DIGEST_TAG) + f"([0-9a-f]{{{DIGEST_LEN}}})" + r"\Z")


def digest_of(comment: object) -> str | None:
    """The digest a rule comment carries, or None (no comment of ours)."""
    if not isinstance(comment, str):
        return None
    found = _DIGEST.search(comment)
    return found.group(1) if found else None


def port_id_comment(port_id: int) -> str:
    """The comment text of a root chain's mark-stamping rule."""
    return f"port id {port_id}"


_PORT_ID = re.compile(r"port id (\d+)" + re.escape(DIGEST_TAG))


def port_id_of(comment: object) -> int | None:
    """The port id a mark-stamping rule's comment names, or None."""
    if not isinstance(comment, str):
        return None
    found = _PORT_ID.match(comment)
    return int(found.group(1)) if found else None


# -- stamps ----------------------------------------------------------------


@functools.cache
def renderer_salt(caps: Capabilities) -> str:
    """What a port's rendering depends on besides its ruleset and port id:
    `RENDER_VERSION`, this module's source (a copy running without its
    source relies on the version alone), the base layout and `caps`."""
    try:
        source = Path(__file__).read_bytes()
    except OSError:
        source = b""
    base = sorted(base_digests().items())
    text = f"{RENDER_VERSION}\0{LAYOUT_VERSION}\0{base!r}\0{caps!r}\0"
    return hashlib.sha256(text.encode() + source).hexdigest()


def ruleset_stamp(ruleset: Ruleset, port_id: int, caps: Capabilities) -> str:
    """The first half of a port stamp: the ruleset (`ruleset_digest`), the
    port id it is rendered with and the renderer (`digest_stamp`)."""
    has_l3 = any(ruleset.l3_rules(hook) for hook in (Hook.FROM_VM, Hook.TO_VM))
    return digest_stamp(ruleset_digest(ruleset), has_l3, port_id, caps)


def digest_stamp(digest: str, has_l3: bool, port_id: int, caps: Capabilities) -> str:
    """`ruleset_stamp` of a ruleset with `ruleset_digest` `digest`.  Only
    layer-3 rules make the id part of what renders (the mark-stamping rule,
    the `l3_*` elements); a port without them keeps its stamp under any id,
    which a start gives it afresh (the kernel holds none for it)."""
    text = f"{renderer_salt(caps)}\0{port_id if has_l3 else 0}\0{digest}"
    return hashlib.sha256(text.encode()).hexdigest()[:STAMP_LEN]


def chains_stamp(digests: dict[tuple[str, str], tuple[str, ...]]) -> str:
    """The second half of a port stamp: every chain of the port (but the
    stamp chain) by family and name, with the digests of its rules in order."""
    out = hashlib.sha256()
    for (family, name), sigs in sorted(digests.items()):
        if name.endswith("/" + STAMP_CHAIN) and family == BRIDGE:
            continue
        out.update(f"{family} {name} {' '.join(sigs)}\n".encode("utf-8", "surrogatepass"))
    return out.hexdigest()[:STAMP_LEN]


def stamp_comment(
    ruleset: Ruleset, port_id: int, caps: Capabilities,
    digests: dict[tuple[str, str], tuple[str, ...]],
) -> str:
    """The comment text of a port's stamp rule."""
    return f"{STAMP_TAG}{ruleset_stamp(ruleset, port_id, caps)}.{chains_stamp(digests)}"


_STAMP = re.compile(re.escape(STAMP_TAG) + f"([0-9a-f]{{{STAMP_LEN}}})\\.([0-9a-f]{{{STAMP_LEN}}})"
                    + re.escape(DIGEST_TAG) + f"([0-9a-f]{{{DIGEST_LEN}}})\\Z")


def stamp_of(comment: str) -> tuple[str, str] | None:
    """The two halves of the stamp a stamp rule's comment carries, or None
    (not a stamp, or a digest that is not the stamp rule's own)."""
    found = _STAMP.match(comment)
    if found is None:
        return None
    text = f"{STAMP_TAG}{found.group(1)}.{found.group(2)}"
    if digest(_STAMP_EXPRS, text) != found.group(3):
        return None
    return found.group(1), found.group(2)


@functools.lru_cache(maxsize=4096)
def comment_text(text: str, limit: int = MAX_COMMENT_BYTES) -> str:
    """`text` as a rule comment: printable, valid UTF-8, at most
    `limit` bytes (nft keeps comments as user data of limited size).

    nft prints a comment between double quotes without escaping it, so a '"'
    or a line break would make `nft list ruleset` unloadable; a lone
    surrogate (a byte that was not UTF-8) cannot be encoded at all.  Those
    and the other control characters become ``\\uXXXX`` and a backslash
    becomes two, so the escaping is injective; the cut falls between two
    characters or escapes, never inside one."""
    out: list[str] = []
    size = 0
    for ch in text:
        code = ord(ch)
        if ch == "\\":
            piece = "\\\\"
        elif ch == '"' or code < 0x20 or 0x7F <= code <= 0x9F or 0xD800 <= code <= 0xDFFF:
            piece = f"\\u{code:04x}"
        else:
            piece = ch
        size += len(piece.encode())
        if size > limit:
            break
        out.append(piece)
    return "".join(out)


def _origin(rule: Rule) -> str:
    if rule.origin is not None:
        return str(rule.origin)
    return rule.comment or f"{rule.family.value} rule"


def _carried(
    digests: tuple[str, ...], counts: tuple[tuple[int, int] | None, ...]
) -> dict[str, list[tuple[int, int]]]:
    """Per rule digest, the counter values the rules with that digest held,
    in order (a digest that is no rule of ours carries nothing)."""
    out: dict[str, list[tuple[int, int]]] = {}
    for sig, values in zip(digests, counts, strict=False):
        if values is not None and digest_of(DIGEST_TAG + sig) is not None:
            out.setdefault(sig, []).append(values)
    return out


def _with_counts(exprs: list[Json], values: tuple[int, int]) -> list[Json]:
    """`exprs` with its counter starting at `values` (packets, bytes)."""
    start = {"counter": {"packets": values[0], "bytes": values[1]}}
    return [start if expr == COUNTER else expr for expr in exprs]


def _counted(exprs: list[Json]) -> list[Json]:
    """A rule's expressions with the counter before its verdict (the last)."""
    return [*exprs[:-1], COUNTER, exprs[-1]]


def _mark_set(keep: int, value: int) -> Json:
    current: Json = {"&": [{"meta": {"key": "mark"}}, keep]}
    return {"mangle": {"key": {"meta": {"key": "mark"}},
                       "value": {"|": [current, value]} if value else current}}


# -- checking --------------------------------------------------------------


def check_ruleset(
    ruleset: Ruleset,
    caps: Capabilities,
    *,
    rules: bool = True,
    previous: Ruleset | None = None,
) -> None:
    """Raise `UnsupportedError` if anything in `ruleset` has no exact nft form.

    With `rules=False` only the structure is checked (rendering checks each
    rule anyway); chains equal to those of `previous` are not checked again."""
    portdev = ruleset.port.portdev
    check_port_name(portdev)
    for hook in (Hook.FROM_VM, Hook.TO_VM):
        chains = ruleset.chains(hook)
        names = [c.name for c in chains]
        if len(set(names)) != len(names):
            raise UnsupportedError(f"port '{portdev}': duplicate chain names in {hook.value}")
        if chains and "root" not in names:
            raise UnsupportedError(f"port '{portdev}': {hook.value} has no 'root' chain")
        prev = {c.name: c for c in previous.chains(hook)} if previous is not None else {}
        for chain in chains:
            l2_chain_name(portdev, hook, chain.name)
            for rule in chain.rules:
                if rule.verdict is Verdict.JUMP and rule.target not in names:
                    raise _unsupported(portdev, rule, f"jump to unknown chain '{rule.target}'")
                if rule.verdict is Verdict.JUMP and rule.target == "root":
                    raise _unsupported(portdev, rule, "jump to 'root' would loop")
            if rules and prev.get(chain.name) != chain:
                for rule in chain.rules:
                    _l2_rule(rule, portdev, hook, caps)
        l3 = ruleset.l3_rules(hook)
        if rules and (previous is None or previous.l3_rules(hook) != l3):
            for rule in l3:
                _l3_rule(rule, portdev, hook, {})
        if rules and ruleset.learn is not None:
            for rule in ruleset.learn.learning.get(hook, ()):
                if rule.verdict is Verdict.JUMP:
                    raise _unsupported(portdev, rule, "jump in the learning rules")
                _l2_rule(rule, portdev, hook, caps)


def _unsupported(portdev: str, rule: Rule, why: str) -> UnsupportedError:
    return UnsupportedError(f"port '{portdev}', {_origin(rule)}: {why}")


# -- rules -----------------------------------------------------------------


def _verdict(rule: Rule, portdev: str, hook: Hook, layer2: bool, caps: Capabilities) -> Json:
    v = rule.verdict
    if v is Verdict.ACCEPT:
        return {"accept": None}
    if v is Verdict.DROP:
        return {"drop": None}
    if v is Verdict.RETURN:
        return {"return": None}
    if v is Verdict.CONTINUE:
        return {"continue": None}
    if v is Verdict.JUMP:
        if not layer2 or rule.target is None:
            raise _unsupported(portdev, rule, "jump is only valid in a layer-2 chain")
        return {"jump": {"target": l2_chain_name(portdev, hook, rule.target)}}
    # REJECT: the kernel's bridge-family reject works only in prerouting and
    # input, and this kernel may lack it altogether (no NFT_REJECT_BRIDGE).
    if layer2 and (hook is not Hook.FROM_VM or not caps.bridge_reject):
        raise _unsupported(portdev, rule, "reject in layer 2 needs bridge-family reject "
                           "(kernel NFT_REJECT_BRIDGE, direction 'out' only)")
    # iptables' REJECT default, which libvirt relies on: port unreachable
    # for every protocol (icmpx picks ICMP or ICMPv6 by family).
    return {"reject": {"type": "icmpx", "expr": "port-unreachable"}}


def _l2_rule(rule: Rule, portdev: str, hook: Hook, caps: Capabilities) -> list[list[Json]]:
    if rule.family is not Family.ETHER:
        raise _unsupported(portdev, rule, f"{rule.family.value} rule in a layer-2 chain")
    verdict = _verdict(rule, portdev, hook, True, caps)
    fields = {m.field for m in rule.matches}
    for m in rule.matches:
        if m.field in L3_ONLY:
            raise _unsupported(portdev, rule, f"{m.field.value} is not available in layer 2 "
                               "(no bridge-family conntrack)")
        if m.field is Field.ARP_GRATUITOUS:
            # Needs a comparison of two packet fields; nft's cmp compares a
            # register with a constant only (nft 1.0.6 / this kernel).
            raise _unsupported(portdev, rule, "arp gratuitous (sender IP == target IP) has "
                               "no nft expression")
    ethertype = _positive_int(rule, Field.ETH_TYPE)
    ip_version = _ip_version(rule, ethertype, portdev)
    exprs: list[Json] = []
    # Ethernet header first: nft then sees the protocol context and adds no
    # conflicting implicit dependencies.
    order = sorted(rule.matches, key=lambda m: _FIELD_ORDER.get(m.field, 50))
    if fields & STP_FIELDS:
        if not any(m.field is Field.ETH_DST and not m.negate for m in rule.matches):
            exprs.append(_cmp(_payload("ether", "daddr"), STP_DST, False))
        exprs.append(_cmp(_raw(STP_LLC[0], STP_LLC[1]), STP_LLC[2], False))
    guards_added: set[str] = set()
    config: list[Json] = []
    for m in order:
        if m.field in STP_CONFIG_FIELDS:
            config.append(_match_expr(m, rule, portdev, ip_version))
            continue
        if m.field in ARP_RAW:
            if ethertype not in (ETH_P_ARP, ETH_P_RARP):
                raise _unsupported(portdev, rule, f"{m.field.value} without ethertype ARP/RARP")
            kind = "ip" if m.field in (Field.ARP_SPA, Field.ARP_TPA) else (
                "mac" if m.field in (Field.ARP_SHA, Field.ARP_THA) else "")
            if kind and kind not in guards_added:
                guards_added.add(kind)
                for off, ln, val in ARP_IP_GUARD if kind == "ip" else ARP_MAC_GUARD:
                    exprs.append(_cmp(_raw(off, ln), val, False))
        exprs.append(_match_expr(m, rule, portdev, ip_version))
    stp_type = _positive_int(rule, Field.STP_TYPE)
    if not config or (stp_type is not None and stp_type != 0):
        return [[*exprs, verdict]]
    if stp_type == 0:
        return [[*exprs, *config, verdict]]
    # ebt_stp compares the configuration-BPDU fields only on configuration
    # BPDUs (type 0) and lets every other BPDU match; two rules say the same.
    type_raw = _raw(*STP_RAW[Field.STP_TYPE])
    return [
        [*exprs, _cmp(type_raw, 0, True), verdict],
        [*exprs, _cmp(type_raw, 0, False), *config, verdict],
    ]


def _l3_rule(
    rule: Rule, portdev: str, hook: Hook, sets: dict[tuple[str, str], Json]
) -> list[list[Json]]:
    if rule.family is Family.ETHER:
        raise _unsupported(portdev, rule, "layer-2 rule in the layer-3 list")
    verdict = _verdict(rule, portdev, hook, False, Capabilities())
    version = 4 if rule.family is Family.IPV4 else 6
    exprs: list[Json] = [_cmp({"meta": {"key": "nfproto"}}, "ipv4" if version == 4 else "ipv6",
                              False)]
    for m in sorted(rule.matches, key=lambda m: _FIELD_ORDER.get(m.field, 50)):
        if m.field in L2_ONLY and m.field not in L3_ETHER:
            raise _unsupported(portdev, rule, f"{m.field.value} in a layer-3 rule")
        if m.field is Field.CONNLIMIT_ABOVE:
            exprs.append(_connlimit(m, rule, portdev, version, sets))
            continue
        if m.field is Field.IPSET:
            exprs.extend(_ipset(m, rule, portdev, version, sets))
            continue
        exprs.append(_match_expr(m, rule, portdev, version))
    return [[*exprs, verdict]]


_FIELD_ORDER = {
    Field.ETH_TYPE: 0,
    Field.ETH_SRC: 1,
    Field.ETH_DST: 2,
    Field.VLAN_ID: 3,
    Field.VLAN_ENCAP: 4,
    Field.CT_STATE: 5,
    Field.IP_PROTO: 10,
    Field.CONNLIMIT_ABOVE: 90,
}


def _positive_int(rule: Rule, fld: Field) -> int | None:
    for m in rule.matches:
        if m.field is fld and not m.negate and isinstance(m.value, int):
            return int(m.value)
    return None


def _ip_version(rule: Rule, ethertype: int | None, portdev: str) -> int | None:
    if ethertype == ETH_P_IP:
        return 4
    if ethertype == ETH_P_IPV6:
        return 6
    if any(m.field in IP_FIELDS for m in rule.matches):
        raise _unsupported(portdev, rule, "IP header fields need ethertype 0x0800 or 0x86dd")
    return None


# -- matches ---------------------------------------------------------------


def _payload(proto: str, fld: str) -> Json:
    return {"payload": {"protocol": proto, "field": fld}}


def _raw(offset: int, length: int) -> Json:
    return {"payload": {"base": "nh", "offset": offset, "len": length}}


def _cmp(left: Json, right: Any, negate: bool) -> Json:
    return {"match": {"op": "!=" if negate else "==", "left": left, "right": right}}


def _range(value: IntRange) -> Any:
    if value.lo > value.hi:
        raise UnsupportedError(f"empty range {value.lo}-{value.hi}")
    return value.lo if value.lo == value.hi else {"range": [value.lo, value.hi]}


def _mac_int(text: str) -> int:
    return int(text.replace(":", "").replace("-", ""), 16)


def _mac_text(value: int) -> str:
    raw = f"{value:012x}"
    return ":".join(raw[i:i + 2] for i in range(0, 12, 2))


def _mac_match(left: Json, value: MacMatch, negate: bool, raw: bool) -> Json:
    addr = _mac_int(value.addr)
    if value.mask is None:
        return _cmp(left, addr if raw else _mac_text(addr), negate)
    mask = _mac_int(value.mask)
    if raw:
        return _cmp({"&": [left, mask]}, addr & mask, negate)
    return _cmp({"&": [left, _mac_text(mask)]}, _mac_text(addr & mask), negate)


def _net(value: ipaddress.IPv4Network | ipaddress.IPv6Network) -> Any:
    if value.prefixlen == value.max_prefixlen:
        return str(value.network_address)
    return {"prefix": {"addr": str(value.network_address), "len": value.prefixlen}}


def _match_expr(m: Match, rule: Rule, portdev: str, version: int | None) -> Json:
    f, v, neg = m.field, m.value, m.negate
    if f in (Field.ETH_SRC, Field.ETH_DST):
        if not isinstance(v, MacMatch):
            raise _misfit(portdev, rule, m)
        return _mac_match(_payload("ether", "saddr" if f is Field.ETH_SRC else "daddr"), v, neg,
                          False)
    if f is Field.ETH_TYPE:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 0xFFFF:
            raise _misfit(portdev, rule, m)
        return _cmp(_payload("ether", "type"), v, neg)
    if f in (Field.VLAN_ID, Field.VLAN_ENCAP):
        if not isinstance(v, int) or isinstance(v, bool):
            raise _misfit(portdev, rule, m)
        return _cmp(_payload("vlan", "id" if f is Field.VLAN_ID else "type"), v, neg)
    if isinstance(v, LearntSet):
        return _learnt_match(m, v, rule, portdev, version)
    if f in STP_RAW or f in ARP_RAW:
        off, ln = STP_RAW[f] if f in STP_RAW else ARP_RAW[f]
        left = _raw(off, ln)
        if isinstance(v, MacMatch):
            return _mac_match(left, v, neg, True)
        if isinstance(v, IntRange):
            return _cmp(left, _range(v), neg)
        if isinstance(v, ipaddress.IPv4Network):
            base = int(v.network_address)
            if v.prefixlen == 32:
                return _cmp(left, base, neg)
            return _cmp({"&": [left, int(v.netmask)]}, base, neg)
        if isinstance(v, int) and not isinstance(v, bool):
            return _cmp(left, v, neg)
        raise _misfit(portdev, rule, m)
    if f in (Field.IP_SRC, Field.IP_DST, Field.IP_SRC_RANGE, Field.IP_DST_RANGE):
        side = "saddr" if f in (Field.IP_SRC, Field.IP_SRC_RANGE) else "daddr"
        if isinstance(v, AddrRange):
            if v.start.version != v.end.version or v.start > v.end:  # type: ignore[operator]
                raise _misfit(portdev, rule, m)
            addr_version, right = v.start.version, {"range": [str(v.start), str(v.end)]}
        elif isinstance(v, ipaddress.IPv4Network | ipaddress.IPv6Network):
            addr_version, right = v.version, _net(v)
        else:
            raise _misfit(portdev, rule, m)
        if version is not None and addr_version != version:
            raise _unsupported(portdev, rule, f"IPv{addr_version} address in an "
                               f"IPv{version} rule")
        return _cmp(_payload("ip" if addr_version == 4 else "ip6", side), right, neg)
    if f is Field.IP_PROTO:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 255:
            raise _misfit(portdev, rule, m)
        # meta l4proto, not 'ip protocol'/'ip6 nexthdr': like ip6tables -p it
        # skips IPv6 extension headers, and it sets the context for 'th'.
        return _cmp({"meta": {"key": "l4proto"}}, v, neg)
    if f is Field.IP_DSCP:
        if not isinstance(v, int) or isinstance(v, bool) or not 0 <= v <= 63:
            raise _misfit(portdev, rule, m)
        return _cmp(_payload("ip" if version == 4 else "ip6", "dscp"), v, neg)
    if f in (Field.L4_SPORT, Field.L4_DPORT):
        proto = _positive_int(rule, Field.IP_PROTO)
        if proto not in PORT_PROTOS:
            raise _unsupported(portdev, rule, "port match without tcp/udp/sctp/dccp")
        if not isinstance(v, IntRange):
            raise _misfit(portdev, rule, m)
        return _cmp(_payload("th", "sport" if f is Field.L4_SPORT else "dport"), _range(v), neg)
    if f in (Field.ICMP_TYPE, Field.ICMP_CODE):
        if not isinstance(v, IntRange):
            raise _misfit(portdev, rule, m)
        icmp = "icmp" if version == 4 else "icmpv6"
        return _cmp(_payload(icmp, "type" if f is Field.ICMP_TYPE else "code"), _range(v), neg)
    if f is Field.TCP_FLAGS:
        if not isinstance(v, TcpFlags) or not v.set <= v.mask:
            raise _misfit(portdev, rule, m)
        if _positive_int(rule, Field.IP_PROTO) != 6:
            raise _unsupported(portdev, rule, "tcp flags without protocol tcp")
        mask = sum(TCP_BITS[x] for x in v.mask)
        want = sum(TCP_BITS[x] for x in v.set)
        return _cmp({"&": [_payload("tcp", "flags"), mask]}, want, neg)
    if f is Field.CT_STATE:
        if not isinstance(v, frozenset) or not v or not all(isinstance(x, CtState) for x in v):
            raise _misfit(portdev, rule, m)
        states = sorted(x.value for x in v)
        wanted: Any = states[0] if len(states) == 1 else states
        # 'in' tests "any of these bits", which is conntrack's state match.
        return {"match": {"op": "!=" if neg else "in", "left": {"ct": {"key": "state"}},
                          "right": wanted}}
    raise _unsupported(portdev, rule, f"field {f.value} is not supported here")


def _learnt_match(
    m: Match, v: LearntSet, rule: Rule, portdev: str, version: int | None
) -> Json:
    """A match on the port's learnt address set of `v.version`."""
    if m.negate:
        raise _unsupported(portdev, rule, "a negated match on the learnt addresses")
    right = f"@{learn_set_name(portdev, v.version)}"
    if m.field in (Field.ARP_SPA, Field.ARP_TPA):
        # Typed, unlike the other ARP fields: nft compares a set of
        # ipv4_addr with 'arp saddr ip' but not with the raw payload at the
        # same offset ("datatype mismatch"); the typed payload needs the
        # ethertype ARP, which the rule matches first.
        if v.version != 4 or _positive_int(rule, Field.ETH_TYPE) != ETH_P_ARP:
            raise _unsupported(portdev, rule, "learnt addresses in a RARP rule")
        side = "saddr ip" if m.field is Field.ARP_SPA else "daddr ip"
        return _cmp(_payload("arp", side), right, False)
    if m.field not in (Field.IP_SRC, Field.IP_DST) or version != v.version:
        raise _misfit(portdev, rule, m)
    side = "saddr" if m.field is Field.IP_SRC else "daddr"
    return _cmp(_payload("ip" if v.version == 4 else "ip6", side), right, False)


def _misfit(portdev: str, rule: Rule, m: Match) -> UnsupportedError:
    return _unsupported(portdev, rule, f"value {m.value!r} does not fit {m.field.value}")


def _connlimit(
    m: Match, rule: Rule, portdev: str, version: int, sets: dict[tuple[str, str], Json]
) -> Json:
    v = m.value
    if not isinstance(v, int) or isinstance(v, bool) or v < 0:
        raise _unsupported(portdev, rule, f"connlimit-above {v!r}")
    if m.negate:
        raise _unsupported(portdev, rule, "negated connlimit-above")
    # iptables' connlimit counts connections per source address (/32, /128)
    # among those the rule has seen; a dynamic set keyed by saddr with a
    # 'ct count' per element is the same thing.
    name = f"{CONNLIMIT_PREFIX}{version}_{_tag(portdev)}_{rule_key(rule)}"
    sets[(INET, name)] = {"type": "ipv4_addr" if version == 4 else "ipv6_addr",
                          "size": 65535}
    return {"set": {"op": "add", "set": f"@{name}",
                    "elem": _payload("ip" if version == 4 else "ip6", "saddr"),
                    "stmt": [{"ct count": {"val": v, "inv": True}}]}}


def rule_key(rule: Rule) -> str:
    """A short key for a rule's own objects (connlimit sets), the same in
    every process: from `ir_digest.rule_text`, which writes sets sorted
    (`repr` of a frozenset of enums follows the process's string hashes)."""
    raw = rule_text(rule).encode("utf-8", "surrogatepass")
    return hashlib.sha256(raw).hexdigest()[:RULE_KEY_LEN]


def _ipset(
    m: Match, rule: Rule, portdev: str, version: int, sets: dict[tuple[str, str], Json]
) -> list[Json]:
    v = m.value
    if not isinstance(v, IPSetMatch):
        raise _unsupported(portdev, rule, f"ipset value {v!r}")
    if len(v.flags) != 1 or v.flags[0] not in ("src", "dst"):
        raise _unsupported(portdev, rule, f"ipset '{v.name}' with flags {','.join(v.flags)}: "
                           "only one-dimensional address sets (src or dst) map to nft sets")
    family = Family.IPV4 if version == 4 else Family.IPV6
    name = ipset_name(v.name, family)
    sets[(INET, name)] = {"type": "ipv4_addr" if version == 4 else "ipv6_addr",
                          "flags": ["interval"]}
    side = "saddr" if v.flags[0] == "src" else "daddr"
    return [_cmp(_payload("ip" if version == 4 else "ip6", side), f"@{name}", m.negate)]
