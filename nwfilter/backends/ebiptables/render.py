"""IR → libvirt's ebtables/iptables/ip6tables rules, as the `*-save` tools print them.

Pure: no kernel access.  A port's rules come out in the form
`ebtables-save -t nat`, `iptables-save -t filter` and `ip6tables-save -t
filter` print them (options in the order those tools print, names where they
print names), so that the text read back from the kernel compares equal to
the text rendered, rule by rule, and both equal what libvirt 9's ebiptables
driver puts there for the same filter and port.

Layout (libvirt's):

* ebtables `nat`: `-A PREROUTING -i PORT -j libvirt-I-PORT` (frames from the
  VM) and `-A POSTROUTING -o PORT -j libvirt-O-PORT` (frames to it); the IR's
  sub-chain X of a hook is `I-PORT-X` / `O-PORT-X`, created with policy
  ACCEPT (libvirt's chain policy, so the compiler's explicit end-of-chain
  accept is not written as a rule).
* iptables/ip6tables `filter`, per family the port has layer-3 rules in:
  the shared chains `libvirt-in`, `libvirt-out`, `libvirt-in-post`,
  `libvirt-host-in` (jumped to first thing from FORWARD and INPUT), and per
  port `FI-PORT` (from the VM, bridged), `HI-PORT` (from the VM to the host:
  the same rules) and `FO-PORT` (to the VM), reached by `physdev` matches.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

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
    LearntSet,
    MacMatch,
    Match,
    Origin,
    Rule,
    Ruleset,
    TcpFlag,
    TcpFlags,
    Verdict,
)

EB = "eb"  # ebtables, table nat
IP4 = "ip4"  # iptables, table filter
IP6 = "ip6"  # ip6tables, table filter
TABLES = (EB, IP4, IP6)

#: Shared layer-3 chains and the base-chain rules that lead to them, in the
#: order libvirt puts them first in INPUT and FORWARD.
SHARED_CHAINS = ("libvirt-host-in", "libvirt-in", "libvirt-in-post", "libvirt-out")
BASE_JUMPS = (("INPUT", "-j libvirt-host-in"), ("FORWARD", "-j libvirt-in"),
              ("FORWARD", "-j libvirt-out"), ("FORWARD", "-j libvirt-in-post"))
OWNER_CHAIN = "nwfilter-owner"  # iptables filter: one comment rule naming the root

# ebtables chain names hold at most 31 bytes, x_tables ones 28.
EB_NAME_MAX = 31
XT_NAME_MAX = 28
_PORT_RE = re.compile(r"[A-Za-z0-9_.-]{1,15}")

_ETHERTYPES = {  # ebtables-nft's own table (what ebtables-save prints)
    0x0800: "IPv4", 0x0805: "X25", 0x0806: "ARP", 0x0808: "FR_ARP", 0x08FF: "BPQ",
    0x6000: "DEC", 0x6001: "DNA_DL", 0x6002: "DNA_RC", 0x6003: "DNA_RT", 0x6004: "LAT",
    0x6005: "DIAG", 0x6006: "CUST", 0x6007: "SCA", 0x6558: "TEB", 0x6559: "RAW_FR",
    0x8035: "RARP", 0x80F3: "AARP", 0x809B: "ATALK", 0x8100: "802_1Q", 0x8137: "IPX",
    0x8191: "NetBEUI", 0x86DD: "IPv6", 0x880B: "PPP", 0x884C: "ATMMPOA",
    0x8863: "PPP_DISC", 0x8864: "PPP_SES", 0x8884: "ATMFATE", 0x9000: "LOOP",
}
_PROTOS = {1: "icmp", 2: "igmp", 6: "tcp", 17: "udp", 33: "dccp", 47: "gre", 50: "esp",
           51: "ah", 58: "ipv6-icmp", 132: "sctp", 136: "udplite"}
_PORT_MODULES = {6: "tcp", 17: "udp", 132: "sctp", 33: "dccp"}
_ARP_OPS = {1: "Request", 2: "Reply", 3: "Request_Reverse", 4: "Reply_Reverse",
            5: "DRARP_Request", 6: "DRARP_Reply", 7: "DRARP_Error", 8: "InARP_Request",
            9: "ARP_NAK"}
_MAC_NAMES = {("ff:ff:ff:ff:ff:ff", None): "Broadcast",
              ("01:80:c2:00:00:00", None): "BGA",
              ("01:80:c2:00:00:00", "ff:ff:ff:ff:ff:ff"): "BGA",
              ("01:00:00:00:00:00", "01:00:00:00:00:00"): "Multicast",
              ("00:00:00:00:00:00", "01:00:00:00:00:00"): "Unicast"}
_TCP_FLAG_ORDER = (TcpFlag.FIN, TcpFlag.SYN, TcpFlag.RST, TcpFlag.PSH, TcpFlag.ACK,
                   TcpFlag.URG)
_CT_ORDER = (CtState.INVALID, CtState.NEW, CtState.RELATED, CtState.ESTABLISHED,
             CtState.UNTRACKED)
_STP_OPTIONS = (
    (Field.STP_TYPE, "--stp-type"), (Field.STP_FLAGS, "--stp-flags"),
    (Field.STP_ROOT_PRIO, "--stp-root-prio"), (Field.STP_ROOT_ADDR, "--stp-root-addr"),
    (Field.STP_ROOT_COST, "--stp-root-cost"), (Field.STP_SENDER_PRIO, "--stp-sender-prio"),
    (Field.STP_SENDER_ADDR, "--stp-sender-addr"), (Field.STP_PORT, "--stp-port"),
    (Field.STP_MSG_AGE, "--stp-msg-age"), (Field.STP_MAX_AGE, "--stp-max-age"),
    (Field.STP_HELLO_TIME, "--stp-hello-time"),
    (Field.STP_FORWARD_DELAY, "--stp-forward-delay"),
)


@dataclass
class Tables:
    """What one or more ports put in the three tables.

    `chains`: per table, our chains (name -> rule specs, each the text
    after `-A NAME `); `links`: per table, our rules in chains we do not own
    (base and shared chains), as (chain, spec) in order."""

    chains: dict[str, dict[str, tuple[str, ...]]] = field(
        default_factory=lambda: {t: {} for t in TABLES})
    links: dict[str, list[tuple[str, str]]] = field(
        default_factory=lambda: {t: [] for t in TABLES})

    def families(self) -> frozenset[str]:
        """The layer-3 tables holding chains (their shared chains are needed)."""
        return frozenset(t for t in (IP4, IP6) if self.chains[t])

    def merge(self, other: Tables) -> None:
        for table in TABLES:
            self.chains[table].update(other.chains[table])
            self.links[table].extend(other.links[table])


def check_port(portdev: str) -> None:
    """Port names become `-i`/`--physdev-in` values and parts of chain names;
    `+` would be a wildcard there, quoting has no place in them."""
    if not _PORT_RE.fullmatch(portdev):
        raise UnsupportedError(
            f"port name '{portdev}' cannot be used with the ebiptables backend "
            "(letters, digits, '_', '.', '-' only, at most 15)")


def eb_chain(hook: Hook, portdev: str, chain: str) -> str:
    letter = "I" if hook is Hook.FROM_VM else "O"
    return f"libvirt-{letter}-{portdev}" if chain == "root" else f"{letter}-{portdev}-{chain}"


def ip_chains(portdev: str) -> tuple[str, str, str]:
    """FI (from the VM, bridged), FO (to the VM), HI (from the VM to the host)."""
    return f"FI-{portdev}", f"FO-{portdev}", f"HI-{portdev}"


def port_chain_names(portdev: str) -> tuple[str, ...]:
    """Name prefixes/forms of a port's chains (for telling ours apart)."""
    return (f"libvirt-I-{portdev}", f"libvirt-O-{portdev}", f"I-{portdev}-",
            f"O-{portdev}-", *ip_chains(portdev))


# ------------------------------------------------------------------ values


def _mac(value: MacMatch) -> str:
    name = _MAC_NAMES.get((value.addr, value.mask))
    if name is not None:
        return name
    if value.mask is None or value.mask == "ff:ff:ff:ff:ff:ff":
        return value.addr
    return f"{value.addr}/{value.mask}"


def _ethertype(value: int) -> str:
    return _ETHERTYPES.get(value, f"0x{value:x}")


def _eb_net(value: object) -> str:
    assert isinstance(value, ipaddress.IPv4Network | ipaddress.IPv6Network)
    if value.prefixlen == value.max_prefixlen:
        return str(value.network_address)
    return str(value)


def _range(value: object, sep: str = ":") -> str:
    assert isinstance(value, IntRange)
    return str(value.lo) if value.lo == value.hi else f"{value.lo}{sep}{value.hi}"


def _proto(value: int) -> str:
    return _PROTOS.get(value, str(value))


def _opt(option: str, value: str, negate: bool) -> str:
    """ebtables-save's form: the '!' after the option."""
    return f"{option} ! {value}" if negate else f"{option} {value}"


def _xopt(option: str, value: str, negate: bool) -> str:
    """iptables-save's form: the '!' before the option."""
    return f"! {option} {value}" if negate else f"{option} {value}"


def _unsupported(rule: Rule, what: str) -> UnsupportedError:
    where = f" ({rule.origin})" if rule.origin else ""
    return UnsupportedError(f"the ebiptables backend cannot express {what}{where}")


# ------------------------------------------------------------------ layer 2


def is_policy_rule(chain: Chain, index: int) -> bool:
    """The compiler's explicit accept at the end of a sub-chain: libvirt's
    chain policy ACCEPT, which the ebtables chain carries instead."""
    rule = chain.rules[index]
    return (chain.name != "root" and index == len(chain.rules) - 1 and not rule.matches
            and rule.verdict is Verdict.ACCEPT and rule.origin is not None
            and rule.origin.index == 0)


def eb_rule(rule: Rule, hook: Hook, portdev: str) -> str:
    by = {m.field: m for m in rule.matches}
    if len(by) != len(rule.matches):
        raise _unsupported(rule, "a field matched twice")
    if any(isinstance(each.value, LearntSet) for each in rule.matches):
        raise _unsupported(rule, "learnt address sets")
    m: Match | None
    parts: list[str] = []
    used: set[Field] = set()

    def take(f: Field) -> Match | None:
        m = by.get(f)
        if m is not None:
            used.add(f)
        return m

    if (m := take(Field.ETH_TYPE)) is not None:
        assert isinstance(m.value, int)
        parts.append(_opt("-p", _ethertype(m.value), m.negate))
    for f, option in ((Field.ETH_SRC, "-s"), (Field.ETH_DST, "-d")):
        if (m := take(f)) is not None:
            assert isinstance(m.value, MacMatch)
            parts.append(_opt(option, _mac(m.value), m.negate))
    if (m := take(Field.VLAN_ID)) is not None:
        parts.append(_opt("--vlan-id", str(m.value), m.negate))
    if (m := take(Field.VLAN_ENCAP)) is not None:
        assert isinstance(m.value, int)
        parts.append(_opt("--vlan-encap", _ethertype(m.value), m.negate))
    for f, option in _STP_OPTIONS:
        if (m := take(f)) is None:
            continue
        if isinstance(m.value, MacMatch):
            text = _mac(m.value)
        elif f is Field.STP_TYPE:
            text = {0: "config", 0x80: "tcn"}.get(int(m.value), str(m.value))  # type: ignore[arg-type]
        elif f is Field.STP_FLAGS:
            text = {1: "topology-change", 0x80: "topology-change-ack"}.get(
                int(m.value), str(m.value))  # type: ignore[arg-type]
        else:
            text = _range(m.value)
        parts.append(_opt(option, text, m.negate))
    if (m := take(Field.ARP_OP)) is not None:
        assert isinstance(m.value, int)
        parts.append(_opt("--arp-op", _ARP_OPS.get(m.value, str(m.value)), m.negate))
    if (m := take(Field.ARP_HTYPE)) is not None:
        parts.append(_opt("--arp-htype", str(m.value), m.negate))
    if (m := take(Field.ARP_PTYPE)) is not None:
        assert isinstance(m.value, int)
        parts.append(_opt("--arp-ptype", _ethertype(m.value), m.negate))
    for f, option in ((Field.ARP_SPA, "--arp-ip-src"), (Field.ARP_TPA, "--arp-ip-dst")):
        if (m := take(f)) is not None:
            parts.append(_opt(option, _eb_net(m.value), m.negate))
    for f, option in ((Field.ARP_SHA, "--arp-mac-src"), (Field.ARP_THA, "--arp-mac-dst")):
        if (m := take(f)) is not None:
            assert isinstance(m.value, MacMatch)
            parts.append(_opt(option, _mac(m.value), m.negate))
    if (m := take(Field.ARP_GRATUITOUS)) is not None:
        if m.value is not True:
            raise _unsupported(rule, "gratuitous='false'")
        parts.append("! --arp-gratuitous" if m.negate else "--arp-gratuitous")
    eth = by.get(Field.ETH_TYPE)
    v6 = eth is not None and eth.value == 0x86DD
    ip = "--ip6" if v6 else "--ip"
    for f, suffix in ((Field.IP_SRC, "-src"), (Field.IP_DST, "-dst")):
        if (m := take(f)) is not None:
            parts.append(_opt(ip + suffix, _eb_net(m.value), m.negate))
    if (m := take(Field.IP_PROTO)) is not None:
        assert isinstance(m.value, int)
        parts.append(_opt(ip + "-proto", _proto(m.value), m.negate))
    for f, suffix in ((Field.L4_SPORT, "-sport"), (Field.L4_DPORT, "-dport")):
        if (m := take(f)) is not None:
            parts.append(_opt(ip + suffix, _range(m.value), m.negate))
    rest = set(by) - used
    if rest:
        names = ", ".join(sorted(f.value for f in rest))
        raise _unsupported(rule, f"{names} in layer 2")
    if rule.verdict is Verdict.JUMP:
        assert rule.target is not None
        parts.append("-j " + eb_chain(hook, portdev, rule.target))
    else:
        # ebtables has no REJECT; libvirt writes DROP for it.
        target = {Verdict.ACCEPT: "ACCEPT", Verdict.DROP: "DROP", Verdict.REJECT: "DROP",
                  Verdict.RETURN: "RETURN", Verdict.CONTINUE: "CONTINUE"}[rule.verdict]
        parts.append("-j " + target)
    return " ".join(parts)


# ------------------------------------------------------------------ layer 3


def _implicit_state(rule: Rule) -> bool:
    """Whether a CT_STATE match is libvirt's implicit one (no `state`
    attribute in the source rule): libvirt then adds `--ctdir`."""
    text = rule.origin.text if rule.origin is not None else ""
    return " state=" not in text and "!state=" not in text


def ct_direction(rule: Rule, m: Match) -> str | None:
    """The conntrack direction libvirt adds to the CT_STATE match `m` of
    `rule` (`-m conntrack --ctdir ...`): REPLY for its implicit ESTABLISHED,
    ORIGINAL for its implicit NEW,ESTABLISHED, else none."""
    if m.negate or not _implicit_state(rule):
        return None
    if m.value == frozenset({CtState.ESTABLISHED}):
        return "REPLY"
    if m.value == frozenset({CtState.NEW, CtState.ESTABLISHED}):
        return "ORIGINAL"
    return None


def ip_rule(rule: Rule, v6: bool) -> str:
    by = {m.field: m for m in rule.matches}
    if len(by) != len(rule.matches):
        raise _unsupported(rule, "a field matched twice")
    m: Match | None
    head: list[str] = []
    mods: list[str] = []
    used: set[Field] = set()

    def take(f: Field) -> Match | None:
        m = by.get(f)
        if m is not None:
            used.add(f)
        if m is not None and isinstance(m.value, LearntSet):
            raise _unsupported(rule, "learnt address sets")
        return m

    host = 128 if v6 else 32
    for f, option in ((Field.IP_SRC, "-s"), (Field.IP_DST, "-d")):
        if (m := take(f)) is not None:
            assert isinstance(m.value, ipaddress.IPv4Network | ipaddress.IPv6Network)
            head.append(_xopt(option, f"{m.value.network_address}/{m.value.prefixlen}",
                              m.negate))
    proto = take(Field.IP_PROTO)
    if proto is not None:
        assert isinstance(proto.value, int)
        head.append(_xopt("-p", _proto(proto.value), proto.negate))
    del host
    if (m := take(Field.ETH_SRC)) is not None:
        assert isinstance(m.value, MacMatch)
        if m.value.mask not in (None, "ff:ff:ff:ff:ff:ff"):
            raise _unsupported(rule, "a masked source MAC in layer 3")
        mods.append("-m mac " + _xopt("--mac-source", m.value.addr, m.negate))
    for f, option in ((Field.IP_SRC_RANGE, "--src-range"), (Field.IP_DST_RANGE, "--dst-range")):
        if (m := take(f)) is not None:
            assert isinstance(m.value, AddrRange)
            mods.append("-m iprange " + _xopt(option, f"{m.value.start}-{m.value.end}",
                                              m.negate))
    if (m := take(Field.IP_DSCP)) is not None:
        assert isinstance(m.value, int)
        mods.append("-m dscp " + _xopt("--dscp", f"0x{m.value:02x}", m.negate))
    sport, dport, flags = take(Field.L4_SPORT), take(Field.L4_DPORT), take(Field.TCP_FLAGS)
    if sport or dport or flags:
        module = _PORT_MODULES.get(int(proto.value)) if proto and not proto.negate else None  # type: ignore[arg-type]
        if module is None or (flags is not None and module != "tcp"):
            raise _unsupported(rule, "port or flag matches without tcp/udp/sctp/dccp")
        opts = []
        if sport is not None:
            opts.append(_xopt("--sport", _range(sport.value), sport.negate))
        if dport is not None:
            opts.append(_xopt("--dport", _range(dport.value), dport.negate))
        if flags is not None:
            assert isinstance(flags.value, TcpFlags)
            mask = ",".join(f.name for f in _TCP_FLAG_ORDER if f in flags.value.mask) or "NONE"
            on = ",".join(f.name for f in _TCP_FLAG_ORDER if f in flags.value.set) or "NONE"
            opts.append(_xopt("--tcp-flags", f"{mask} {on}", flags.negate))
        mods.append(f"-m {module} " + " ".join(opts))
    itype, icode = take(Field.ICMP_TYPE), take(Field.ICMP_CODE)
    if itype is not None or icode is not None:
        if itype is None:
            raise _unsupported(rule, "an ICMP code without a type")
        assert isinstance(itype.value, IntRange)
        if itype.value.lo != itype.value.hi or (
                icode is not None and (not isinstance(icode.value, IntRange)
                                       or icode.value.lo != icode.value.hi
                                       or icode.negate != itype.negate)):
            raise _unsupported(rule, "ICMP type or code ranges")
        text = str(itype.value.lo)
        if icode is not None:
            assert isinstance(icode.value, IntRange)
            text += f"/{icode.value.lo}"
        if v6:
            mods.append("-m icmp6 " + _xopt("--icmpv6-type", text, itype.negate))
        else:
            mods.append("-m icmp " + _xopt("--icmp-type", text, itype.negate))
    if (m := take(Field.CT_STATE)) is not None:
        assert isinstance(m.value, frozenset)
        states = ",".join(s.name for s in _CT_ORDER if s in m.value)
        text = "-m conntrack " + _xopt("--ctstate", states, m.negate)
        ctdir = ct_direction(rule, m)
        if ctdir is not None:
            text += f" -m conntrack --ctdir {ctdir}"
        mods.append(text)
    if (m := take(Field.IPSET)) is not None:
        assert isinstance(m.value, IPSetMatch)
        mods.append("-m set " + _xopt("--match-set", f"{m.value.name} {','.join(m.value.flags)}",
                                      m.negate))
    if (m := take(Field.CONNLIMIT_ABOVE)) is not None:
        mods.append(f"-m connlimit --connlimit-above {m.value} --connlimit-mask "
                    f"{128 if v6 else 32} --connlimit-saddr")
    rest = set(by) - used
    if rest:
        names = ", ".join(sorted(f.value for f in rest))
        raise _unsupported(rule, f"{names} in layer 3")
    if rule.comment:
        mods.append(f'-m comment --comment "{_comment(rule.comment)}"')
    if rule.verdict is Verdict.REJECT:
        unreach = "icmp6-port-unreachable" if v6 else "icmp-port-unreachable"
        mods.append(f"-j REJECT --reject-with {unreach}")
    elif rule.verdict in (Verdict.ACCEPT, Verdict.DROP, Verdict.RETURN):
        mods.append("-j " + rule.verdict.name)
    elif rule.verdict is not Verdict.CONTINUE:
        raise _unsupported(rule, f"verdict {rule.verdict.value} in layer 3")
    return " ".join(head + mods)


def _comment(text: str) -> str:
    """Comments travel in restore files between double quotes: printable
    ASCII only, no quote or backslash, at most 256 bytes (xt_comment)."""
    clean = "".join(c if " " <= c <= "~" and c not in '"\\' else "_" for c in text)
    return clean[:255]


# ------------------------------------------------------------------ a port


def render_port(rs: Ruleset) -> Tables:
    """The chains and links of one port (raises `UnsupportedError`)."""
    portdev = rs.port.portdev
    check_port(portdev)
    if rs.learn is not None and rs.learn.held():
        raise UnsupportedError(
            f"port '{portdev}': address learning is not supported by the ebiptables backend")
    out = Tables()
    for hook, base, flag in ((Hook.FROM_VM, "PREROUTING", "-i"),
                             (Hook.TO_VM, "POSTROUTING", "-o")):
        chains = rs.chains(hook)
        if not chains:
            continue
        for chain in chains:
            name = eb_chain(hook, portdev, chain.name)
            if len(name) > EB_NAME_MAX:
                raise UnsupportedError(
                    f"ebtables chain name '{name}' is longer than {EB_NAME_MAX} bytes")
            out.chains[EB][name] = tuple(
                eb_rule(rule, hook, portdev) for i, rule in enumerate(chain.rules)
                if not is_policy_rule(chain, i))
        out.links[EB].append((base, f"{flag} {portdev} -j {eb_chain(hook, portdev, 'root')}"))
    fi, fo, hi = ip_chains(portdev)
    if len(fi) > XT_NAME_MAX:
        raise UnsupportedError(f"iptables chain name '{fi}' is longer than {XT_NAME_MAX} bytes")
    for table, family in ((IP4, Family.IPV4), (IP6, Family.IPV6)):
        v6 = family is Family.IPV6
        from_vm = [r for r in rs.l3_rules(Hook.FROM_VM) if r.family is family]
        to_vm = [r for r in rs.l3_rules(Hook.TO_VM) if r.family is family]
        if not from_vm and not to_vm:
            continue
        into = tuple(ip_rule(r, v6) for r in from_vm)
        out.chains[table][fi] = into
        out.chains[table][fo] = tuple(ip_rule(r, v6) for r in to_vm)
        out.chains[table][hi] = into
        out.links[table].extend((
            ("libvirt-out", f"-m physdev --physdev-out {portdev} --physdev-is-bridged -g {fo}"),
            ("libvirt-in", f"-m physdev --physdev-in {portdev} -g {fi}"),
            ("libvirt-in-post", f"-m physdev --physdev-in {portdev} -j ACCEPT"),
            ("libvirt-host-in", f"-m physdev --physdev-in {portdev} -g {hi}"),
        ))
    return out


def port_origins(rs: Ruleset) -> dict[str, dict[str, tuple[Origin | None, ...]]]:
    """Per table and chain of `render_port(rs)`, the origin of each rule in
    order (what ties a counted rule back to the filter and rule of the XML)."""
    portdev = rs.port.portdev
    out: dict[str, dict[str, tuple[Origin | None, ...]]] = {t: {} for t in TABLES}
    for hook in (Hook.FROM_VM, Hook.TO_VM):
        for chain in rs.chains(hook):
            out[EB][eb_chain(hook, portdev, chain.name)] = tuple(
                rule.origin for i, rule in enumerate(chain.rules)
                if not is_policy_rule(chain, i))
    fi, fo, hi = ip_chains(portdev)
    for table, family in ((IP4, Family.IPV4), (IP6, Family.IPV6)):
        from_vm = tuple(r.origin for r in rs.l3_rules(Hook.FROM_VM) if r.family is family)
        to_vm = tuple(r.origin for r in rs.l3_rules(Hook.TO_VM) if r.family is family)
        if from_vm or to_vm:
            out[table].update({fi: from_vm, fo: to_vm, hi: from_vm})
    return out


def render_all(rulesets: Iterable[Ruleset]) -> Tables:
    out = Tables()
    for rs in rulesets:
        out.merge(render_port(rs))
    return out
