"""The `ns` hypervisor against a simulated kernel (its links and `ip netns`):
concurrent guests on one bridge, and a stop that finishes what it can.
(tests/integration/test_nsvm.py runs it against the real kernel.)"""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import pytest

from nwfilter.conf.model import DomainDef, InterfaceDef
from nwfilter.domain.hypervisor import PortPlan
from nwfilter.domain.links import LinkState
from nwfilter.domain.nsvm import NsHypervisor
from nwfilter.errors import BackendError, StateError, StorageError

T = TypeVar("T")

HOST = "lab"


@dataclass
class Link:
    kind: str  # 'veth', 'bridge', 'loopback'
    up: bool = False
    alias: str | None = None
    master: str | None = None
    peer: tuple[str, str] | None = None  # (netns, name) of a veth's other end


@dataclass
class FakeKernel:
    """Just enough of the kernel for NsHypervisor: namespaces (files in
    `netns_dir`, as under /run/netns, made and removed by the `ip netns`
    runner), and links, bridges and their ports (changed and read through
    `links(netns)`, which stands for `nwfilter.domain.links.Links`).

    Each link call is recorded in `calls` as (method, args...).  `slow`
    makes a call take that long; the answer is read *before* the pause, as
    a netlink reply reflects the kernel's state when it was sent, so a
    caller can act on an answer that is out of date.  `failures` makes a
    call fail that many times."""

    netns_dir: Path
    links: dict[tuple[str, str], Link] = field(default_factory=dict)
    slow: dict[tuple[str, ...], float] = field(default_factory=dict)
    failures: dict[tuple[str, ...], int] = field(default_factory=dict)
    calls: list[tuple[str, ...]] = field(default_factory=list)
    entered: dict[tuple[str, ...], threading.Event] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self.netns_dir.mkdir(parents=True, exist_ok=True)
        (self.netns_dir / HOST).touch()
        self.links[(HOST, "lo")] = Link("loopback", up=True)

    # -- `ip netns`, the only commands left to the runner ----------------------

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        args = list(argv)
        with self.lock:
            match args:
                case ["ip", "netns", "add", name]:
                    path = self.netns_dir / name
                    if path.exists():
                        return self._done(argv, 1, "File exists")
                    path.touch()
                    self.links[(name, "lo")] = Link("loopback")
                case ["ip", "netns", "del", name]:
                    (self.netns_dir / name).unlink()
                    for where, dev in [k for k in self.links if k[0] == name]:
                        self._delete(where, dev)
                case ["ip", "netns", "pids", _]:
                    pass
                case _:
                    raise AssertionError(f"unexpected command: {args}")
        return self._done(argv, 0)

    @staticmethod
    def _done(argv: Sequence[str], rc: int, err: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(list(argv), rc, "", err)

    # -- links ----------------------------------------------------------------------

    def links_in(self, netns: str | None) -> FakeLinks:
        return FakeLinks(self, netns or HOST)

    def call(self, key: tuple[str, ...], do: Callable[[], T]) -> T:
        with self.lock:
            self.calls.append(key)
            if self.failures.get(key):
                self.failures[key] -= 1
                raise BackendError(f"simulated failure of {' '.join(key)}")
            answer = do()
        event = self.entered.get(key)
        if event is not None:
            event.set()
        delay = self.slow.get(key, 0.0)
        if delay:
            time.sleep(delay)
        return answer

    def _delete(self, ns: str, name: str) -> None:
        link = self.links.pop((ns, name), None)
        if link is None:
            return
        if link.peer is not None:
            self.links.pop(link.peer, None)
        if link.kind == "bridge":  # the kernel releases a deleted bridge's ports
            for (where, _), other in self.links.items():
                if where == ns and other.master == name:
                    other.master = None

    def master_of(self, name: str) -> str | None:
        with self.lock:
            link = self.links.get((HOST, name))
            return None if link is None else link.master

    def exists(self, name: str, ns: str = HOST) -> bool:
        with self.lock:
            return (ns, name) in self.links


@dataclass
class FakeLinks:
    """`Links` of one namespace of a `FakeKernel`."""

    kernel: FakeKernel
    ns: str

    def __enter__(self) -> FakeLinks:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def _get(self, name: str) -> Link:
        link = self.kernel.links.get((self.ns, name))
        if link is None:
            raise StateError(f"device '{name}' does not exist in namespace '{self.ns}'")
        return link

    def index(self, name: str) -> int | None:
        def do() -> int | None:
            return 1 if (self.ns, name) in self.kernel.links else None
        return self.kernel.call(("index", name), do)

    def state(self, name: str) -> LinkState | None:
        def do() -> LinkState | None:
            link = self.kernel.links.get((self.ns, name))
            if link is None:
                return None
            return LinkState(link.kind, link.up, link.up, link.alias,
                             None if link.master is None else 1)
        return self.kernel.call(("state", name), do)

    def ports_of(self, bridge: str) -> list[str]:
        def do() -> list[str]:
            return sorted(n for (where, n), link in self.kernel.links.items()
                          if where == self.ns and link.master == bridge)
        return self.kernel.call(("ports_of", bridge), do)

    def add_veth(self, name: str, peer: str, peer_netns: str, *, mac: str | None = None,
                 peer_mac: str | None = None) -> None:
        def do() -> None:
            links = self.kernel.links
            if (self.ns, name) in links or (peer_netns, peer) in links:
                raise BackendError(f"cannot create veth pair '{name}': File exists")
            links[(self.ns, name)] = Link("veth", peer=(peer_netns, peer))
            links[(peer_netns, peer)] = Link("veth", peer=(self.ns, name))
        self.kernel.call(("add_veth", name, peer, peer_netns), do)

    def add_bridge(self, name: str, *, alias: str | None = None) -> None:
        def do() -> None:
            if (self.ns, name) in self.kernel.links:
                raise BackendError(f"cannot create bridge '{name}': File exists")
            self.kernel.links[(self.ns, name)] = Link("bridge", up=True, alias=alias)
        self.kernel.call(("add_bridge", name), do)

    def add_address(self, name: str, cidr: str) -> None:
        self.kernel.call(("add_address", name, cidr), lambda: self._get(name) and None)

    def set_up(self, name: str, up: bool = True) -> None:
        def do() -> None:
            self._get(name).up = up
        self.kernel.call(("set_up", name, str(up)), do)

    def set_master(self, name: str, bridge: str) -> None:
        def do() -> None:
            target = self.kernel.links.get((self.ns, bridge))
            if target is None or target.kind != "bridge":
                raise StateError(f"bridge '{bridge}' does not exist")
            self._get(name).master = bridge
        self.kernel.call(("set_master", name, bridge), do)

    def delete(self, name: str) -> None:
        def do() -> None:
            self.kernel._delete(self.ns, name)
        self.kernel.call(("delete", name), do)


def guest(name: str, mac: str) -> tuple[DomainDef, list[PortPlan]]:
    dom = DomainDef("ns", name, uuid.uuid4(), (InterfaceDef(mac=mac, source_bridge="br0"),))
    return dom, [PortPlan(0, f"vnet-{name}", mac, "br0", True)]


def make(tmp_path: Path) -> tuple[NsHypervisor, FakeKernel]:
    fake = FakeKernel(tmp_path / "netns")
    hv = NsHypervisor(tmp_path / "run", HOST, runner=fake, netns_dir=tmp_path / "netns",
                      links=fake.links_in)  # type: ignore[arg-type]
    return hv, fake


def run_together(*jobs: object) -> list[BaseException]:
    """Run each callable in its own thread, started together; their errors."""
    errors: list[BaseException] = []
    barrier = threading.Barrier(len(jobs))

    def run(job: object) -> None:
        assert callable(job)
        barrier.wait(5)
        try:
            job()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(job,), daemon=True) for job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert not any(t.is_alive() for t in threads)
    return errors


def test_two_guests_starting_together_share_the_bridge_they_need(tmp_path: Path) -> None:
    hv, fake = make(tmp_path)
    # both look for the bridge at the same moment and find none
    fake.slow[("index", "br0")] = 0.2
    (a, a_ports), (b, b_ports) = guest("a", "52:54:00:00:00:0a"), guest("b", "52:54:00:00:00:0b")
    errors = run_together(lambda: hv.prepare(a, a_ports), lambda: hv.prepare(b, b_ports))
    assert errors == []
    assert fake.master_of("vnet-a") == "br0" and fake.master_of("vnet-b") == "br0"
    assert fake.calls.count(("add_bridge", "br0")) == 1


def test_stop_never_deletes_the_bridge_a_starting_guest_joins(tmp_path: Path) -> None:
    hv, fake = make(tmp_path)
    (a, a_ports), (b, b_ports) = guest("a", "52:54:00:00:00:0a"), guest("b", "52:54:00:00:00:0b")
    hv.prepare(a, a_ports)
    assert fake.master_of("vnet-a") == "br0"
    # a's stop finds br0 empty, and acts on that answer a moment later
    empty = ("ports_of", "br0")
    fake.slow[empty] = 0.3
    fake.entered[empty] = threading.Event()
    errors: list[BaseException] = []

    def start_b() -> None:
        assert fake.entered[empty].wait(5)
        try:
            hv.prepare(b, b_ports)
        except BaseException as exc:
            errors.append(exc)

    starter = threading.Thread(target=start_b, daemon=True)
    starter.start()
    hv.stop(a)
    starter.join(10)
    assert errors == []
    assert fake.exists("br0") and fake.master_of("vnet-b") == "br0"
    assert not fake.exists("vnet-a")
    hv.stop(b)
    assert not fake.exists("br0")  # ours, and empty now


def test_stop_with_an_unreadable_record_still_removes_the_namespace(tmp_path: Path) -> None:
    hv, fake = make(tmp_path)
    a, a_ports = guest("a", "52:54:00:00:00:0a")
    hv.prepare(a, a_ports)
    record = tmp_path / "run" / "a.ports.json"
    record.write_text("{not json")
    with pytest.raises(StorageError):
        hv.stop(a)
    assert not hv.is_alive(a)
    assert not fake.exists("vnet-a")  # went with the guest's end of the pair
    assert not record.exists()
    hv.stop(a)  # nothing left to do


def test_stop_goes_on_after_a_failed_step_and_can_be_repeated(tmp_path: Path) -> None:
    hv, fake = make(tmp_path)
    a, a_ports = guest("a", "52:54:00:00:00:0a")
    hv.prepare(a, a_ports)
    fake.failures[("delete", "vnet-a")] = 1
    with pytest.raises(BackendError, match="delete vnet-a"):
        hv.stop(a)
    assert not hv.is_alive(a)  # the namespace went all the same
    assert (tmp_path / "run" / "a.ports.json").exists()  # kept for another try
    hv.stop(a)
    assert not (tmp_path / "run" / "a.ports.json").exists()
    assert not fake.exists("vnet-a") and not fake.exists("br0")


def test_failed_prepare_is_undone_and_reports_its_own_error(tmp_path: Path) -> None:
    hv, fake = make(tmp_path)
    a, a_ports = guest("a", "52:54:00:00:00:0a")
    fake.failures[("set_master", "vnet-a", "br0")] = 1
    fake.failures[("delete", "vnet-a")] = 1  # and the clean-up stumbles too
    with pytest.raises(BackendError, match="set_master vnet-a br0"):
        hv.prepare(a, a_ports)
    assert not hv.is_alive(a)
