"""The intermediate representation: what must be enforced on one port.

`nwfilter.compile` turns a binding plus a pool snapshot into a `Ruleset`; a
backend turns rulesets into kernel objects.  The IR is backend-neutral and
already carries libvirt's semantics resolved into packet terms:

* every value is a literal (variables are expanded, lists multiplied out);
* directions are resolved: each rule sits in the chain tree of one `Hook`
  (`FROM_VM` = frames the guest sends, libvirt's direction `out`;
  `TO_VM` = frames delivered to the guest, libvirt's `in`); `inout` rules
  appear in both, and matches are already in packet terms (an `ETH_SRC`
  match is the frame's own source MAC), including any src/dst swap libvirt
  applies;
* implicit state rules that libvirt adds for stateful layer-3 rules are
  explicit `CT_STATE` matches here;
* order is final: chains and rules appear in evaluation order.

Evaluation model (the same as libvirt's ebtables + iptables pair): a frame
first walks the layer-2 tree of its hook (`Ruleset.l2`), starting at the
chain named `root`.  `ACCEPT` ends the layer-2 walk and lets the frame go on
to layer 3; `DROP`/`REJECT` end it for good; `RETURN` leaves the current
chain (at `root`: like `ACCEPT`); `CONTINUE` records nothing and goes on with
the next rule; `JUMP` enters `target`.  Falling off the end of a chain is a
`RETURN` (at `root`: an accept); the compiler ends every other chain with an
explicit `ACCEPT` unless its last rule already stops every frame, because
libvirt's ebtables sub-chains have policy ACCEPT.  IP frames that pass
layer 2 then walk the flat layer-3 list of their hook (`Ruleset.l3`), in
order; the first rule with a terminal verdict decides, `RETURN` and falling
off the end accept.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass, field
from enum import Enum

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Packet constants the compiler and the backends both write into rules
# (<linux/if_ether.h> names).
ETH_P_IP = 0x0800
ETH_P_ARP = 0x0806
ETH_P_RARP = 0x8035
ETH_P_8021Q = 0x8100
ETH_P_IPV6 = 0x86DD
STP_GROUP_MAC = "01:80:c2:00:00:00"  # bridge group address, where BPDUs go


class Hook(Enum):
    """The two directions of a port."""

    FROM_VM = "from-vm"  # libvirt direction 'out': the guest transmits
    TO_VM = "to-vm"  # libvirt direction 'in': the guest receives


class Verdict(Enum):
    ACCEPT = "accept"
    DROP = "drop"
    REJECT = "reject"
    RETURN = "return"
    CONTINUE = "continue"
    JUMP = "jump"


class Family(Enum):
    """Which layer a rule lives in and which header it inspects."""

    ETHER = "ether"  # layer 2 (libvirt's ebtables rules: mac, vlan, stp, arp, rarp, ip, ipv6)
    IPV4 = "ipv4"  # layer 3 (libvirt's iptables rules: tcp, udp, icmp, all, ...)
    IPV6 = "ipv6"  # layer 3 (libvirt's ip6tables rules: tcp-ipv6, icmpv6, ...)


class Field(Enum):
    """A packet field a match inspects.  The value type is given per field."""

    # Ethernet header
    ETH_SRC = "eth-src"  # MacMatch
    ETH_DST = "eth-dst"  # MacMatch
    ETH_TYPE = "eth-type"  # int (ethertype; for VLAN frames the outer one, 0x8100)
    # 802.1Q
    VLAN_ID = "vlan-id"  # int 0-4095
    VLAN_ENCAP = "vlan-encap"  # int, the encapsulated ethertype
    # STP BPDU fields (frames to 01:80:c2:00:00:00)
    STP_TYPE = "stp-type"  # int
    STP_FLAGS = "stp-flags"  # int
    STP_ROOT_PRIO = "stp-root-prio"  # IntRange
    STP_ROOT_ADDR = "stp-root-addr"  # MacMatch
    STP_ROOT_COST = "stp-root-cost"  # IntRange
    STP_SENDER_PRIO = "stp-sender-prio"  # IntRange
    STP_SENDER_ADDR = "stp-sender-addr"  # MacMatch
    STP_PORT = "stp-port"  # IntRange
    STP_MSG_AGE = "stp-msg-age"  # IntRange
    STP_MAX_AGE = "stp-max-age"  # IntRange
    STP_HELLO_TIME = "stp-hello-time"  # IntRange
    STP_FORWARD_DELAY = "stp-forward-delay"  # IntRange
    # ARP / RARP
    ARP_HTYPE = "arp-htype"  # int
    ARP_PTYPE = "arp-ptype"  # int
    ARP_OP = "arp-op"  # int
    ARP_SHA = "arp-sha"  # MacMatch
    ARP_THA = "arp-tha"  # MacMatch
    ARP_SPA = "arp-spa"  # IPNetwork (v4)
    ARP_TPA = "arp-tpa"  # IPNetwork (v4)
    ARP_GRATUITOUS = "arp-gratuitous"  # bool (sender IP == target IP)
    # IPv4 / IPv6 header
    IP_SRC = "ip-src"  # IPNetwork
    IP_DST = "ip-dst"  # IPNetwork
    IP_SRC_RANGE = "ip-src-range"  # AddrRange
    IP_DST_RANGE = "ip-dst-range"  # AddrRange
    IP_PROTO = "ip-proto"  # int (IPv4 protocol / IPv6 next header)
    IP_DSCP = "ip-dscp"  # int 0-63
    # Transport
    L4_SPORT = "l4-sport"  # IntRange
    L4_DPORT = "l4-dport"  # IntRange
    ICMP_TYPE = "icmp-type"  # IntRange (ICMP or ICMPv6 by family)
    ICMP_CODE = "icmp-code"  # IntRange
    TCP_FLAGS = "tcp-flags"  # TcpFlags
    # Connection tracking and friends
    CT_STATE = "ct-state"  # frozenset[CtState]
    CONNLIMIT_ABOVE = "connlimit-above"  # int
    IPSET = "ipset"  # IPSetMatch


class CtState(Enum):
    NEW = "new"
    ESTABLISHED = "established"
    RELATED = "related"
    INVALID = "invalid"
    UNTRACKED = "untracked"  # libvirt's NONE


class TcpFlag(Enum):
    SYN = "syn"
    ACK = "ack"
    URG = "urg"
    PSH = "psh"
    FIN = "fin"
    RST = "rst"


@dataclass(frozen=True, order=True)
class MacMatch:
    """A MAC address with an optional mask, both lower-case colon form."""

    addr: str
    mask: str | None = None


@dataclass(frozen=True, order=True)
class IntRange:
    """An inclusive range; `lo == hi` for a single value."""

    lo: int
    hi: int

    @classmethod
    def single(cls, value: int) -> IntRange:
        return cls(value, value)


@dataclass(frozen=True)
class AddrRange:
    """An inclusive address range (libvirt's srcipfrom/srcipto)."""

    start: IPAddress
    end: IPAddress


@dataclass(frozen=True)
class TcpFlags:
    """Examine the flags in `mask`; of those, exactly `set` must be set."""

    mask: frozenset[TcpFlag]
    set: frozenset[TcpFlag]


@dataclass(frozen=True)
class IPSetMatch:
    """Membership in a named address set; `flags` are 'src'/'dst' per dimension."""

    name: str
    flags: tuple[str, ...]


@dataclass(frozen=True, order=True)
class LearntSet:
    """The port's learnt addresses of one IP version (4: `IP`, 6: `IPV6`),
    as one named set the kernel holds: a match on it stands for libvirt's
    one rule per address (see `Learning`)."""

    version: int


@dataclass(frozen=True, order=True)
class LearntAddr:
    """One element of a port's learnt address sets."""

    address: IPAddress
    expires: float | None = None  # wall-clock end of the lease; None: no lease


MatchValue = (
    MacMatch
    | LearntSet
    | IntRange
    | AddrRange
    | TcpFlags
    | IPSetMatch
    | ipaddress.IPv4Network
    | ipaddress.IPv6Network
    | frozenset[CtState]
    | int
    | bool
)


@dataclass(frozen=True)
class Match:
    """One condition of a rule; `negate` inverts this condition alone."""

    field: Field
    value: MatchValue
    negate: bool = False


@dataclass(frozen=True)
class Origin:
    """Where a concrete rule came from, for errors and for humans."""

    filter: str  # name of the filter that holds the rule
    index: int  # 1-based position of the rule among that filter's entries
    text: str = ""  # short description, e.g. "<tcp dstportstart='22'>"

    def __str__(self) -> str:
        return f"filter '{self.filter}' rule {self.index}" + (f" {self.text}" if self.text else "")


@dataclass(frozen=True)
class Rule:
    """A concrete rule: all of `matches` hold → `verdict`."""

    family: Family
    matches: tuple[Match, ...]
    verdict: Verdict
    target: str | None = None  # chain name when verdict is JUMP
    priority: int = 500
    comment: str | None = None
    origin: Origin | None = None


@dataclass(frozen=True)
class Chain:
    """A layer-2 chain of one hook; `name` is libvirt's chain name ('root', 'arp', 'ipv4-x')."""

    name: str
    priority: int
    rules: tuple[Rule, ...]


@dataclass(frozen=True)
class Port:
    """The port a ruleset is for."""

    portdev: str  # host-side interface name, e.g. vnet0
    mac: str  # the guest's MAC, lower-case
    linkdev: str | None = None  # for macvtap-style ports
    owner_name: str = ""
    owner_uuid: str = ""


@dataclass(frozen=True)
class Learning:
    """A port whose `IP`/`IPV6` are learnt into sets instead of rules.

    The port's rules match `LearntSet` values where the filter uses the
    variables; `addresses` are the sets' elements (each with its lease), so
    that learning changes elements, never chains.  While `learning` is set
    and no IPv4 address is in `addresses`, the port is held to the rules of
    `learning` (one flat list per hook, evaluated like a root chain that
    ends the walk) instead of its chains: the learning ruleset.  A positive
    match on a set is exactly libvirt's one rule per value (the rules are
    adjacent and share the verdict); a set that is empty matches nothing,
    as zero rules would."""

    learning: dict[Hook, tuple[Rule, ...]] = field(default_factory=dict)
    addresses: tuple[LearntAddr, ...] = ()

    def of(self, version: int) -> tuple[LearntAddr, ...]:
        return tuple(a for a in self.addresses if a.address.version == version)

    def held(self) -> bool:
        """Whether the learning rules are in force (no IPv4 address yet)."""
        return bool(self.learning) and not self.of(4)


@dataclass(frozen=True)
class Ruleset:
    """Everything to enforce on one port, in evaluation order."""

    port: Port
    l2: dict[Hook, tuple[Chain, ...]] = field(default_factory=dict)  # root chain first
    l3: dict[Hook, tuple[Rule, ...]] = field(default_factory=dict)
    filter_names: frozenset[str] = frozenset()  # every filter the ruleset was built from
    learn: Learning | None = None  # addresses learnt into sets (None: none)

    def chains(self, hook: Hook) -> tuple[Chain, ...]:
        return self.l2.get(hook, ())

    def l3_rules(self, hook: Hook) -> tuple[Rule, ...]:
        return self.l3.get(hook, ())

    def set_versions(self, *, l3: bool | None = None) -> frozenset[int]:
        """The versions of the learnt address sets the rules match (with
        `l3`, only those of layer 3 (True) or of layer 2 (False))."""
        rules: list[Rule] = []
        if l3 is not True:
            rules.extend(r for chains in self.l2.values() for c in chains for r in c.rules)
        if l3 is not False:
            rules.extend(r for hook_rules in self.l3.values() for r in hook_rules)
        return frozenset(m.value.version for r in rules for m in r.matches
                         if isinstance(m.value, LearntSet))


def drop_all(port: Port) -> Ruleset:
    """A ruleset that drops everything: what a port gets when its filters
    cannot be compiled at start, so that it fails closed."""
    rule = Rule(Family.ETHER, (), Verdict.DROP, priority=0, comment="nwfilter: fail closed")
    chain = (Chain("root", 0, (rule,)),)
    return Ruleset(port=port, l2={Hook.FROM_VM: chain, Hook.TO_VM: chain})


@dataclass(frozen=True)
class Changes:
    """One transaction for a backend: rulesets to install or replace, ports to clear.

    With `replace_all`, `set` is the complete state: the backend drops every
    other object it owns and recreates its tables in the same transaction
    (a backend does so when the tables' layout changed; a starting engine
    reconciles instead, see `Backend.reconcile`).
    """

    set: tuple[Ruleset, ...] = ()
    remove: tuple[str, ...] = ()  # portdev names
    replace_all: bool = False

    def is_empty(self) -> bool:
        return not self.set and not self.remove and not self.replace_all
