"""The `ns` hypervisor against a simulated `ip`: concurrent guests on one
bridge, and a stop that finishes what it can.  (tests/integration/test_nsvm.py
runs it against the real kernel.)"""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from nwfilter.conf.model import DomainDef, InterfaceDef
from nwfilter.domain.hypervisor import PortPlan
from nwfilter.domain.nsvm import NsHypervisor
from nwfilter.errors import BackendError, StorageError

HOST = "lab"


@dataclass
class Link:
    kind: str  # 'veth', 'bridge', 'loopback'
    up: bool = False
    alias: str | None = None
    master: str | None = None
    peer: tuple[str, str] | None = None  # (netns, name) of a veth's other end


@dataclass
class FakeIp:
    """Just enough of `ip` for NsHypervisor: namespaces (files in
    `netns_dir`, as under /run/netns), links, bridges and their ports.

    `slow` makes a query take that long; the answer is read *before* the
    pause, as a real `ip` process reads the kernel's state and then returns,
    so a caller can act on an answer that is out of date."""

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

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        args = list(argv)
        assert args[0] == "ip"
        args = args[1:]
        netns = HOST
        if args[:1] == ["-n"]:
            netns, args = args[1], args[2:]
        while args[:1] in (["-j"], ["-d"]):
            args = args[1:]
        key = tuple(args)
        with self.lock:
            self.calls.append(key)
            if self.failures.get(key):
                self.failures[key] -= 1
                return self._done(argv, 2, err=f"simulated failure of {' '.join(key)}")
            rc, out, err = self._do(netns, args)
        event = self.entered.get(key)
        if event is not None:
            event.set()
        delay = self.slow.get(key, 0.0)
        if delay:
            time.sleep(delay)
        return self._done(argv, rc, out, err)

    @staticmethod
    def _done(
        argv: Sequence[str], rc: int, out: str = "", err: str = ""
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(list(argv), rc, out, err)

    def _do(self, ns: str, args: list[str]) -> tuple[int, str, str]:
        match args:
            case ["netns", "add", name]:
                path = self.netns_dir / name
                if path.exists():
                    return 1, "", "File exists"
                path.touch()
                self.links[(name, "lo")] = Link("loopback")
            case ["netns", "del", name]:
                (self.netns_dir / name).unlink()
                for where, dev in [k for k in self.links if k[0] == name]:
                    self._delete(where, dev)
            case ["netns", "pids", _]:
                pass
            case ["link", "add", name, "address", _, "type", "veth", "peer", "name", peer,
                  "address", _, "netns", peer_ns]:
                if (ns, name) in self.links or (peer_ns, peer) in self.links:
                    return 2, "", "File exists"
                self.links[(ns, name)] = Link("veth", peer=(peer_ns, peer))
                self.links[(peer_ns, peer)] = Link("veth", peer=(ns, name))
            case ["link", "add", name, "type", "bridge", *_]:
                if (ns, name) in self.links:
                    return 2, "", "RTNETLINK answers: File exists"
                self.links[(ns, name)] = Link("bridge")
            case ["link", "set", name, "master", bridge]:
                link = self.links.get((ns, name))
                target = self.links.get((ns, bridge))
                if link is None or target is None or target.kind != "bridge":
                    return 1, "", f"Cannot find device \"{bridge}\""
                link.master = bridge
            case ["link", "set", name, "alias", alias]:
                self.links[(ns, name)].alias = alias
            case ["link", "set", name, ("up" | "down") as state]:
                if (ns, name) not in self.links:
                    return 1, "", f"Cannot find device \"{name}\""
                self.links[(ns, name)].up = state == "up"
            case ["link", "del", name]:
                if (ns, name) not in self.links:
                    return 1, "", f"Cannot find device \"{name}\""
                self._delete(ns, name)
            case ["link", "show", "dev", name]:
                link = self.links.get((ns, name))
                if link is None:
                    return 1, "", f"Device \"{name}\" does not exist."
                return 0, json.dumps([self._show(name, link)]), ""
            case ["link", "show", "master", bridge]:
                ports = [self._show(n, link) for (where, n), link in sorted(self.links.items())
                         if where == ns and link.master == bridge]
                return 0, json.dumps(ports), ""
            case ["addr", "add", *_]:
                pass
            case _:
                raise AssertionError(f"unexpected ip command in {ns}: {args}")
        return 0, "", ""

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

    @staticmethod
    def _show(name: str, link: Link) -> dict[str, object]:
        info: dict[str, object] = {
            "ifname": name,
            "flags": ["UP"] if link.up else [],
            "operstate": "UP" if link.up else "DOWN",
            "linkinfo": {"info_kind": link.kind},
        }
        if link.alias is not None:
            info["ifalias"] = link.alias
        if link.master is not None:
            info["master"] = link.master
        return info

    def master_of(self, name: str) -> str | None:
        with self.lock:
            link = self.links.get((HOST, name))
            return None if link is None else link.master

    def exists(self, name: str, ns: str = HOST) -> bool:
        with self.lock:
            return (ns, name) in self.links


def guest(name: str, mac: str) -> tuple[DomainDef, list[PortPlan]]:
    dom = DomainDef("ns", name, uuid.uuid4(), (InterfaceDef(mac=mac, source_bridge="br0"),))
    return dom, [PortPlan(0, f"vnet-{name}", mac, "br0", True)]


def make(tmp_path: Path) -> tuple[NsHypervisor, FakeIp]:
    fake = FakeIp(tmp_path / "netns")
    hv = NsHypervisor(tmp_path / "run", HOST, runner=fake, netns_dir=tmp_path / "netns")
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
    fake.slow[("link", "show", "dev", "br0")] = 0.2
    (a, a_ports), (b, b_ports) = guest("a", "52:54:00:00:00:0a"), guest("b", "52:54:00:00:00:0b")
    errors = run_together(lambda: hv.prepare(a, a_ports), lambda: hv.prepare(b, b_ports))
    assert errors == []
    assert fake.master_of("vnet-a") == "br0" and fake.master_of("vnet-b") == "br0"
    assert fake.calls.count(("link", "add", "br0", "type", "bridge", "stp_state", "0",
                             "forward_delay", "0")) == 1


def test_stop_never_deletes_the_bridge_a_starting_guest_joins(tmp_path: Path) -> None:
    hv, fake = make(tmp_path)
    (a, a_ports), (b, b_ports) = guest("a", "52:54:00:00:00:0a"), guest("b", "52:54:00:00:00:0b")
    hv.prepare(a, a_ports)
    assert fake.master_of("vnet-a") == "br0"
    # a's stop finds br0 empty, and acts on that answer a moment later
    empty = ("link", "show", "master", "br0")
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
    fake.failures[("link", "del", "vnet-a")] = 1
    with pytest.raises(BackendError, match="link del vnet-a"):
        hv.stop(a)
    assert not hv.is_alive(a)  # the namespace went all the same
    assert (tmp_path / "run" / "a.ports.json").exists()  # kept for another try
    hv.stop(a)
    assert not (tmp_path / "run" / "a.ports.json").exists()
    assert not fake.exists("vnet-a") and not fake.exists("br0")


def test_failed_prepare_is_undone_and_reports_its_own_error(tmp_path: Path) -> None:
    hv, fake = make(tmp_path)
    a, a_ports = guest("a", "52:54:00:00:00:0a")
    fake.failures[("link", "set", "vnet-a", "master", "br0")] = 1
    fake.failures[("link", "del", "vnet-a")] = 1  # and the clean-up stumbles too
    with pytest.raises(BackendError, match="master br0"):
        hv.prepare(a, a_ports)
    assert not hv.is_alive(a)
