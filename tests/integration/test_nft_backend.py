"""The nft backend against a real kernel, with real packets, in throwaway namespaces."""

from __future__ import annotations

import json
import re
import time

import pytest
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import ARP, Ether

from nwfilter.backends.nft import NftBackend, NftMonitor
from nwfilter.errors import BackendError, UnsupportedError
from nwfilter.ir import (
    Chain,
    Changes,
    CtState,
    Family,
    Field,
    Hook,
    IntRange,
    Match,
    Origin,
    Port,
    Rule,
    Ruleset,
    Verdict,
)
from tests.integration.conftest import HOST_IP, BridgeLab, Guest
from tests.integration.nettools import FrameCatcher, send_frames, tcp_connect, tcp_server
from tests.nft_rulesets import clean_traffic, l3_rule, uncounted, with_l3

pytestmark = [pytest.mark.root, pytest.mark.netns]

MARKER = b"nwfilter-test-payload"


def _backend(lab: BridgeLab) -> NftBackend:
    backend = NftBackend(netns=lab.host)
    backend.probe()
    return backend


def _clean(g: Guest) -> Ruleset:
    return clean_traffic(g.portdev, g.mac, g.ip)


def _has_marker(frame: bytes) -> bool:
    return MARKER in frame


def _udp(src_mac: str, dst: Guest, src_ip: str) -> bytes:
    return bytes(Ether(src=src_mac, dst=dst.mac) / IP(src=src_ip, dst=dst.ip)
                 / UDP(sport=4000, dport=4001) / MARKER)


def _arp(g: Guest, sha: str, spa: str, target: Guest) -> bytes:
    return bytes(Ether(src=g.mac, dst="ff:ff:ff:ff:ff:ff")
                 / ARP(op=1, hwsrc=sha, psrc=spa, pdst=target.ip) / MARKER)


def _other_ethertype(g: Guest, dst: Guest) -> bytes:
    return bytes(Ether(src=g.mac, dst=dst.mac, type=0x88B5) / MARKER)


def _delivered(lab: BridgeLab, src: Guest, dst: Guest, frames: list[bytes]) -> int:
    catcher = FrameCatcher(dst.ns, dst.ifname, _has_marker)
    try:
        send_frames(src.ns, src.ifname, frames)
        return len(catcher.collect(0.3))
    finally:
        catcher.close()


def _owned_tables(lab: BridgeLab) -> list[str]:
    out = lab.run(lab.host, ["nft", "-j", "list", "tables"]).stdout
    return sorted(f"{t['table']['family']} {t['table']['name']}"
                  for t in json.loads(out)["nftables"] if "table" in t)


def test_clean_traffic_blocks_spoofing_and_clear_restores(lab: BridgeLab) -> None:
    g0, g1 = lab.guests
    backend = _backend(lab)
    spoofed = {
        "mac": [_udp("52:54:00:aa:bb:cc", g1, g0.ip)],
        "ip": [_udp(g0.mac, g1, "10.77.0.99")],
        "arp-sha": [_arp(g0, "52:54:00:aa:bb:cc", g0.ip, g1)],
        "arp-spa": [_arp(g0, g0.mac, "10.77.0.99", g1)],
        "ethertype": [_other_ethertype(g0, g1)],
    }
    legit = [_udp(g0.mac, g1, g0.ip), _arp(g0, g0.mac, g0.ip, g1)]
    # Before: everything passes.
    assert _delivered(lab, g0, g1, legit) == 2
    for frames in spoofed.values():
        assert _delivered(lab, g0, g1, frames) == 1
    # The spoofed ARP frames that got through poisoned g1's neighbour cache.
    lab.run(g1.ns, ["ip", "neigh", "flush", "all"])

    backend.apply(Changes(set=(_clean(g0), _clean(g1))))
    assert backend.ports() == ("vnet0", "vnet1")
    assert lab.ping(g0, g1.ip) and lab.ping(g1, HOST_IP)
    assert _delivered(lab, g0, g1, legit) == 2
    for kind, frames in spoofed.items():
        assert _delivered(lab, g0, g1, frames) == 0, kind
    # Other L2 protocols towards the guest are dropped too.
    assert _delivered(lab, g1, g0, [_other_ethertype(g1, g0)]) == 0

    text = backend.read_back("vnet0")
    assert "vnet0/from/mac" in text
    assert re.search(r"ether saddr 52:54:00:00:00:00 counter packets \d+ bytes \d+ return", text)

    backend.clear("vnet0")
    assert backend.ports() == ("vnet1",)
    assert backend.read_back("vnet0") == ""
    for frames in spoofed.values():
        assert _delivered(lab, g0, g1, frames[:1]) == (1 if frames is not spoofed["ethertype"]
                                                       else 0)  # g1's to-VM still drops it
    backend.clear_all()
    assert backend.ports() == ()
    assert _owned_tables(lab) == []
    for frames in spoofed.values():
        assert _delivered(lab, g0, g1, frames) == 1


def test_stateful_layer3_on_real_tcp_flows(lab: BridgeLab) -> None:
    g0, g1 = lab.guests
    backend = _backend(lab)
    established = Match(Field.CT_STATE, frozenset({CtState.ESTABLISHED, CtState.RELATED}))
    to_g1 = (
        l3_rule([established], Verdict.ACCEPT, idx=1),
        l3_rule([Match(Field.IP_PROTO, 6), Match(Field.L4_DPORT, IntRange.single(8080)),
                 Match(Field.CT_STATE, frozenset({CtState.NEW}))], Verdict.ACCEPT, idx=2),
        l3_rule([Match(Field.IP_PROTO, 1)], Verdict.ACCEPT, idx=3),
        l3_rule([], Verdict.DROP, idx=4),
    )
    # g0 may not open connections to port 9000 anywhere (from-VM direction).
    from_g0 = (l3_rule([Match(Field.IP_PROTO, 6), Match(Field.L4_DPORT, IntRange.single(9001))],
                       Verdict.REJECT, idx=5),)
    servers = [tcp_server(g1.ns, g1.ip, 8080), tcp_server(g1.ns, g1.ip, 8081),
               tcp_server(g0.ns, g0.ip, 9000), tcp_server(g1.ns, g1.ip, 9001)]
    try:
        assert tcp_connect(g0.ns, g1.ip, 8081)
        backend.apply(Changes(set=(with_l3(_clean(g0), from_vm=from_g0),
                                   with_l3(_clean(g1), to_vm=to_g1))))
        assert tcp_connect(g0.ns, g1.ip, 8080)
        assert not tcp_connect(g0.ns, g1.ip, 8081, timeout=0.5)
        # Replies to g1's own connection are ESTABLISHED and come back in.
        assert tcp_connect(g1.ns, g0.ip, 9000)
        t0 = time.monotonic()
        assert not tcp_connect(g0.ns, g1.ip, 9001, timeout=2)
        assert time.monotonic() - t0 < 1.5, "REJECT should answer, not time out"
        assert lab.ping(g0, g1.ip)
        backend.clear_all()
        assert tcp_connect(g0.ns, g1.ip, 8081) and tcp_connect(g0.ns, g1.ip, 9001)
    finally:
        for srv, _thread in servers:
            srv.close()


def test_replace_under_ping_flood_loses_nothing(lab: BridgeLab) -> None:
    g0, g1 = lab.guests
    backend = _backend(lab)
    backend.apply(Changes(set=(_clean(g0), _clean(g1))))
    flood = lab.lab.popen(g0.ns, ["ping", "-n", "-q", "-i", "0.005", "-c", "400", "-W", "1",
                                  g1.ip])
    variants = [
        (_clean(g0), _clean(g1)),
        (with_l3(_clean(g0), from_vm=(l3_rule([Match(Field.IP_PROTO, 1)], Verdict.ACCEPT),)),
         with_l3(_clean(g1), to_vm=(l3_rule([Match(Field.IP_PROTO, 6)], Verdict.DROP),))),
    ]
    applied = 0
    while flood.poll() is None:
        backend.apply(Changes(set=variants[applied % 2]))
        applied += 1
    out, _err = flood.communicate()
    assert applied >= 10
    match = re.search(r"(\d+) packets transmitted, (\d+) received", out)
    assert match is not None, out
    assert match.group(1) == match.group(2) == "400", out


def test_rejected_transaction_names_port_and_rule_and_changes_nothing(lab: BridgeLab) -> None:
    g0, g1 = lab.guests
    backend = _backend(lab)
    backend.apply(Changes(set=(_clean(g0),)))
    before = uncounted(lab.run(lab.host, ["nft", "list", "ruleset"]).stdout)
    # a → b → a: every rule is valid alone, the kernel refuses the loop.
    loop = Ruleset(port=Port(g1.portdev, g1.mac), l2={Hook.FROM_VM: (
        Chain("root", 0, (Rule(Family.ETHER, (), Verdict.JUMP, target="a",
                               origin=Origin("loop", 1)),)),
        Chain("a", 0, (Rule(Family.ETHER, (), Verdict.JUMP, target="b",
                            origin=Origin("loop-a", 1)),)),
        Chain("b", 0, (Rule(Family.ETHER, (), Verdict.JUMP, target="a",
                            origin=Origin("loop-b", 7, "<rule action='jump'>")),)),
    )})
    with pytest.raises(BackendError) as info:
        backend.apply(Changes(set=(_clean(g0), loop), remove=("vnet0",)))
    assert "vnet1" in str(info.value) and "loop-b" in str(info.value)
    assert uncounted(lab.run(lab.host, ["nft", "list", "ruleset"]).stdout) == before
    assert backend.ports() == ("vnet0",)
    # The backend still works afterwards.
    backend.apply(Changes(set=(_clean(g1),)))
    assert lab.ping(g0, g1.ip)


def test_check_refuses_what_nft_cannot_express(lab: BridgeLab) -> None:
    g0 = lab.guests[0]
    backend = _backend(lab)
    gratuitous = Ruleset(port=Port(g0.portdev, g0.mac), l2={Hook.FROM_VM: (Chain("root", 0, (
        Rule(Family.ETHER, (Match(Field.ETH_TYPE, 0x0806), Match(Field.ARP_GRATUITOUS, True)),
             Verdict.ACCEPT, origin=Origin("garp", 1)),)),)})
    with pytest.raises(UnsupportedError, match="garp"):
        backend.check(gratuitous)
    with pytest.raises(UnsupportedError):
        backend.apply(Changes(set=(gratuitous,)))
    assert backend.ports() == ()


def test_vmap_dispatch_with_hundreds_of_ports(lab: BridgeLab) -> None:
    g0, g1 = lab.guests
    backend = _backend(lab)
    # Ports need not exist for nft: the maps are keyed by name.
    fake = tuple(clean_traffic(f"tap{i}", f"52:54:00:01:{i // 256:02x}:{i % 256:02x}",
                               f"10.78.{i // 256}.{i % 256}") for i in range(300))
    t0 = time.monotonic()
    backend.apply(Changes(set=(*fake, _clean(g0), _clean(g1))))
    elapsed = time.monotonic() - t0
    assert len(backend.ports()) == 302
    assert lab.ping(g0, g1.ip)
    assert _delivered(lab, g0, g1, [_udp(g0.mac, g1, "10.77.0.99")]) == 0
    base = lab.run(lab.host, ["nft", "-j", "list", "chain", "bridge", "nwfilter", "l2_pre"]).stdout
    rules = [x for x in json.loads(base)["nftables"] if "rule" in x]
    assert len(rules) == 2  # mark reset + one vmap lookup, whatever the port count
    elems = lab.run(lab.host, ["nft", "-j", "list", "map", "bridge", "nwfilter",
                               "from_vm"]).stdout
    assert len(json.loads(elems)["nftables"][1]["map"]["elem"]) == 302
    assert elapsed < 10


def _root_ok(lab: BridgeLab) -> bool:
    proc = lab.run(lab.host, ["nft", "list", "chain", "bridge", "nwfilter", "vnet0/from/root"],
                   check=False)
    return "jump vnet0/from/ipv4-ip" in proc.stdout


def test_monitor_repairs_foreign_edits(lab: BridgeLab) -> None:
    g0, g1 = lab.guests
    backend = _backend(lab)
    backend.apply(Changes(set=(_clean(g0), _clean(g1))))
    spoof = [_udp(g0.mac, g1, "10.77.0.99")]
    with NftMonitor.for_backend(backend) as monitor:
        # Our own transactions never count as foreign.
        backend.apply(Changes(set=(_clean(g0),)))
        time.sleep(0.3)
        assert monitor.repairs == 0
        for sabotage in (["flush", "table", "bridge", "nwfilter"],
                         ["delete", "chain", "bridge", "nwfilter", "vnet0/from/ipv4-ip"],
                         ["flush", "ruleset"]):
            if sabotage[0] == "delete":
                lab.run(lab.host, ["nft", "flush", "chain", "bridge", "nwfilter",
                                   "vnet0/from/root"])
            lab.run(lab.host, ["nft", *sabotage])
            t0 = time.monotonic()
            while time.monotonic() - t0 < 1.0 and not _root_ok(lab):
                time.sleep(0.02)
            assert _root_ok(lab), sabotage
            assert time.monotonic() - t0 < 1.0
            time.sleep(0.2)
            assert _delivered(lab, g0, g1, spoof) == 0, sabotage
        assert monitor.repairs >= 3
        assert monitor.last_error is None


def test_every_field_is_accepted_by_the_kernel(lab: BridgeLab) -> None:
    import ipaddress

    from nwfilter.ir import AddrRange, IPSetMatch, MacMatch, TcpFlag, TcpFlags

    g0 = lab.guests[0]
    backend = _backend(lab)

    def r(*matches: Match, verdict: Verdict = Verdict.CONTINUE,
          family: Family = Family.ETHER) -> Rule:
        return Rule(family, matches, verdict, origin=Origin("all-fields", 1))

    v4 = ipaddress.IPv4Network
    l2 = (
        r(Match(Field.ETH_SRC, MacMatch("52:54:00:00:00:00", "ff:ff:ff:00:00:00"), negate=True),
          Match(Field.ETH_DST, MacMatch("ff:ff:ff:ff:ff:ff"))),
        r(Match(Field.ETH_TYPE, 0x8100), Match(Field.VLAN_ID, 10),
          Match(Field.VLAN_ENCAP, 0x0800)),
        r(Match(Field.STP_TYPE, 0), Match(Field.STP_FLAGS, 1),
          Match(Field.STP_ROOT_PRIO, IntRange(0, 100)),
          Match(Field.STP_ROOT_ADDR, MacMatch("00:11:22:33:44:55", "ff:ff:ff:ff:ff:00")),
          Match(Field.STP_ROOT_COST, IntRange(1, 2)), Match(Field.STP_SENDER_PRIO, IntRange(3, 3)),
          Match(Field.STP_SENDER_ADDR, MacMatch("00:11:22:33:44:56")),
          Match(Field.STP_PORT, IntRange(1, 9)), Match(Field.STP_MSG_AGE, IntRange(0, 5)),
          Match(Field.STP_MAX_AGE, IntRange(0, 5)), Match(Field.STP_HELLO_TIME, IntRange(1, 2)),
          Match(Field.STP_FORWARD_DELAY, IntRange(1, 9), negate=True)),
        r(Match(Field.STP_HELLO_TIME, IntRange(1, 2))),
        r(Match(Field.ETH_TYPE, 0x8035), Match(Field.ARP_HTYPE, 1), Match(Field.ARP_PTYPE, 0x800),
          Match(Field.ARP_OP, 3), Match(Field.ARP_SHA, MacMatch("52:54:00:00:00:00")),
          Match(Field.ARP_THA, MacMatch("52:54:00:00:00:00", "ff:ff:ff:ff:ff:00")),
          Match(Field.ARP_SPA, v4("10.77.0.0/24")), Match(Field.ARP_TPA, v4("0.0.0.0/32"),
                                                          negate=True)),
        r(Match(Field.ETH_TYPE, 0x0800), Match(Field.IP_SRC, v4("10.0.0.0/8")),
          Match(Field.IP_DST_RANGE, AddrRange(ipaddress.ip_address("10.0.0.1"),
                                              ipaddress.ip_address("10.0.0.5"))),
          Match(Field.IP_PROTO, 17), Match(Field.IP_DSCP, 46),
          Match(Field.L4_SPORT, IntRange(1, 1023)), Match(Field.L4_DPORT, IntRange.single(53))),
        r(Match(Field.ETH_TYPE, 0x86DD), Match(Field.IP_SRC, ipaddress.IPv6Network("fe80::/10")),
          Match(Field.IP_PROTO, 58), Match(Field.ICMP_TYPE, IntRange(133, 136))),
        r(Match(Field.ETH_TYPE, 0x0800), verdict=Verdict.RETURN),
    )
    l3 = (
        r(Match(Field.CT_STATE, frozenset({CtState.NEW, CtState.UNTRACKED})),
          Match(Field.CONNLIMIT_ABOVE, 10), Match(Field.IP_PROTO, 6),
          Match(Field.TCP_FLAGS, TcpFlags(frozenset(TcpFlag), frozenset({TcpFlag.SYN}))),
          verdict=Verdict.DROP, family=Family.IPV4),
        r(Match(Field.IPSET, IPSetMatch("bad-hosts", ("dst",)), negate=True),
          Match(Field.IP_PROTO, 1), Match(Field.ICMP_TYPE, IntRange.single(8)),
          Match(Field.ICMP_CODE, IntRange(0, 0)), verdict=Verdict.ACCEPT, family=Family.IPV4),
        r(Match(Field.IP_DST_RANGE, AddrRange(ipaddress.ip_address("2001:db8::1"),
                                              ipaddress.ip_address("2001:db8::9"))),
          Match(Field.IP_DSCP, 8), Match(Field.CONNLIMIT_ABOVE, 3),
          verdict=Verdict.REJECT, family=Family.IPV6),
    )
    rs = Ruleset(port=Port(g0.portdev, g0.mac),
                 l2={Hook.FROM_VM: (Chain("root", 0, l2),), Hook.TO_VM: (Chain("root", 0, l2),)},
                 l3={Hook.FROM_VM: l3, Hook.TO_VM: l3})
    backend.check(rs)
    backend.apply(Changes(set=(rs,)))
    text = backend.read_back(g0.portdev)
    assert "vlan id 10" in text and "ct count over 10" in text and "@ipset4_bad-hosts" in text
    backend.clear(g0.portdev)
    sets = lab.run(lab.host, ["nft", "list", "sets"]).stdout
    assert "cl4_" not in sets and "ipset4_bad-hosts" not in sets  # the last port took all
    backend.clear_all()


def _set_elements(lab: BridgeLab, name: str) -> list[object]:
    out = lab.run(lab.host, ["nft", "-j", "list", "set", "inet", "nwfilter", name]).stdout
    sets = [x["set"] for x in json.loads(out)["nftables"] if "set" in x]
    return list(sets[0].get("elem", []))


def _with_ipset(g: Guest) -> Ruleset:
    from nwfilter.ir import IPSetMatch

    return with_l3(_clean(g), to_vm=(
        l3_rule([Match(Field.IPSET, IPSetMatch("blocked", ("src",)))], Verdict.DROP),))


def test_kept_layer3_chain_keeps_its_connlimit_set(lab: BridgeLab) -> None:
    g0 = lab.guests[0]
    backend = _backend(lab)
    limit = l3_rule([Match(Field.IP_PROTO, 6), Match(Field.CONNLIMIT_ABOVE, 4)], Verdict.DROP)
    first = with_l3(_clean(g0), to_vm=(limit,))
    backend.apply(Changes(set=(first,)))
    # Only a layer-2 chain changes; the layer-3 chain and its set stay.
    second = with_l3(clean_traffic(g0.portdev, g0.mac, "10.77.0.20"), to_vm=(limit,))
    backend.apply(Changes(set=(second,)))
    assert "ct count over 4" in backend.read_back(g0.portdev)
    assert "cl4_vnet0_" in lab.run(lab.host, ["nft", "list", "sets"]).stdout
    backend.apply(Changes(set=(_clean(g0),)))
    assert "cl4_" not in lab.run(lab.host, ["nft", "list", "sets"]).stdout
    backend.clear_all()


def test_rewritten_layer3_chain_keeps_its_connlimit_set(lab: BridgeLab) -> None:
    g0 = lab.guests[0]
    backend = _backend(lab)
    limit = l3_rule([Match(Field.IP_PROTO, 6), Match(Field.CONNLIMIT_ABOVE, 4)], Verdict.DROP)
    backend.apply(Changes(set=(with_l3(_clean(g0), to_vm=(limit,)),)))
    sets = lab.run(lab.host, ["nft", "list", "sets"]).stdout
    # Another rule joins the chain: it is rewritten, the set (now 'dynamic'
    # in the kernel) stays and is not added again.
    extra = l3_rule([Match(Field.IP_PROTO, 17)], Verdict.ACCEPT, idx=2)
    backend.apply(Changes(set=(with_l3(_clean(g0), to_vm=(limit, extra)),)))
    assert "ct count over 4" in backend.read_back(g0.portdev)
    assert lab.run(lab.host, ["nft", "list", "sets"]).stdout == sets
    backend.clear_all()


def test_operator_filled_ipset_survives_monitor_and_rebuilds(lab: BridgeLab) -> None:
    g0, g1 = lab.guests
    backend = _backend(lab)
    backend.apply(Changes(set=(_with_ipset(g1), _clean(g0))))
    with NftMonitor.for_backend(backend) as monitor:
        lab.run(lab.host, ["nft", "add", "element", "inet", "nwfilter", "ipset4_blocked",
                           f"{{ {g0.ip}, 192.0.2.0/24 }}"])
        lab.run(lab.host, ["nft", "add", "element", "inet", "nwfilter", "ipset4_blocked",
                           "{ 198.51.100.1 }"])
        lab.run(lab.host, ["nft", "delete", "element", "inet", "nwfilter", "ipset4_blocked",
                           "{ 198.51.100.1 }"])
        time.sleep(0.3)
        assert monitor.repairs == 0  # filling an ipset set is not a foreign edit
        assert monitor.last_error is None
    expected = sorted(map(json.dumps, _set_elements(lab, "ipset4_blocked")))
    assert len(expected) == 2
    assert not lab.ping(g0, g1.ip)
    assert lab.ping(g1, HOST_IP)
    # A repair and a full rebuild drop and recreate the tables: the elements stay.
    backend.reinstall()
    assert sorted(map(json.dumps, _set_elements(lab, "ipset4_blocked"))) == expected
    fresh = NftBackend(netns=lab.host)
    fresh.probe()
    fresh.apply(Changes(set=(_with_ipset(g1), _clean(g0)), replace_all=True))
    assert sorted(map(json.dumps, _set_elements(lab, "ipset4_blocked"))) == expected
    assert not lab.ping(g0, g1.ip)
    # A set the new state does not use goes with the tables.
    fresh.apply(Changes(set=(_clean(g1), _clean(g0)), replace_all=True))
    assert "ipset4_blocked" not in lab.run(lab.host, ["nft", "list", "sets"]).stdout
    assert lab.ping(g0, g1.ip)
    fresh.clear_all()


def test_port_ids_are_reused_and_kept_on_refusal(lab: BridgeLab) -> None:
    g0, g1 = lab.guests
    backend = _backend(lab)
    l3 = (l3_rule([Match(Field.IP_PROTO, 1)], Verdict.ACCEPT),)
    fake = [with_l3(clean_traffic(f"tap{i}", f"52:54:00:02:00:{i:02x}", f"10.79.0.{i}"),
                    from_vm=l3) for i in range(4)]
    backend.apply(Changes(set=tuple(fake)))
    backend.apply(Changes(remove=("tap1", "tap2")))
    bad = Ruleset(port=Port(g1.portdev, g1.mac), l2={Hook.FROM_VM: (
        Chain("root", 0, (Rule(Family.ETHER, (), Verdict.JUMP, target="a",
                               origin=Origin("loop", 1)),)),
        Chain("a", 0, (Rule(Family.ETHER, (), Verdict.JUMP, target="a",
                            origin=Origin("loop-a", 1)),)),
    )})
    with pytest.raises(BackendError):
        backend.apply(Changes(set=(with_l3(_clean(g0), from_vm=l3), bad)))
    assert backend.ports() == ("tap0", "tap3")
    backend.apply(Changes(set=(with_l3(_clean(g0), from_vm=l3), with_l3(_clean(g1), to_vm=l3))))

    def keys(vmap: str) -> list[int]:
        out = lab.run(lab.host, ["nft", "-j", "list", "map", "inet", "nwfilter", vmap]).stdout
        return sorted(e[0] for e in json.loads(out)["nftables"][1]["map"]["elem"])

    # The freed ids 2 and 3 went to the new ports (vnet0 from, vnet1 to).
    assert keys("l3_from") == [1, 2, 4]
    assert keys("l3_to") == [3 << 16]
    assert lab.ping(g0, g1.ip)
    backend.clear_all()
