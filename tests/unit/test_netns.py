"""`Iproute2` against a recording runner: the `ip` commands it builds, and
what it does when one fails.  (tests/integration/test_netlab.py and
test_nsvm.py run it against the real kernel.)"""

from __future__ import annotations

import subprocess
from collections.abc import Sequence

import pytest

from nwfilter.errors import BackendError, ValidationError
from nwfilter.netns import Iproute2, check_ifname, check_netns_name, ip_argv


class Recorder:
    def __init__(self, fail: Sequence[str] = ()) -> None:
        self.calls: list[list[str]] = []
        self.fail = set(fail)

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.calls.append(list(argv))
        rc = 2 if " ".join(argv) in self.fail else 0
        return subprocess.CompletedProcess(list(argv), rc, "", "no" if rc else "")


def test_commands_run_in_the_named_namespace() -> None:
    rec = Recorder()
    ipr = Iproute2(rec)
    ipr.add_bridge("h", "br0", alias="ours")
    ipr.add_veth("h", "vnet0", "g", "eth0", mac="fe:00:00:00:00:01", peer_mac="52:00:00:00:00:01")
    ipr.add_veth(None, "v1", "g", "eth1")
    ipr.set_master("h", "vnet0", "br0")
    ipr.set_up("g", "eth0", up=False)
    ipr.add_address("g", "eth0", "10.0.0.1/24")
    ipr.add_address("g", "eth0", "fd00::1/64")
    assert rec.calls == [
        ["ip", "-n", "h", "link", "add", "br0", "type", "bridge", "stp_state", "0",
         "forward_delay", "0"],
        ["ip", "-n", "h", "link", "set", "br0", "alias", "ours"],
        ["ip", "-n", "h", "link", "set", "br0", "up"],
        ["ip", "-n", "h", "link", "add", "vnet0", "address", "fe:00:00:00:00:01", "type",
         "veth", "peer", "name", "eth0", "address", "52:00:00:00:00:01", "netns", "g"],
        ["ip", "link", "add", "v1", "type", "veth", "peer", "name", "eth1", "netns", "g"],
        ["ip", "-n", "h", "link", "set", "vnet0", "master", "br0"],
        ["ip", "-n", "g", "link", "set", "eth0", "down"],
        ["ip", "-n", "g", "addr", "add", "10.0.0.1/24", "dev", "eth0"],
        ["ip", "-n", "g", "addr", "add", "fd00::1/64", "dev", "eth0", "nodad"],
    ]


def test_a_namespace_whose_loopback_fails_is_deleted_again() -> None:
    rec = Recorder(fail=["ip -n g link set lo up"])
    with pytest.raises(BackendError, match="link set lo up failed in g"):
        Iproute2(rec).add_netns("g")
    assert rec.calls[-1] == ["ip", "netns", "del", "g"]


def test_a_namespace_is_deleted_even_if_its_processes_cannot_be_listed() -> None:
    rec = Recorder(fail=["ip netns pids g"])
    with pytest.raises(BackendError, match="netns pids g"):
        Iproute2(rec).delete_netns("g")
    assert rec.calls == [["ip", "netns", "pids", "g"], ["ip", "netns", "del", "g"]]


BAD_IFNAMES = ["", "-x", "a b", "br0\n", "x%d", "x" * 16]
BAD_NETNS = ["", "-x", "../x", "a/b", "lab\n", "x" * 64]


@pytest.mark.parametrize(
    ("kind", "bad"),
    [("interface", n) for n in BAD_IFNAMES] + [("namespace", n) for n in BAD_NETNS],
)
def test_bad_names_never_reach_ip(kind: str, bad: str) -> None:
    rec = Recorder()
    ipr = Iproute2(rec)
    check = check_ifname if kind == "interface" else check_netns_name
    with pytest.raises(ValidationError):
        check(bad)
    with pytest.raises(ValidationError):
        if kind == "interface":
            ipr.add_bridge("h", bad)
        else:
            ipr.delete_netns(bad)
    assert rec.calls == []


def test_dotted_namespace_names_pass() -> None:
    assert check_netns_name("lab.vm.web") == "lab.vm.web"
    assert ip_argv("lab.vm.web", "link") == ["ip", "-n", "lab.vm.web", "link"]
