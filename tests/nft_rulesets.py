"""Hand-built IR rulesets for the nft backend's tests and benchmark.

`clean_traffic(port)` mirrors what libvirt's clean-traffic filter compiles to
for one port: MAC and IPv4 anti-spoofing, ARP sender checks, DHCP, IPv4 and
ARP accepted, every other layer-2 protocol dropped.  `uncounted(text)` is an
nft listing without its counter values, which stray frames move.
"""

from __future__ import annotations

import ipaddress
import re

from nwfilter.ir import (
    Chain,
    Family,
    Field,
    Hook,
    IntRange,
    MacMatch,
    Match,
    Origin,
    Port,
    Rule,
    Ruleset,
    Verdict,
)

E = Family.ETHER

_COUNTER_VALUES = re.compile(r"counter packets \d+ bytes \d+")


def uncounted(text: str) -> str:
    """An nft listing without its counter values (a stray frame moves them)."""
    return _COUNTER_VALUES.sub("counter", text)


def net(text: str) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(text)


def _r(
    matches: list[Match], verdict: Verdict, flt: str, idx: int, target: str | None = None,
    family: Family = E,
) -> Rule:
    return Rule(family=family, matches=tuple(matches), verdict=verdict, target=target,
                origin=Origin(flt, idx))


def clean_traffic(portdev: str, mac: str, ip: str) -> Ruleset:
    ipm = Match(Field.ETH_TYPE, 0x0800)
    arpm = Match(Field.ETH_TYPE, 0x0806)
    out_root = Chain("root", 0, (
        _r([], Verdict.JUMP, "no-mac-spoofing", 1, target="mac"),
        _r([ipm, Match(Field.IP_PROTO, 17), Match(Field.IP_SRC, net("0.0.0.0/32")),
            Match(Field.IP_DST, net("255.255.255.255/32")),
            Match(Field.L4_SPORT, IntRange.single(68)), Match(Field.L4_DPORT, IntRange.single(67))],
           Verdict.ACCEPT, "allow-dhcp", 1),
        _r([ipm], Verdict.JUMP, "no-ip-spoofing", 0, target="ipv4-ip"),
        _r([ipm], Verdict.ACCEPT, "clean-traffic", 3),
        _r([arpm], Verdict.JUMP, "no-arp-mac-spoofing", 0, target="arp-mac"),
        _r([arpm], Verdict.JUMP, "no-arp-ip-spoofing", 0, target="arp-ip"),
        _r([arpm], Verdict.ACCEPT, "clean-traffic", 5),
        _r([], Verdict.DROP, "no-other-l2-traffic", 1),
    ))
    mac_chain = Chain("mac", -800, (
        _r([Match(Field.ETH_SRC, MacMatch(mac))], Verdict.RETURN, "no-mac-spoofing", 1),
        _r([], Verdict.DROP, "no-mac-spoofing", 2),
    ))
    ip_chain = Chain("ipv4-ip", -710, (
        _r([ipm, Match(Field.IP_PROTO, 17), Match(Field.IP_SRC, net("0.0.0.0/32"))],
           Verdict.RETURN, "no-ip-spoofing", 1),
        _r([ipm, Match(Field.IP_SRC, net(f"{ip}/32"))], Verdict.RETURN, "no-ip-spoofing", 2),
        _r([], Verdict.DROP, "no-ip-spoofing", 3),
    ))
    arp_mac = Chain("arp-mac", -520, (
        _r([arpm, Match(Field.ARP_SHA, MacMatch(mac))], Verdict.RETURN, "no-arp-mac-spoofing", 1),
        _r([], Verdict.DROP, "no-arp-mac-spoofing", 2),
    ))
    arp_ip = Chain("arp-ip", -510, (
        _r([arpm, Match(Field.ARP_SPA, net(f"{ip}/32"))], Verdict.RETURN, "no-arp-ip-spoofing", 1),
        _r([], Verdict.DROP, "no-arp-ip-spoofing", 2),
    ))
    in_root = Chain("root", 0, (
        _r([ipm, Match(Field.IP_PROTO, 17), Match(Field.L4_SPORT, IntRange.single(67)),
            Match(Field.L4_DPORT, IntRange.single(68))], Verdict.ACCEPT, "allow-dhcp", 2),
        _r([ipm], Verdict.ACCEPT, "allow-incoming-ipv4", 1),
        _r([arpm], Verdict.ACCEPT, "clean-traffic", 5),
        _r([], Verdict.DROP, "no-other-l2-traffic", 1),
    ))
    return Ruleset(
        port=Port(portdev=portdev, mac=mac),
        l2={Hook.FROM_VM: (out_root, mac_chain, ip_chain, arp_mac, arp_ip),
            Hook.TO_VM: (in_root,)},
        filter_names=frozenset({"clean-traffic"}),
    )


def with_l3(ruleset: Ruleset, from_vm: tuple[Rule, ...] = (),
            to_vm: tuple[Rule, ...] = ()) -> Ruleset:
    l3 = dict(ruleset.l3)
    if from_vm:
        l3[Hook.FROM_VM] = from_vm
    if to_vm:
        l3[Hook.TO_VM] = to_vm
    return Ruleset(port=ruleset.port, l2=ruleset.l2, l3=l3, filter_names=ruleset.filter_names)


def l3_rule(matches: list[Match], verdict: Verdict, flt: str = "l3", idx: int = 1,
            family: Family = Family.IPV4) -> Rule:
    return _r(matches, verdict, flt, idx, family=family)
