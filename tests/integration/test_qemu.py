"""The `qemu` driver against real QEMU processes, tap devices and nftables,
all inside a throwaway namespace.  A QEMU start takes about half a second,
so each test reuses its processes across its checks.

No guest operating system boots here: the guests have no disk and sit in
their firmware, which is all the monitor, the taps and the filters need."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nwfilter import api
from nwfilter.backends.nft import NftBackend
from nwfilter.domain.manager import DomainManager
from nwfilter.domain.objects import DomainState
from nwfilter.domain.qemuvm import KVM_DEVICE, QEMU_BINARY, QemuHypervisor
from nwfilter.domain.qmp import MonitorTimeoutError
from nwfilter.engine import Engine
from nwfilter.errors import NwfilterError, StateError
from nwfilter.netlab import NetLab

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.timeout(180)]

STOCK = Path(__file__).resolve().parents[2] / "filters"
KVM = os.access(KVM_DEVICE, os.R_OK | os.W_OK)

if shutil.which(QEMU_BINARY) is None:
    # TCG runs wherever QEMU is installed (tools/install.sh installs it).
    pytestmark.append(pytest.mark.skip(reason=f"{QEMU_BINARY} is not installed"))


def domain_xml(name: str, dtype: str = "qemu", *, ip: str = "10.0.0.5",
               target: str | None = None, filt: str = "clean-traffic") -> str:
    dev = f"<target dev='{target}'/>" if target else ""
    return (
        f"<domain type='{dtype}'><name>{name}</name><memory unit='MiB'>64</memory>"
        "<devices><interface type='bridge'><source bridge='br0'/>"
        f"{dev}<model type='virtio'/><filterref filter='{filt}'>"
        f"<parameter name='IP' value='{ip}'/></filterref></interface></devices></domain>"
    )


class _Api:
    """What the API's domain handlers use, over a test world."""

    def __init__(self, world: World) -> None:
        self._world = world

    def engine(self) -> Engine:
        return self._world.engine

    def domains(self) -> DomainManager:
        return self._world.manager


@dataclass
class World:
    lab: NetLab
    host: str
    root: Path
    engine: Engine
    manager: DomainManager
    hv: QemuHypervisor

    def restart(self) -> None:
        """A new engine and manager on the same root; QEMU keeps running."""
        self.hv.close()
        self.engine.close()
        self.engine = Engine(self.root, NftBackend(netns=self.host), stock_dir=STOCK)
        self.engine.start()
        self.hv = _hypervisor(self.root, self.host)
        self.manager = DomainManager.for_engine(self.engine, netns=self.host,
                                                hypervisors={"qemu": self.hv})
        self.manager.start()

    def pid(self, name: str) -> int:
        driver = self.manager.driver(self.manager.state(name).type)
        assert isinstance(driver.hypervisor, QemuHypervisor)
        pid = driver.hypervisor.pid(driver.get(name)[1])
        assert pid is not None
        return pid

    def links(self) -> str:
        return self.lab.run(self.host, ["ip", "-d", "link", "show"]).stdout

    def ruleset(self) -> str:
        return self.lab.run(self.host, ["nft", "list", "ruleset"]).stdout

    def state(self, name: str) -> tuple[DomainState, str]:
        row = self.manager.state(name)
        return row.state, row.reason


def _hypervisor(root: Path, host: str) -> QemuHypervisor:
    return QemuHypervisor("qemu", root / "run" / "hypervisor" / "qemu", host,
                          command_timeout=2, shutdown_timeout=1)


def _kill_leftovers(root: Path) -> None:
    for record in root.glob("run/hypervisor/*/*.json"):
        text = record.read_text()
        for word in text.replace(",", " ").replace("}", " ").split():
            if word.isdigit() and Path(f"/proc/{word}/cmdline").exists():
                cmdline = Path(f"/proc/{word}/cmdline").read_bytes()
                if QEMU_BINARY.encode() in cmdline:
                    os.kill(int(word), signal.SIGKILL)


@pytest.fixture
def world(tmp_path: Path) -> Iterator[World]:
    root = tmp_path / "root"
    with NetLab() as lab:
        host = lab.add_ns("host")
        lab.add_bridge(host, "br0")
        engine = Engine(root, NftBackend(netns=host), stock_dir=STOCK)
        engine.start()
        hv = _hypervisor(root, host)
        manager = DomainManager.for_engine(engine, netns=host, hypervisors={"qemu": hv})
        manager.start()
        made = World(lab, host, root, engine, manager, hv)
        try:
            yield made
        finally:
            for driver in made.manager.drivers():
                if isinstance(driver.hypervisor, QemuHypervisor):
                    driver.hypervisor.close()
            _kill_leftovers(root)
            made.engine.close()


def wait_for(check: Callable[[], bool], what: str, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {timeout}s: {what}")
        time.sleep(0.05)


def test_start_suspend_resume_reboot_shutdown_destroy(world: World) -> None:
    dtype = "kvm" if KVM else "qemu"
    mgr = world.manager
    mgr.define_xml(domain_xml("a", dtype, ip="10.0.0.5"))
    mgr.define_xml(domain_xml("b", ip="10.0.0.6", target="tap-b"))
    mgr.run("start", "a")
    mgr.run("start", "b")
    assert [(r.name, r.state) for r in mgr.list_domains()] == [
        ("a", DomainState.RUNNING), ("b", DomainState.RUNNING)]

    # Real QEMU processes in the root's namespace, their NICs on taps
    # named as libvirt names them, on the bridge, with the filters in force.
    for name in ("a", "b"):
        pid = world.pid(name)
        assert os.readlink(f"/proc/{pid}/ns/net") == (
            f"net:[{os.stat(f'/run/netns/{world.host}').st_ino}]")
        assert f"guest={name}".encode() in Path(f"/proc/{pid}/cmdline").read_bytes()
    links = world.links()
    for tap in ("vnet0", "tap-b"):
        block = links.split(f": {tap}:", 1)[1].split("\n\\d+: ", 1)[0]
        assert "tun type tap" in block and "master br0" in block and ",UP," in block
    assert [b.portdev for b in world.engine.list_bindings()] == ["tap-b", "vnet0"]
    rules = world.ruleset()
    assert "vnet0" in rules and "tap-b" in rules
    dumped = mgr.dumpxml("a")
    assert "<target dev='vnet0'/>" in dumped
    assert "<target" not in mgr.dumpxml("a", inactive=True)

    mgr.run("suspend", "a")
    assert world.state("a") == (DomainState.PAUSED, "user")
    mgr.run("resume", "a")
    assert world.state("a") == (DomainState.RUNNING, "unpaused")
    # Through the API, as `nwfilter reboot b` sends it.
    assert api.invoke(_Api(world), "domain.reboot", {"domain": "b"}) == {"name": "b"}
    assert world.state("b")[0] is DomainState.RUNNING

    # No guest OS answers the power button: after the timeout it is killed.
    pid_b = world.pid("b")
    mgr.run("shutdown", "b")
    assert world.state("b") == (DomainState.SHUTOFF, "shutdown")
    mgr.run("destroy", "a")
    assert world.state("a") == (DomainState.SHUTOFF, "destroyed")
    assert not Path(f"/proc/{pid_b}/cmdline").exists() or (
        Path(f"/proc/{pid_b}/stat").read_text().split(") ")[1][0] == "Z")
    links = world.links()
    assert "vnet0" not in links and "tap-b" not in links
    assert world.engine.list_bindings() == []
    assert "vnet0" not in world.ruleset()
    with pytest.raises(StateError, match="not running"):
        mgr.run("suspend", "a")

    # Started again: a new process, the same port names.
    mgr.run("start", "b")
    assert world.pid("b") != pid_b and "tap-b" in world.links()
    mgr.run("destroy", "b")


def test_a_filter_that_cannot_apply_means_qemu_never_runs(world: World) -> None:
    world.manager.define_xml(domain_xml("c", filt="no-such-filter"))
    with pytest.raises(NwfilterError, match="no-such-filter"):
        world.manager.run("start", "c")
    assert world.state("c")[0] is DomainState.SHUTOFF
    assert "vnet0" not in world.links()
    # QEMU was never launched (it would have left its log), nothing is left.
    assert list(world.root.glob("run/hypervisor/qemu/c.*")) == []


def test_a_hung_monitor_times_out_alone_and_a_crash_is_noticed(world: World) -> None:
    mgr = world.manager
    for name, ip in (("a", "10.0.0.5"), ("b", "10.0.0.6"), ("c", "10.0.0.7")):
        mgr.define_xml(domain_xml(name, ip=ip))
        mgr.run("start", name)
    hung = world.pid("a")
    os.kill(hung, signal.SIGSTOP)
    try:
        failure: list[BaseException] = []

        def suspend_a() -> None:
            try:
                mgr.run("suspend", "a")
            except BaseException as exc:
                failure.append(exc)

        caller = threading.Thread(target=suspend_a)
        caller.start()
        # While a's call waits for its monitor, the others work and the
        # queries answer from the recorded state.
        mgr.run("suspend", "b")
        mgr.run("resume", "b")
        assert world.state("b") == (DomainState.RUNNING, "unpaused")
        assert world.state("a")[0] is DomainState.RUNNING
        assert "<target dev=" in mgr.dumpxml("a")
        assert {r.name for r in mgr.list_domains()} == {"a", "b", "c"}
        caller.join(30)
        assert not caller.is_alive()
        assert len(failure) == 1 and isinstance(failure[0], MonitorTimeoutError)
        assert "monitor of domain 'a': command 'stop' timed out" in str(failure[0])
        assert world.state("a") == (DomainState.RUNNING, "booted")
        # A destroy ends a stopped QEMU too.
        mgr.run("destroy", "a")
        assert world.state("a") == (DomainState.SHUTOFF, "destroyed")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(hung, signal.SIGCONT)

    # kill -9: noticed, shut off as crashed, its rules torn down.
    bindings = {b.portdev for b in world.engine.list_bindings()}
    port_b = next(p.portdev for p in mgr.driver("qemu").get("b")[2])
    assert port_b in bindings
    os.kill(world.pid("b"), signal.SIGKILL)
    wait_for(lambda: world.state("b")[0] is DomainState.SHUTOFF, "b shut off")
    assert world.state("b") == (DomainState.SHUTOFF, "crashed")
    assert port_b not in {b.portdev for b in world.engine.list_bindings()}
    assert port_b not in world.ruleset() and port_b not in world.links()

    # SIGTERM: QEMU says SHUTDOWN and exits; that is a shutdown.
    os.kill(world.pid("c"), signal.SIGTERM)
    wait_for(lambda: world.state("c")[0] is DomainState.SHUTOFF, "c shut off")
    assert world.state("c") == (DomainState.SHUTOFF, "shutdown")
    assert world.engine.list_bindings() == []


def test_a_restarted_engine_reconnects_and_reapplies_the_filters(world: World) -> None:
    mgr = world.manager
    for name, ip in (("a", "10.0.0.5"), ("b", "10.0.0.6")):
        mgr.define_xml(domain_xml(name, ip=ip))
        mgr.run("start", name)
    mgr.run("suspend", "b")
    pid_a, pid_b = world.pid("a"), world.pid("b")
    port_a = next(p.portdev for p in mgr.driver("qemu").get("a")[2])
    world.lab.run(world.host, ["nft", "flush", "ruleset"])
    world.restart()
    mgr = world.manager
    assert world.state("a") == (DomainState.RUNNING, "booted")
    assert world.state("b")[0] is DomainState.PAUSED
    assert (world.pid("a"), world.pid("b")) == (pid_a, pid_b)
    assert port_a in world.ruleset()
    # The monitors answer again, and QEMU's own events reach the new engine.
    mgr.run("resume", "b")
    assert world.state("b") == (DomainState.RUNNING, "unpaused")
    os.kill(pid_a, signal.SIGKILL)
    wait_for(lambda: world.state("a")[0] is DomainState.SHUTOFF, "a shut off")
    assert world.state("a") == (DomainState.SHUTOFF, "crashed")

    # Dead while no engine ran: shut off as crashed at the next start, its taps gone.
    world.hv.close()
    os.kill(pid_b, signal.SIGKILL)
    wait_for(lambda: not Path(f"/proc/{pid_b}/cmdline").exists()
             or Path(f"/proc/{pid_b}/cmdline").read_bytes() == b"", "b gone")
    world.restart()
    assert world.state("b") == (DomainState.SHUTOFF, "crashed")
    assert world.engine.list_bindings() == []
    assert "tun type tap" not in world.links()
