"""The ebiptables renderer and tools, without a kernel."""

from __future__ import annotations

import pytest

from nwfilter.backends.ebiptables import plan, render, tools
from nwfilter.cli import version_text
from nwfilter.errors import UnavailableError, UnsupportedError
from nwfilter.ir import Chain, Family, Field, Hook, IntRange, Match, Port, Rule, Ruleset, Verdict


def _rs(port: str, *rules: Rule, l3: tuple[Rule, ...] = ()) -> Ruleset:
    return Ruleset(port=Port(port, "52:54:00:00:00:00"),
                   l2={Hook.FROM_VM: (Chain("root", 0, rules),)} if rules else {},
                   l3={Hook.TO_VM: l3} if l3 else {})


@pytest.mark.parametrize("port", ["vnet+", "a b", "x'y", "v*", "a" * 16])
def test_port_names_the_tools_would_read_otherwise_are_refused(port: str) -> None:
    with pytest.raises(UnsupportedError, match="ebiptables"):
        render.render_port(_rs(port, Rule(Family.ETHER, (), Verdict.DROP)))


def test_layer2_reject_is_drop_and_gratuitous_arp_is_expressed() -> None:
    rules = (Rule(Family.ETHER, (Match(Field.ETH_TYPE, 0x0806),
                                 Match(Field.ARP_GRATUITOUS, True)), Verdict.REJECT),)
    tables = render.render_port(_rs("vnet0", *rules))
    assert tables.chains[render.EB]["libvirt-I-vnet0"] == ("-p ARP --arp-gratuitous -j DROP",)
    assert tables.links[render.EB] == [("PREROUTING", "-i vnet0 -j libvirt-I-vnet0")]


def test_icmp_type_ranges_are_refused_not_widened() -> None:
    rule = Rule(Family.IPV4, (Match(Field.IP_PROTO, 1),
                              Match(Field.ICMP_TYPE, IntRange(0, 8))), Verdict.DROP)
    with pytest.raises(UnsupportedError, match="ICMP type"):
        render.render_port(_rs("vnet0", l3=(rule,)))


def test_an_unchanged_port_gives_no_lines_and_a_removed_one_goes_whole() -> None:
    rs = _rs("vnet0", Rule(Family.ETHER, (), Verdict.DROP),
             l3=(Rule(Family.IPV6, (Match(Field.IP_PROTO, 6),
                                    Match(Field.L4_DPORT, IntRange(80, 90))), Verdict.ACCEPT),))
    tables = render.render_port(rs)
    assert tables.chains[render.IP6]["FO-vnet0"] == ("-p tcp -m tcp --dport 80:90 -j ACCEPT",)
    assert all(plan.diff(t, tables, tables) == [] for t in render.TABLES)
    gone = plan.diff(render.IP6, tables, render.Tables())
    assert gone[:4] == [f"-D {c} {s}" for c, s in tables.links[render.IP6]]
    assert gone[-3:] == ["-X FI-vnet0", "-X FO-vnet0", "-X HI-vnet0"]


def test_a_missing_tool_names_the_debian_package() -> None:
    tools.PACKAGES["iptables-restore-missing-here"] = "iptables"
    try:
        with pytest.raises(UnavailableError,
                           match=r"'iptables-restore-missing-here' is not installed: "
                                 r"install the Debian package iptables$"):
            tools.Runner(None).run(["iptables-restore-missing-here"])
    finally:
        del tools.PACKAGES["iptables-restore-missing-here"]


def test_version_says_which_iptables_variant() -> None:
    assert "ebiptables backend: iptables " in version_text()
    assert set(tools.variant()) == {"iptables", "ebtables"}
