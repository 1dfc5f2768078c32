"""`nwfilter.domain.links` against the real kernel, checked with `ip`: veth
pairs made across namespaces, addresses, bridges and their ports, link
state and deletion, and errors that name the device and the namespace."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from nwfilter.domain.links import Links, host_mac
from nwfilter.errors import BackendError, StateError
from nwfilter.netlab import NetLab

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.timeout(60)]


@pytest.fixture
def lab() -> Iterator[tuple[NetLab, str, str]]:
    with NetLab() as netlab:
        yield netlab, netlab.add_ns("host"), netlab.add_ns("guest")


def show(netlab: NetLab, ns: str, *args: str) -> list[dict[str, object]]:
    out = netlab.run(ns, ["ip", "-j", "-d", *args]).stdout
    data: list[dict[str, object]] = json.loads(out or "[]")
    return data


def test_veth_pair_across_namespaces_with_addresses_on_a_bridge(
    lab: tuple[NetLab, str, str],
) -> None:
    netlab, host_ns, guest_ns = lab
    with Links(host_ns) as host, Links(guest_ns) as guest:
        host.add_bridge("br0", alias="ours")
        host.add_veth("vh0", "eth0", guest_ns, mac=host_mac("52:54:00:AA:00:01"),
                      peer_mac="52:54:00:aa:00:01")
        guest.add_address("eth0", "10.7.0.2/24")
        guest.add_address("eth0", "fd07::2/64")
        guest.set_up("eth0")
        host.set_master("vh0", "br0")
        state = host.state("vh0")
        assert state is not None and state.kind == "veth" and not state.up
        assert state.master == host.index("br0")
        assert host.ports_of("br0") == ["vh0"]
        bridge = host.state("br0")
        assert bridge is not None and bridge.kind == "bridge" and bridge.up
        assert bridge.alias == "ours"
        assert guest.index("vh0") is None and host.index("eth0") is None
    (link,) = show(netlab, host_ns, "link", "show", "dev", "vh0")
    assert link["address"] == "fe:54:00:aa:00:01"
    (peer,) = show(netlab, guest_ns, "addr", "show", "dev", "eth0")
    assert peer["address"] == "52:54:00:aa:00:01" and "UP" in peer["flags"]  # type: ignore[operator]
    addresses = {(a["local"], a["prefixlen"]) for a in peer["addr_info"]}  # type: ignore[attr-defined]
    assert {("10.7.0.2", 24), ("fd07::2", 64)} <= addresses
    six = [a for a in peer["addr_info"] if a["local"] == "fd07::2"]  # type: ignore[attr-defined]
    assert six[0].get("nodad") is True  # usable at once, never 'tentative'
    (br,) = show(netlab, host_ns, "link", "show", "dev", "br0")
    info = br["linkinfo"]["info_data"]  # type: ignore[index]
    assert info["stp_state"] == 0 and info["forward_delay"] == 0


def test_link_state_follows_carrier_and_delete_takes_the_pair(
    lab: tuple[NetLab, str, str],
) -> None:
    netlab, host_ns, guest_ns = lab
    with Links(host_ns) as host, Links(guest_ns) as guest:
        host.add_veth("vh1", "eth1", guest_ns)
        guest.set_up("eth1")
        host.set_up("vh1")
        for _ in range(150):  # the kernel's link watcher may take a moment
            here, there = host.state("vh1"), guest.state("eth1")
            if here is not None and there is not None and here.oper_up and there.oper_up:
                break
            netlab.run(host_ns, ["sleep", "0.02"])
        else:
            pytest.fail("veth pair never became operationally up")
        host.delete("vh1")
        assert host.state("vh1") is None and guest.state("eth1") is None
        host.delete("vh1")  # gone already: fine
    assert show(netlab, guest_ns, "link", "show", "type", "veth") == []


def test_errors_name_the_device_and_the_namespace(lab: tuple[NetLab, str, str]) -> None:
    _netlab, host_ns, guest_ns = lab
    with Links(host_ns) as host:
        with pytest.raises(StateError, match=f"'nope' does not exist in namespace '{host_ns}'"):
            host.set_up("nope")
        host.add_veth("vh2", "eth2", guest_ns)
        with pytest.raises(BackendError, match=f"veth pair 'vh2'.*'{guest_ns}'"):
            host.add_veth("vh2", "eth9", guest_ns)
        with pytest.raises(StateError, match="bridge 'br9' does not exist"):
            host.set_master("vh2", "br9")
        with pytest.raises(BackendError, match=r"address 10\.0\.0\.1/33 to 'vh2'"):
            host.add_address("vh2", "10.0.0.1/33")
