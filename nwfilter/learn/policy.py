"""Who learns what: the learning mode and trusted DHCP servers of a
binding, and the ruleset of a port whose address is not known yet.

The learning ruleset (libvirt's "DHCP-only" rules, tightened): from the
guest, DHCP requests (UDP 68 → 67, to the broadcast address or a trusted
server) and ARP probes (sender address 0.0.0.0) with the guest's MAC as
source pass; toward the guest, DHCP replies (UDP 67 → 68) from the trusted
servers (any server when none is named) pass.  Everything else is dropped
both ways, so a port is never unfiltered while its address is learnt.
"""

from __future__ import annotations

import ipaddress

from nwfilter.compile import port_of
from nwfilter.conf.model import BindingDef
from nwfilter.errors import ValidationError
from nwfilter.ir import (
    ETH_P_ARP,
    ETH_P_IP,
    Chain,
    Family,
    Field,
    Hook,
    IntRange,
    MacMatch,
    Match,
    Rule,
    Ruleset,
    Verdict,
)

MODES = ("any", "dhcp", "none")
DEFAULT_MODE = "any"
LEARNT_VAR = "IP"
LEARNT_VAR6 = "IPV6"
DHCP_SERVER_PORT = 67
DHCP_CLIENT_PORT = 68
_COMMENT = "nwfilter: learning the guest's address"


def learning_mode(binding: BindingDef) -> str:
    """CTRL_IP_LEARNING of `binding` ('any' when not given)."""
    values = binding.filterref.param_dict().get("CTRL_IP_LEARNING")
    if not values:
        return DEFAULT_MODE
    mode = values[0].lower()
    if mode not in MODES:
        raise ValidationError(
            f"port '{binding.portdev}': CTRL_IP_LEARNING must be one of "
            f"{', '.join(MODES)}, not {values[0]!r}"
        )
    return mode


def trusted_servers(binding: BindingDef) -> tuple[ipaddress.IPv4Address, ...]:
    """The DHCPSERVER addresses of `binding` (empty: every server is trusted)."""
    out = []
    for text in binding.filterref.param_dict().get("DHCPSERVER", ()):
        try:
            out.append(ipaddress.IPv4Address(text))
        except ValueError:
            raise ValidationError(
                f"port '{binding.portdev}': DHCPSERVER {text!r} is not an IPv4 address"
            ) from None
    return tuple(sorted(set(out)))


def learns(binding: BindingDef) -> bool:
    """Whether the port's address is learnt: no IP given, learning on."""
    return LEARNT_VAR not in binding.filterref.param_dict() and learning_mode(binding) != "none"


def _net(addr: ipaddress.IPv4Address) -> ipaddress.IPv4Network:
    return ipaddress.IPv4Network(f"{addr}/32")


def _rule(*matches: Match, verdict: Verdict = Verdict.ACCEPT) -> Rule:
    return Rule(Family.ETHER, tuple(matches), verdict, priority=0, comment=_COMMENT)


def learning_ruleset(binding: BindingDef) -> Ruleset:
    """What a port enforces until its address is learnt."""
    rules = learning_rules(binding)
    return Ruleset(
        port=port_of(binding),
        l2={hook: (Chain("root", 0, chain),) for hook, chain in rules.items()},
        filter_names=frozenset({binding.filterref.filter}),
    )


def learning_rules(binding: BindingDef) -> dict[Hook, tuple[Rule, ...]]:
    """The learning rules per hook, each list ending in a drop."""
    port = port_of(binding)
    servers = trusted_servers(binding)
    mac = MacMatch(port.mac)
    udp = (Match(Field.ETH_TYPE, ETH_P_IP), Match(Field.IP_PROTO, 17))
    request = (*udp, Match(Field.L4_SPORT, IntRange.single(DHCP_CLIENT_PORT)),
               Match(Field.L4_DPORT, IntRange.single(DHCP_SERVER_PORT)))
    reply = (*udp, Match(Field.L4_SPORT, IntRange.single(DHCP_SERVER_PORT)),
             Match(Field.L4_DPORT, IntRange.single(DHCP_CLIENT_PORT)))
    out: list[Rule] = []
    inbound: list[Rule] = []
    if servers:
        for dst in (ipaddress.IPv4Address("255.255.255.255"), *servers):
            out.append(_rule(Match(Field.ETH_SRC, mac), *request,
                             Match(Field.IP_DST, _net(dst))))
        for src in servers:
            inbound.append(_rule(*reply, Match(Field.IP_SRC, _net(src))))
    else:
        out.append(_rule(Match(Field.ETH_SRC, mac), *request))
        inbound.append(_rule(*reply))
    out.append(_rule(Match(Field.ETH_SRC, mac), Match(Field.ETH_TYPE, ETH_P_ARP),
                     Match(Field.ARP_SHA, mac),
                     Match(Field.ARP_SPA, ipaddress.IPv4Network("0.0.0.0/32"))))
    drop = _rule(verdict=Verdict.DROP)
    return {Hook.FROM_VM: (*out, drop), Hook.TO_VM: (*inbound, drop)}
