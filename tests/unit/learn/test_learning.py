"""Address learning without a kernel: what each frame means for a port,
hostile frames, the learning ruleset, and learnt addresses kept by the
engine (memory backend) across a restart."""

from __future__ import annotations

import contextlib
import ipaddress
import time
import uuid
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from nwfilter.backends.memory import MemoryBackend
from nwfilter.conf.model import BindingDef, FilterRef, Parameter
from nwfilter.engine import Engine
from nwfilter.errors import ValidationError
from nwfilter.learn import bpf
from nwfilter.learn.listener import PortLearner
from nwfilter.learn.packets import Malformed, parse_frame
from nwfilter.learn.policy import learning_mode, learning_ruleset, learns, trusted_servers
from nwfilter.learn.store import LearntAddress
from nwfilter.render_text import render_text
from tests.unit.learn import frames as f

SERVER = ipaddress.IPv4Address("10.0.0.1")


def learner(mode: str = "dhcp", trusted: tuple[str, ...] = ("10.0.0.1",)) -> PortLearner:
    return PortLearner("vnet0", f.GUEST, mode, tuple(ipaddress.IPv4Address(t) for t in trusted))


def feed(port: PortLearner, frame: bytes, *, outgoing: bool, now: float = 1000.0
         ) -> list[tuple[str, tuple[str, ...]]]:
    seen = parse_frame(frame)
    assert seen is not None
    return [(var, tuple(a.address for a in addrs))
            for var, addrs in port.handle(seen, outgoing, now)]


def test_an_ack_from_the_trusted_server_sets_ip_until_the_lease_ends() -> None:
    port = learner()
    assert feed(port, f.dhcp_reply("offer", "10.0.0.5"), outgoing=True) == []
    assert feed(port, f.dhcp_reply("ack", "10.0.0.5", lease=60), outgoing=True) == [
        ("IP", ("10.0.0.5",))]
    assert port.ip is not None and port.ip.expires == 1060.0 and port.ip.server == "10.0.0.1"
    # a renewal keeps the address and moves the end of the lease
    assert feed(port, f.dhcp_reply("ack", "10.0.0.5", lease=60), outgoing=True,
                now=1030.0) == [("IP", ("10.0.0.5",))]
    assert port.expire(1070.0) == []
    assert [(v, a) for v, a in port.expire(1091.0)] == [("IP", ())]
    assert port.ip is None and port.counters["withdrawn-expiry"] == 1


def test_release_and_nak_return_the_port_to_learning() -> None:
    port = learner()
    feed(port, f.dhcp_reply("ack", "10.0.0.5"), outgoing=True)
    assert feed(port, f.dhcp_request("release", "10.0.0.6"), outgoing=False) == []
    assert feed(port, f.dhcp_request("release", "10.0.0.5"), outgoing=False) == [("IP", ())]
    feed(port, f.dhcp_reply("ack", "10.0.0.5"), outgoing=True)
    assert feed(port, f.dhcp_reply("nak", "0.0.0.0"), outgoing=True) == [("IP", ())]


def test_hostile_dhcp_is_ignored_and_counted() -> None:
    port = learner()
    # a rogue server, also one that forges the trusted server id
    assert feed(port, f.dhcp_reply("ack", "10.0.0.66", "10.0.0.250"), outgoing=True) == []
    assert feed(port, f.dhcp_reply("ack", "10.0.0.66", src="10.0.0.250"), outgoing=True) == []
    # the guest answering itself, and a request with another MAC
    assert feed(port, f.dhcp_reply("ack", "10.0.0.66"), outgoing=False) == []
    assert feed(port, f.dhcp_request("release", mac="52:54:00:00:00:77"), outgoing=False) == []
    # an ACK for another client
    assert feed(port, f.dhcp_reply("ack", "10.0.0.7", chaddr="52:54:00:00:00:77"),
                outgoing=True) == []
    assert port.ip is None
    assert port.counters == {"untrusted": 2, "forged": 2}


def test_without_dhcpserver_every_server_is_trusted() -> None:
    port = learner(trusted=())
    assert feed(port, f.dhcp_reply("ack", "10.9.0.5", "10.9.0.1"), outgoing=True) == [
        ("IP", ("10.9.0.5",))]


def test_any_mode_learns_from_the_first_arp_or_ipv4_and_ipv6_is_capped() -> None:
    port = learner("any")
    assert port.wants_everything()
    assert feed(port, f.arp("0.0.0.0"), outgoing=False) == []  # a probe
    assert feed(port, f.ipv4("10.0.0.8", mac="52:54:00:00:00:77"), outgoing=False) == []
    assert feed(port, f.ipv4("10.0.0.8"), outgoing=True) == []
    assert feed(port, f.arp("10.0.0.9"), outgoing=False) == [("IP", ("10.0.0.9",))]
    assert port.ip is not None and port.ip.source == "arp" and port.ip.expires is None
    assert not port.wants_everything()
    assert feed(port, f.ipv4("10.0.0.10"), outgoing=False) == []  # first one wins
    other = learner("any")
    assert feed(other, f.ipv4("10.0.0.11"), outgoing=False) == [("IP", ("10.0.0.11",))]
    for n in range(6):
        feed(port, f.neighbour_advert(f"fd00::{n + 1}"), outgoing=False)
    assert [a.address for a in port.ipv6] == [f"fd00::{n}" for n in range(1, 5)]
    assert port.counters["ipv6-limit"] == 2
    dhcp = learner("dhcp")
    assert feed(dhcp, f.neighbour_advert("fd00::1"), outgoing=False) == []
    assert feed(dhcp, f.dhcp6_reply("fd00::42", 50), outgoing=True) == [
        ("IPV6", ("fd00::42",))]
    assert dhcp.expire(2000.0) == [("IPV6", ())]


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=600))
def test_random_bytes_never_crash_the_parser(frame: bytes) -> None:
    with contextlib.suppress(Malformed):
        parse_frame(frame)


@settings(max_examples=200, deadline=None)
@given(st.integers(min_value=14, max_value=340), st.binary(min_size=1, max_size=8))
def test_truncated_and_garbled_dhcp_is_malformed_or_harmless(cut: int, junk: bytes) -> None:
    frame = f.dhcp_reply("ack", "10.0.0.5")
    port = learner()
    for broken in (frame[:cut], frame[:cut] + junk + frame[cut + len(junk):]):
        try:
            seen = parse_frame(broken)
        except Malformed:
            continue
        if seen is not None:
            port.handle(seen, True, 0.0)


def test_the_bpf_programs_jump_forward_and_end_in_returns() -> None:
    for everything in (True, False):
        prog = bpf.program(any_ipv4=everything, arp=everything, ipv6=True)
        assert prog[-1][0] == 0x06 and prog[-2][0] == 0x06
        for n, (code, jt, jf, _k) in enumerate(prog):
            if code != 0x06:
                assert n + 1 + max(jt, jf) < len(prog)


def binding(*params: tuple[str, str]) -> BindingDef:
    return BindingDef("vm", uuid.UUID(int=1), "vnet0", f.GUEST,
                      FilterRef("clean-traffic", tuple(Parameter(n, v) for n, v in params)))


def test_policy_reads_the_binding() -> None:
    assert learning_mode(binding()) == "any" and learns(binding())
    assert learning_mode(binding(("CTRL_IP_LEARNING", "DHCP"))) == "dhcp"
    assert not learns(binding(("CTRL_IP_LEARNING", "none")))
    assert not learns(binding(("IP", "10.0.0.2")))
    assert trusted_servers(binding(("DHCPSERVER", "10.0.0.1"))) == (SERVER,)
    with pytest.raises(ValidationError, match="CTRL_IP_LEARNING"):
        learning_mode(binding(("CTRL_IP_LEARNING", "sometimes")))
    with pytest.raises(ValidationError, match="DHCPSERVER"):
        trusted_servers(binding(("DHCPSERVER", "nope")))


def test_the_learning_ruleset_passes_dhcp_and_probes_only() -> None:
    text = render_text(learning_ruleset(binding(("DHCPSERVER", "10.0.0.1"))))
    assert "l4-sport == 68 l4-dport == 67 ip-dst == 255.255.255.255 -> accept" in text
    assert "ip-src == 10.0.0.1 -> accept" in text
    assert "arp-spa == 0.0.0.0 -> accept" in text
    assert text.count("-> drop") == 2


def test_learnt_addresses_survive_a_restart_until_their_lease_ends(tmp_path: Path) -> None:
    backend = MemoryBackend()
    engine = Engine(tmp_path, backend)
    engine.start()
    engine.create_bindings([binding(("CTRL_IP_LEARNING", "dhcp"))])
    assert "learning" in render_text(backend.rulesets["vnet0"])
    now = time.time()
    held = LearntAddress("10.0.0.5", "dhcp", now, now + 3600, "10.0.0.1")
    engine.set_learnt_many([("vnet0", "IP", (held,)), ("vnet9", "IP", (held,))])
    assert "10.0.0.5" in render_text(backend.rulesets["vnet0"])
    engine.close()
    again = Engine(tmp_path, MemoryBackend())
    again.start()
    assert again.learnt_details("vnet0") == {"IP": (held,)}
    assert "10.0.0.5" in render_text(again.ruleset("vnet0"))
    again.set_learnt_many([("vnet0", "IP", (LearntAddress("10.0.0.5", "dhcp", now, now + 1),))])
    again.close()
    time.sleep(1.1)
    third = Engine(tmp_path, MemoryBackend())
    third.start()
    assert third.learnt("vnet0") == {}
    assert "learning" in render_text(third.ruleset("vnet0"))
    third.delete_binding("vnet0")
    assert not (tmp_path / "run" / "learnt" / "vnet0.json").exists()
    third.close()
