"""The packet explainer: one frame walked through a port's compiled rules.

The walk follows the IR's evaluation model (`nwfilter.ir`) with the
semantics of the kernel objects the port's backend makes of each match:
the nft expressions of `nwfilter.backends.nft.render`, or the ebtables and
iptables matches of `nwfilter.backends.ebiptables.render` (`backend`).
Layer 2 is the chain tree of the hook from `root` (`accept` ends layer 2,
`return` leaves a chain, falling off `root` accepts), then, for an
untagged IPv4/IPv6 frame that layer 2 accepted, the port's flat layer-3
list, which br_netfilter hands such frames to.  A field the frame does not
have fails its match, negated or not, as an nft payload or meta expression,
or an ebtables or iptables match, that finds nothing does.

The backends differ, and the walk with them (each measured on this
kernel): on ebiptables, STP fields are read as ebt_stp reads them (one
byte early, see `EBT_STP_BITS`), layer-2 IPv6 protocol and port matches
skip an authentication header and layer-2 IPv4 protocol matches hold for
every fragment (ebt_ip, ebt_ip6), and libvirt's implicit conntrack states
also test the conntrack direction (`--ctdir`).  On both, a bridged
frame's layer-3 verdict is the pair of the sending port's walk and the
receiving port's: on ebiptables the two chains follow each other in
FORWARD, and an accept in the first is libvirt's `return`, so the second
still runs.  (What leaves libvirt's chains there without a verdict meets
the rest of the host's FORWARD chain, which the walk takes as accepting.)

What the IR cannot tell from one frame is an input: the conntrack state
(derived from the frame as if no earlier packet had been seen, unless
given) and direction ('original', or 'reply' for a given 'established'),
the number of connections a connlimit counts (1), and the elements of the
operator's ipsets (empty unless given).  Each step names the rule, why it
matched or not, and the filter and rule of the XML it came from.
"""

from __future__ import annotations

import ipaddress
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from nwfilter.audit.packet import Frame, sctp_checksum
from nwfilter.backends.ebiptables.render import ct_direction
from nwfilter.errors import ValidationError
from nwfilter.ir import (
    ETH_P_IP,
    STP_GROUP_MAC,
    AddrRange,
    CtState,
    Family,
    Field,
    Hook,
    IntRange,
    IPNetwork,
    IPSetMatch,
    LearntSet,
    MacMatch,
    Match,
    Rule,
    Ruleset,
    TcpFlag,
    TcpFlags,
    Verdict,
)
from nwfilter.render_text import format_match, format_rule

# Bit offsets from the network header, as the renderer's raw payloads.
ARP_BITS = {
    Field.ARP_HTYPE: (0, 16), Field.ARP_PTYPE: (16, 16), Field.ARP_OP: (48, 16),
    Field.ARP_SHA: (64, 48), Field.ARP_SPA: (112, 32), Field.ARP_THA: (144, 48),
    Field.ARP_TPA: (192, 32),
}
STP_BITS = {
    Field.STP_TYPE: (48, 8), Field.STP_FLAGS: (56, 8), Field.STP_ROOT_PRIO: (64, 16),
    Field.STP_ROOT_ADDR: (80, 48), Field.STP_ROOT_COST: (128, 32),
    Field.STP_SENDER_PRIO: (160, 16), Field.STP_SENDER_ADDR: (176, 48),
    Field.STP_PORT: (224, 16), Field.STP_MSG_AGE: (240, 16), Field.STP_MAX_AGE: (256, 16),
    Field.STP_HELLO_TIME: (272, 16), Field.STP_FORWARD_DELAY: (288, 16),
}
STP_CONFIG = frozenset(STP_BITS) - {Field.STP_TYPE}
_STP_LLC = 0x424203
# ebtables' --stp-* options are the kernel's ebt_stp match, which reads a
# BPDU one byte early: its header has a one-byte protocol identifier, and
# it compares six bytes (LLC, protocol identifier, version: 42 42 03 00 00
# 00), so an RSTP BPDU (version 2) never matches, the "type" it reads is the
# version byte (always 0: every BPDU is a configuration BPDU to it, a TCN
# one never), and it reads the configuration fields (31 bytes) from the
# real type byte on.  Measured on this kernel with ebtables-nft 1.8.9.
_EBT_STP_HEADER = 0x424203000000
_EBT_STP_CONFIG_END = 6 + 31  # bytes of the network header ebt_stp needs for them
EBT_STP_BITS = {f: (offset - 8, size) for f, (offset, size) in STP_BITS.items()
                if f in STP_CONFIG}
BACKENDS = ("nft", "ebiptables")
CT_DIRS = ("original", "reply")
_MAC_FIELDS = frozenset({Field.ARP_SHA, Field.ARP_THA})
_IP_FIELDS = frozenset({Field.ARP_SPA, Field.ARP_TPA})
_TCP_BITS = {TcpFlag.FIN: 0x01, TcpFlag.SYN: 0x02, TcpFlag.RST: 0x04, TcpFlag.PSH: 0x08,
             TcpFlag.ACK: 0x10, TcpFlag.URG: 0x20}
# Conntrack: the ICMP types that may start a connection (nf_conntrack_proto_icmp[v6]);
# any other ICMP message without an earlier packet gets no entry: 'invalid'.
_ICMP_NEW = {4: frozenset({8, 13, 15, 17}), 6: frozenset({128, 139})}
# SCTP (nf_conntrack_proto_sctp): the chunk types that may open a flow, and
# those a new flow does not hold to its verification tag (0).
_SCTP_INIT, _SCTP_INIT_ACK, _SCTP_HEARTBEAT, _SCTP_COOKIE_ECHO = 1, 2, 4, 10
_SCTP_COOKIE_ACK, _SCTP_SHUTDOWN_COMPLETE = 11, 14
_SCTP_NEW = frozenset({1, 2, 4, 5, 7, 8, 9, 10})
_SCTP_TAG_EXEMPT = frozenset({1, 4, 5, 6, 8, 10, 14})  # not held to the flow's tag


def _mac_int(text: str) -> int:
    return int(text.replace(":", "").replace("-", ""), 16)


def default_ct_state(frame: Frame) -> CtState | None:
    """The conntrack state of `frame` when no earlier packet was seen (None:
    not IP).  TCP without SYN is picked up mid-stream ('new', tcp_loose=1)
    unless it carries RST or no ACK; ICMP other than requests is 'invalid'."""
    ip = frame.ip
    if ip is None:
        return None
    proto = ip[4]
    if proto == 6:
        flags = frame.transport(13, 1)
        if flags is None:
            return CtState.INVALID
        if flags & 0x04 or (flags & 0x12) == 0 or (flags & 0x03) == 0x03:
            return CtState.INVALID
        return CtState.NEW
    if proto in (1, 58):
        kind = frame.transport(0, 1)
        return CtState.NEW if kind in _ICMP_NEW[ip[0]] else CtState.INVALID
    if proto == 132:
        return CtState.NEW if _sctp_opens(frame) else CtState.INVALID
    return CtState.NEW


def _sctp_opens(frame: Frame) -> bool:
    """Whether conntrack takes an SCTP packet for the first of a flow:
    a correct CRC32c (checked for packets the kernel has not verified, as
    from a veth or tap), chunks of non-zero length with INIT, INIT ACK and
    SHUTDOWN COMPLETE only alone and COOKIE chunks only first, only chunk
    types that may open a flow (not DATA, SACK, ABORT, COOKIE ACK, SHUTDOWN
    COMPLETE), and verification tag 0 where the chunks need it (INIT
    always).  Measured on this kernel for each chunk type."""
    ip = frame.ip
    assert ip is not None
    seg = frame.nh[ip[5]:]
    if ip[0] == 4:
        seg = seg[:max(0, int.from_bytes(frame.nh[2:4], "big") - ip[5])]
    else:
        seg = seg[:max(0, 40 + int.from_bytes(frame.nh[4:6], "big") - ip[5])]
    if len(seg) < 12 or seg[8:12] != sctp_checksum(seg):
        return False
    vtag = int.from_bytes(seg[4:8], "big")
    types: list[int] = []
    offset = 12
    while offset + 4 <= len(seg):
        kind, length = seg[offset], int.from_bytes(seg[offset + 2:offset + 4], "big")
        if length == 0 or (types and (kind in (_SCTP_COOKIE_ACK, _SCTP_COOKIE_ECHO) or any(
                t in (_SCTP_INIT, _SCTP_INIT_ACK, _SCTP_SHUTDOWN_COMPLETE)
                for t in [*types, kind]))):
            return False
        if kind in (_SCTP_INIT, _SCTP_INIT_ACK) and offset + 4 + 16 > len(seg):
            return False  # no room for the INIT header
        types.append(kind)
        offset += (length + 3) & ~3
    if not types or any(t not in _SCTP_NEW for t in types):
        return False
    if not vtag:
        return True
    # A new flow's own tag is 0, or the packet's when it holds a HEARTBEAT.
    if _SCTP_INIT in types or (_SCTP_COOKIE_ECHO in types and _SCTP_HEARTBEAT not in types):
        return False
    return any(t in _SCTP_TAG_EXEMPT for t in types)


def semantics_of(backend: str) -> str:
    """The backend whose kernel objects a walk models for `backend` (the
    memory backend applies nothing; its rules are walked as nft's)."""
    return backend if backend in BACKENDS else "nft"


@dataclass(frozen=True)
class Step:
    """One rule tested (or a chain entered: `rule` is empty)."""

    layer: str  # "l2", "l3" or "learning"
    chain: str
    index: int  # 1-based position in the chain; 0 for "entered"
    rule: str
    matched: bool
    why: str
    action: str = ""  # what the rule did when it matched
    origin: str = ""  # filter and rule of the XML, if any

    def as_json(self) -> dict[str, Any]:
        return {"layer": self.layer, "chain": self.chain, "index": self.index,
                "rule": self.rule, "matched": self.matched, "why": self.why,
                "action": self.action, "origin": self.origin}


@dataclass
class Explanation:
    portdev: str
    hook: Hook
    packet: str
    ct_state: str | None
    steps: list[Step] = field(default_factory=list)
    verdict: str = "ACCEPT"
    decided_by: str = ""  # the rule that decided, or how the walk ended
    origin: str = ""
    backend: str = "nft"  # whose kernel objects the walk models
    ct_dir: str = "original"  # the conntrack direction (tested by ebiptables only)

    def as_json(self) -> dict[str, Any]:
        return {"port": self.portdev, "direction": "out" if self.hook is Hook.FROM_VM else "in",
                "backend": self.backend, "packet": self.packet, "ct_state": self.ct_state,
                "ct_dir": self.ct_dir if self.ct_state else None,
                "steps": [s.as_json() for s in self.steps], "verdict": self.verdict,
                "decided_by": self.decided_by, "origin": self.origin}

    def lines(self) -> list[str]:
        out = [f"port {self.portdev} direction "
               f"{'out (from the VM)' if self.hook is Hook.FROM_VM else 'in (to the VM)'}"
               f", rules of the {self.backend} backend",
               f"packet: {self.packet}" + (f" (ct state {self.ct_state}, {self.ct_dir})"
                                           if self.ct_state else "")]
        for step in self.steps:
            if not step.rule:
                out.append(f"{step.layer} chain {step.chain}: entered ({step.why})")
                continue
            mark = "match" if step.matched else "no   "
            line = f"  {mark} {step.chain}#{step.index}: {step.rule}"
            if step.origin:
                line += f"  [{step.origin}]"
            out.append(line)
            out.append(f"        {step.why}" + (f" -> {step.action}" if step.action else ""))
        out.append(f"decided by: {self.decided_by}")
        out.append(f"verdict: {self.verdict}")
        return out


class Explainer:
    """Walks frames through one port's ruleset."""

    def __init__(
        self,
        ruleset: Ruleset,
        *,
        ipsets: Mapping[str, frozenset[str]] | None = None,
        connections: int = 1,
        now: float | None = None,
        backend: str = "nft",
    ) -> None:
        if backend not in BACKENDS:
            raise ValidationError(f"backend must be one of {', '.join(BACKENDS)}, "
                                  f"not {backend!r}")
        self.ruleset = ruleset
        self.backend = backend
        self._ipsets = {k: [ipaddress.ip_network(v, strict=False) for v in vals]
                        for k, vals in (ipsets or {}).items()}
        self._connections = connections
        when = time.time() if now is None else now
        learn = ruleset.learn
        self._learnt = frozenset(
            a.address for a in (learn.addresses if learn is not None else ())
            if a.expires is None or a.expires > when)
        self._mac = _mac_int(ruleset.port.mac)

    def explain(
        self, hook: Hook, data: bytes | Frame, *, ct_state: CtState | None = None,
        ct_dir: str | None = None, trace: bool = True,
    ) -> Explanation:
        """Walk one frame.  `ct_state` defaults to the state of a first
        packet; `ct_dir` (the conntrack direction) to 'reply' for an
        established packet, else 'original'."""
        frame = data if isinstance(data, Frame) else Frame(data)
        state = ct_state if ct_state is not None else default_ct_state(frame)
        if ct_dir is None:
            ct_dir = "reply" if ct_state is CtState.ESTABLISHED else "original"
        if ct_dir not in CT_DIRS:
            raise ValidationError(f"ct_dir must be one of {', '.join(CT_DIRS)}, not {ct_dir!r}")
        out = Explanation(self.ruleset.port.portdev, hook, frame.describe(),
                          state.value if state is not None else None, backend=self.backend,
                          ct_dir=ct_dir)
        walk = _Walk(self, frame, state, out, trace)
        rs = self.ruleset
        if rs.learn is not None and rs.learn.held() and hook in rs.learn.learning:
            walk.enter("learning", "learning", "no IPv4 address learnt yet: the learning "
                       "rules decide, layer 3 is not reached")
            verdict = walk.flat("learning", "learning", rs.learn.learning[hook])
            if verdict is None:
                walk.end("ACCEPT", "end of the learning rules (the base chain accepts)")
            return out
        chains = rs.chains(hook)
        l3 = rs.l3_rules(hook)
        if not chains and not l3:
            walk.end("ACCEPT", "the port has no rules in this direction")
            return out
        stopped = walk.layer2(chains)
        if stopped:
            return out
        if not l3:
            walk.end("ACCEPT", walk.l2_end)
            return out
        ip = frame.ip
        if ip is None:
            walk.end("ACCEPT", walk.l2_end + "; not an untagged IPv4/IPv6 frame, so "
                     "layer 3 does not see it")
            return out
        walk.enter("l3", "ip", f"IPv{ip[0]} frame accepted by layer 2, through br_netfilter")
        verdict = walk.flat("l3", "ip", l3)
        if verdict is None:
            walk.end("ACCEPT", "end of the layer-3 rules (the base chain accepts)")
        return out


class _Walk:
    def __init__(self, ex: Explainer, frame: Frame, state: CtState | None,
                 out: Explanation, trace: bool) -> None:
        self.ex = ex
        self.frame = frame
        self.state = state
        self.out = out
        self.trace = trace
        self.l2_end = ""

    def enter(self, layer: str, chain: str, why: str) -> None:
        if self.trace:
            self.out.steps.append(Step(layer, chain, 0, "", True, why))

    def end(self, verdict: str, why: str, rule: Rule | None = None) -> None:
        self.out.verdict = verdict
        self.out.decided_by = why
        if rule is not None and rule.origin is not None:
            self.out.origin = str(rule.origin)

    def test(self, layer: str, chain: str, index: int, rule: Rule) -> bool:
        ok, why = rule_matches(self.ex, rule, self.frame, self.state, self.trace,
                               ct_dir=self.out.ct_dir)
        if self.trace:
            action = ""
            if ok:
                action = (f"jump {rule.target}" if rule.verdict is Verdict.JUMP
                          else rule.verdict.value)
            self.out.steps.append(Step(layer, chain, index, format_rule(rule), ok, why, action,
                                       str(rule.origin) if rule.origin is not None else ""))
        return ok

    def layer2(self, chains: tuple[Any, ...]) -> bool:
        """Walk layer 2; True when it decided for good (drop, reject)."""
        by_name = {c.name: c for c in chains}
        root = by_name.get("root")
        if root is None:
            self.l2_end = "layer 2 has no rules for this direction"
            return False
        stack: list[tuple[str, int]] = [("root", 0)]
        self.enter("l2", "root", "the port's root chain")
        while stack:
            name, pos = stack.pop()
            rules = by_name[name].rules if name in by_name else ()
            while pos < len(rules):
                rule = rules[pos]
                pos += 1
                if not self.test("l2", name, pos, rule):
                    continue
                v = rule.verdict
                where = f"{name}#{pos}"
                if v is Verdict.CONTINUE:
                    continue
                if v is Verdict.JUMP:
                    if len(stack) > 32 or rule.target not in by_name:
                        self.end("DROP", f"{where}: jump to a missing chain {rule.target}", rule)
                        return True
                    stack.append((name, pos))
                    stack.append((rule.target, 0))
                    self.enter("l2", rule.target, f"jump from {where}")
                    break
                if v is Verdict.ACCEPT:
                    self.l2_end = f"layer 2 accepted at {where}"
                    self._decider(rule, where)
                    return False
                if v in (Verdict.DROP, Verdict.REJECT):
                    self.end(v.name, f"{where} ({v.value})", rule)
                    return True
                # RETURN: leave this chain
                if name == "root":
                    self.l2_end = f"layer 2 returned from root at {where}"
                    self._decider(rule, where)
                    return False
                self.enter("l2", stack[-1][0], f"return from {name} at {where}")
                break
            else:
                if name == "root":
                    self.l2_end = "end of the root chain (accept)"
                    return False
                if stack:
                    self.enter("l2", stack[-1][0], f"end of {name}, back")
        self.l2_end = "end of the root chain (accept)"
        return False

    def _decider(self, rule: Rule, where: str) -> None:
        self.out.decided_by = where
        self.out.origin = str(rule.origin) if rule.origin is not None else ""

    def flat(self, layer: str, chain: str, rules: tuple[Rule, ...]) -> str | None:
        """A flat list: the first rule with a terminal verdict decides."""
        for index, rule in enumerate(rules, 1):
            if not self.test(layer, chain, index, rule):
                continue
            v = rule.verdict
            where = f"{chain}#{index}"
            if v in (Verdict.CONTINUE, Verdict.JUMP):
                continue
            if v is Verdict.RETURN:
                self.end("ACCEPT", f"{where} (return: the base chain accepts)", rule)
                return "ACCEPT"
            self.end(v.name if v is not Verdict.ACCEPT else "ACCEPT", f"{where} ({v.value})",
                     rule)
            return self.out.verdict
        return None


# -- matching ------------------------------------------------------------------


def rule_matches(ex: Explainer, rule: Rule, frame: Frame, state: CtState | None,
                 why: bool = True, *, ct_dir: str = "original") -> tuple[bool, str]:
    """Whether `rule` matches `frame`, and why (the first failing match, or 'all matched')."""
    ebt = ex.backend == "ebiptables"
    if rule.family is not Family.ETHER:
        ip = frame.ip
        want = 4 if rule.family is Family.IPV4 else 6
        if ip is None or ip[0] != want:
            return False, f"not an IPv{want} packet"
    fields = {m.field for m in rule.matches}
    stp = fields & frozenset(STP_BITS)
    if stp and ebt:
        # ebtables tests the destination only where the rule says so.
        if frame.raw(0, 48) != _EBT_STP_HEADER:
            return False, ("no BPDU header as ebt_stp reads it (LLC 42 42 03, protocol 0, "
                           "version 0)")
    elif stp:
        if not any(m.field is Field.ETH_DST and not m.negate for m in rule.matches) \
                and frame.dst_mac != _mac_int(STP_GROUP_MAC):
            return False, f"not sent to the STP group address {STP_GROUP_MAC}"
        if frame.raw(0, 24) != _STP_LLC:
            return False, "no STP LLC header"
    guards: set[str] = set()
    config: list[Match] = []
    for m in rule.matches:
        if m.field in STP_CONFIG:
            config.append(m)
            continue
        if m.field in _MAC_FIELDS and "mac" not in guards:
            guards.add("mac")
            if frame.raw(0, 16) != 1 or frame.raw(32, 8) != 6:
                return False, "ARP hardware type is not Ethernet/6"
        if m.field in _IP_FIELDS and "ip" not in guards:
            guards.add("ip")
            if frame.raw(16, 16) != ETH_P_IP or frame.raw(40, 8) != 4:
                return False, "ARP protocol type is not IPv4/4"
        ok, text = match_one(ex, m, frame, state, rule, why)
        if not ok:
            return False, text
        if m.field is Field.CT_STATE and ebt:
            ctdir = ct_direction(rule, m)
            if ctdir is not None and ctdir.lower() != ct_dir:
                return False, (f"--ctdir {ctdir}: fails (the packet is in the {ct_dir} "
                               "direction of its connection)")
    if config and ebt:
        # ebt_stp takes every BPDU it reads for a configuration one.
        if len(frame.nh) < _EBT_STP_CONFIG_END:
            return False, "the BPDU is too short for ebt_stp's configuration fields"
        for m in config:
            ok, text = match_one(ex, m, frame, state, rule, why)
            if not ok:
                return False, text
    elif config:
        stp_type = next((int(m.value) for m in rule.matches if m.field is Field.STP_TYPE
                         and not m.negate and isinstance(m.value, int)), None)
        if stp_type is not None and stp_type != 0:
            pass  # configuration fields cannot apply (ebt_stp): the renderer drops them
        elif stp_type == 0 or frame.raw(48, 8) == 0:
            for m in config:
                ok, text = match_one(ex, m, frame, state, rule, why)
                if not ok:
                    return False, text
    return True, "every condition holds" if rule.matches else "matches every frame"


def _fmt(value: object) -> str:
    return str(value)


def match_one(ex: Explainer, m: Match, frame: Frame, state: CtState | None, rule: Rule,
              why: bool = True) -> tuple[bool, str]:
    """One match: (holds, why; '' unless `why`)."""
    got = _value(ex, m, frame, state, rule)
    if got is _ABSENT:
        return False, f"{format_match(m)}: the frame has no {m.field.value}" if why else ""
    hit = _compare(ex, m, got, rule)
    result = hit != m.negate
    if not why:
        return result, ""
    text = format_match(m)
    shown = _show(m, got)
    return result, f"{text}: {'holds' if result else 'fails'} ({m.field.value} is {shown})"


class _Absent:
    pass


_ABSENT = _Absent()


def _show(m: Match, got: Any) -> str:
    if m.field in (Field.ETH_SRC, Field.ETH_DST, Field.ARP_SHA, Field.ARP_THA,
                   Field.STP_ROOT_ADDR, Field.STP_SENDER_ADDR) and isinstance(got, int):
        raw = f"{got:012x}"
        return ":".join(raw[i:i + 2] for i in range(0, 12, 2))
    if m.field in (Field.ARP_SPA, Field.ARP_TPA) and isinstance(got, int):
        return str(ipaddress.IPv4Address(got))
    if m.field in (Field.ETH_TYPE, Field.VLAN_ENCAP, Field.ARP_PTYPE) and isinstance(got, int):
        return f"0x{got:04x}"
    if isinstance(got, CtState):
        return got.value
    return _fmt(got)


def _value(ex: Explainer, m: Match, frame: Frame, state: CtState | None, rule: Rule) -> Any:
    f = m.field
    if f is Field.ETH_SRC:
        return frame.src_mac
    if f is Field.ETH_DST:
        return frame.dst_mac
    if f is Field.ETH_TYPE:
        return frame.ethertype
    if f is Field.VLAN_ID:
        return frame.vlan_id if frame.vlan_id is not None else _ABSENT
    if f is Field.VLAN_ENCAP:
        return frame.vlan_encap if frame.vlan_encap is not None else _ABSENT
    if f in ARP_BITS:
        raw = frame.raw(*ARP_BITS[f])
        return _ABSENT if raw is None else raw
    if f in STP_BITS:
        if ex.backend == "ebiptables":
            # The version byte, which the header check found 0.
            raw = 0 if f is Field.STP_TYPE else frame.raw(*EBT_STP_BITS[f])
        else:
            raw = frame.raw(*STP_BITS[f])
        return _ABSENT if raw is None else raw
    if f is Field.ARP_GRATUITOUS:
        spa, tpa = frame.raw(112, 32), frame.raw(192, 32)
        return _ABSENT if spa is None or tpa is None else spa == tpa
    ip = frame.ip
    if f is Field.CT_STATE:
        return state if state is not None and ip is not None else _ABSENT
    if ip is None:
        return _ABSENT
    if f in (Field.IP_SRC, Field.IP_SRC_RANGE):
        return ip[1]
    if f in (Field.IP_DST, Field.IP_DST_RANGE):
        return ip[2]
    if f is Field.IP_DSCP:
        return ip[3]
    ebt_l3 = ex.backend == "ebiptables" and rule.family is Family.ETHER
    if f is Field.IP_PROTO:
        proto = frame.ebt_l4[0] if ebt_l3 else ip[4]
        return _ABSENT if proto is None else proto
    if f in (Field.L4_SPORT, Field.L4_DPORT):
        offset = 0 if f is Field.L4_SPORT else 2
        got = frame.ebt_transport(offset, 2) if ebt_l3 else frame.transport(offset, 2)
        return _ABSENT if got is None else got
    if f in (Field.ICMP_TYPE, Field.ICMP_CODE):
        # `icmp type` carries an implicit `meta l4proto icmp` (icmpv6 for IPv6).
        if ip[4] != (1 if ip[0] == 4 else 58):
            return _ABSENT
        got = frame.transport(0 if f is Field.ICMP_TYPE else 1, 1)
        return _ABSENT if got is None else got
    if f is Field.TCP_FLAGS:
        if ip[4] != 6:
            return _ABSENT
        got = frame.transport(13, 1)
        return _ABSENT if got is None else got
    if f is Field.CONNLIMIT_ABOVE:
        return ex._connections
    if f is Field.IPSET:
        value = m.value
        assert isinstance(value, IPSetMatch)
        return ip[1] if value.flags and value.flags[0] == "src" else ip[2]
    return _ABSENT


def _compare(ex: Explainer, m: Match, got: Any, rule: Rule) -> bool:
    v = m.value
    if isinstance(v, LearntSet):
        if isinstance(got, int):
            return ipaddress.IPv4Address(got) in ex._learnt
        return bool(got in ex._learnt)
    if m.field is Field.CONNLIMIT_ABOVE:
        return bool(got > v)
    if m.field is Field.IPSET:
        assert isinstance(v, IPSetMatch)
        return any(got in net for net in ex._ipsets.get(v.name, ())
                   if net.version == got.version)
    if isinstance(v, MacMatch):
        addr = _mac_int(v.addr)
        mask = _mac_int(v.mask) if v.mask is not None else (1 << 48) - 1
        return bool((got & mask) == (addr & mask))
    if isinstance(v, IntRange):
        return bool(v.lo <= got <= v.hi)
    if isinstance(v, AddrRange):
        return bool(got.version == v.start.version
                    and v.start <= got <= v.end)
    if isinstance(v, ipaddress.IPv4Network | ipaddress.IPv6Network):
        net: IPNetwork = v
        if isinstance(got, int):  # an ARP address from the raw header
            return ipaddress.IPv4Address(got) in net if net.version == 4 else False
        return bool(got.version == net.version and got in net)
    if isinstance(v, TcpFlags):
        mask = sum(_TCP_BITS[x] for x in v.mask)
        want = sum(_TCP_BITS[x] for x in v.set)
        return bool(got & mask == want)
    if isinstance(v, frozenset):
        return got in v
    if isinstance(v, bool):
        return bool(got) == v
    return bool(got == v)


def hook_of(direction: str) -> Hook:
    """libvirt's direction word: 'out' = from the VM, 'in' = to the VM."""
    if direction in ("out", "from-vm"):
        return Hook.FROM_VM
    if direction in ("in", "to-vm"):
        return Hook.TO_VM
    raise ValidationError(f"direction must be 'out' or 'in', not {direction!r}")
