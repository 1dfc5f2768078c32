"""The `ns` hypervisor against the real kernel: guests in throwaway namespaces,
checked with real pings (no filters: this is about the plumbing)."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nwfilter.conf.model import DomainDef, InterfaceDef, IPSpec
from nwfilter.domain.hypervisor import HypervisorEnv, PortPlan, load_hypervisor
from nwfilter.domain.nsvm import BRIDGE_ALIAS, NsHypervisor, host_mac
from nwfilter.errors import BackendError, ConflictError, StateError, ValidationError
from nwfilter.netlab import NetLab
from nwfilter.netns import NETNS_DIR

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.timeout(120)]


def _domain(name: str, mac: str, ip: str, bridge: str = "br0") -> DomainDef:
    iface = InterfaceDef(mac=mac, source_bridge=bridge, ips=(IPSpec(ip, 24),))
    return DomainDef(type="ns", name=name, uuid=uuid.uuid4(), interfaces=(iface,))


def _ports(dom: DomainDef, portdev: str) -> list[PortPlan]:
    iface = dom.interfaces[0]
    assert iface.mac is not None
    return [PortPlan(0, portdev, iface.mac, iface.source_bridge, True)]


class Lab:
    def __init__(self, netlab: NetLab, host: str, hv: NsHypervisor) -> None:
        self.netlab, self.host, self.hv = netlab, host, hv
        self.a = _domain("a", "52:54:00:00:00:0a", "10.9.0.10")
        self.b = _domain("b", "52:54:00:00:00:0b", "10.9.0.11")

    def ping(self, dom: DomainDef, address: str, wait: int = 3) -> bool:
        # A guest that tried to talk while cut off holds an unresolved
        # neighbour entry until its ARP retransmission timer (one second)
        # fires, so a reply may take a little over a second.
        return self.netlab.ping(self.hv.netns_of(dom.name), address, wait=wait)

    def cut_off(self, dom: DomainDef, address: str) -> bool:
        return not self.ping(dom, address, wait=1)

    def links(self, ns: str) -> dict[str, str]:
        out = self.netlab.run(ns, ["ip", "-o", "link", "show"]).stdout
        return {line.split(": ")[1].split("@")[0]: line for line in out.splitlines()}

    def start_both(self) -> None:
        self.hv.prepare(self.a, _ports(self.a, "vnet-a"))
        self.hv.prepare(self.b, _ports(self.b, "vnet-b"))
        self.hv.launch(self.a)
        self.hv.launch(self.b)


@pytest.fixture
def lab(tmp_path: Path) -> Iterator[Lab]:
    with NetLab() as netlab:
        host = netlab.add_ns("host")
        hv = NsHypervisor(tmp_path / "run", host)
        try:
            yield Lab(netlab, host, hv)
        finally:
            for name in hv.find_running():
                hv.stop(DomainDef(type="ns", name=name, uuid=uuid.uuid4()))
            for left in NETNS_DIR.glob(f"{netlab.prefix}*"):
                if left.name not in netlab.namespaces:
                    netlab.remove_ns(left.name)


def test_names_are_prefixed_and_validated(tmp_path: Path) -> None:
    hv = NsHypervisor(tmp_path, None)
    assert hv.netns_of("web") == "nwvm-web"
    assert NsHypervisor(tmp_path, "lab").netns_of("web") == "lab.vm.web"
    for bad in ("", "../x", "a b", "a.b", "-x", "x" * 80):
        with pytest.raises(ValidationError):
            hv.netns_of(bad)
    assert host_mac("52:54:00:12:34:56") == "fe:54:00:12:34:56"


def test_factory_builds_the_ns_hypervisor(tmp_path: Path) -> None:
    hv = load_hypervisor("ns", HypervisorEnv(run_dir=tmp_path, netns="lab"))
    assert isinstance(hv, NsHypervisor)
    assert hv.name == "ns" and hv.host_netns == "lab"


def test_prepare_is_closed_until_launch(lab: Lab) -> None:
    hv = lab.hv
    hv.prepare(lab.a, _ports(lab.a, "vnet-a"))
    hv.prepare(lab.b, _ports(lab.b, "vnet-b"))
    hv.prepare(lab.a, _ports(lab.a, "vnet-a"))  # idempotent
    assert hv.is_alive(lab.a) and hv.is_alive(lab.b)
    assert hv.find_running() == ("a", "b")

    host_links = lab.links(lab.host)
    assert "master br0" in host_links["vnet-a"]
    assert "state DOWN" in host_links["vnet-a"]
    assert "fe:54:00:00:00:0a" in host_links["vnet-a"]
    guest = lab.links(hv.netns_of("a"))
    assert "52:54:00:00:00:0a" in guest["eth0"]
    addrs = lab.netlab.run(hv.netns_of("a"), ["ip", "-o", "addr", "show", "dev", "eth0"]).stdout
    assert "10.9.0.10/24" in addrs

    assert lab.cut_off(lab.a, "10.9.0.11"), "traffic passed before launch"
    hv.launch(lab.a)
    hv.launch(lab.b)
    assert lab.ping(lab.a, "10.9.0.11")
    assert lab.ping(lab.b, "10.9.0.10")


def test_suspend_resume(lab: Lab) -> None:
    lab.start_both()
    assert lab.ping(lab.a, "10.9.0.11")
    lab.hv.suspend(lab.b)
    assert lab.hv.is_suspended(lab.b)
    assert lab.cut_off(lab.a, "10.9.0.11")
    lab.hv.resume(lab.b)
    assert not lab.hv.is_suspended(lab.b)
    assert lab.ping(lab.a, "10.9.0.11")


def test_stop_removes_everything_it_made(lab: Lab) -> None:
    lab.start_both()
    bridge = lab.links(lab.host)["br0"]
    assert BRIDGE_ALIAS in lab.netlab.run(lab.host, ["ip", "link", "show", "br0"]).stdout, bridge
    # A process left running inside the guest must not keep it alive.
    sleeper = lab.netlab.popen(lab.hv.netns_of("a"), ["sleep", "60"])
    try:
        deadline = time.monotonic() + 5
        while str(sleeper.pid) not in subprocess.run(
            ["ip", "netns", "pids", lab.hv.netns_of("a")], capture_output=True, text=True,
            check=False,
        ).stdout.split():
            assert time.monotonic() < deadline, "the process never entered the guest"
            time.sleep(0.02)
        lab.hv.stop(lab.a)
        lab.hv.stop(lab.a)  # idempotent
        assert sleeper.wait(timeout=5) != 0
    finally:
        if sleeper.poll() is None:
            sleeper.kill()
    assert not lab.hv.is_alive(lab.a)
    links = lab.links(lab.host)
    assert "vnet-a" not in links and "br0" in links  # b still uses the bridge
    with pytest.raises(StateError):
        lab.hv.suspend(lab.a)
    lab.hv.stop(lab.b)
    assert set(lab.links(lab.host)) == {"lo"}
    assert lab.hv.find_running() == ()


def test_existing_bridge_is_kept(lab: Lab) -> None:
    lab.netlab.add_bridge(lab.host, "br0")
    lab.start_both()
    assert lab.ping(lab.a, "10.9.0.11")
    lab.hv.stop(lab.a)
    lab.hv.stop(lab.b)
    assert "br0" in lab.links(lab.host)


def test_failed_prepare_leaves_nothing(lab: Lab) -> None:
    dom = _domain("c", "52:54:00:00:00:0c", "10.9.0.12")
    with pytest.raises(ValidationError):
        lab.hv.prepare(dom, _ports(dom, "bad name!"))
    lab.netlab.add_bridge(lab.host, "brx")
    with pytest.raises(ConflictError, match="brx"):
        lab.hv.prepare(dom, _ports(dom, "brx"))
    lab.netlab.run(lab.host, ["ip", "link", "del", "brx"])
    # The kernel refuses a MAC with the multicast bit: undone half-way.
    bad = _domain("c", "53:54:00:00:00:0c", "10.9.0.12")
    with pytest.raises(BackendError):
        lab.hv.prepare(bad, _ports(bad, "vnet-c"))
    assert not lab.hv.is_alive(dom)
    assert set(lab.links(lab.host)) == {"lo"}


def test_guests_starting_and_stopping_together_keep_their_bridge(lab: Lab) -> None:
    hv = lab.hv
    doms = [_domain(f"g{i}", f"52:54:00:00:01:{i:02x}", f"10.9.1.{i + 10}") for i in range(6)]
    errors: list[BaseException] = []

    def together(*jobs: Callable[[], None]) -> None:
        barrier = threading.Barrier(len(jobs))

        def run(job: Callable[[], None]) -> None:
            barrier.wait(10)
            try:
                job()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=run, args=(job,), daemon=True) for job in jobs]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)

    def start(dom: DomainDef) -> Callable[[], None]:
        return lambda: hv.prepare(dom, _ports(dom, f"vnet-{dom.name}"))

    # all of them need br0, which does not exist yet
    together(*(start(d) for d in doms[:3]))
    assert errors == []
    # one guest leaves (br0 is not empty) while others join
    together(lambda: hv.stop(doms[0]), *(start(d) for d in doms[3:]))
    assert errors == []
    links = lab.links(lab.host)
    for dom in doms[1:]:
        assert "master br0" in links[f"vnet-{dom.name}"], dom.name
    # the last ones leave while a new one joins: it must find br0 (again)
    late = _domain("late", "52:54:00:00:01:ff", "10.9.1.99")
    together(*(lambda d=d: hv.stop(d) for d in doms[1:]), start(late))
    assert errors == []
    assert "master br0" in lab.links(lab.host)["vnet-late"]
    hv.stop(late)
    assert set(lab.links(lab.host)) == {"lo"}
