"""Benchmark: a filter edit rebuilding the rules of 1,000 running domains.

Figures printed:

* how long the VM-driver locks are held by one rebuild (a probe registered
  last with the rebuild coordinator is locked once every driver lock is
  held and unlocked first, so its hold time is the drivers' hold time);
* while rebuilds run back to back, how long a concurrent domain start waits
  for its locks (the driver lock, taken for the lookup and again around the
  binding creation), and how long the whole start takes.

Run: .venv/bin/python tools/bench_rebuild.py [--domains 1000] [--seconds 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nwfilter.backends.memory import MemoryBackend
from nwfilter.domain.manager import DomainManager
from nwfilter.domain.testvm import TestHypervisor
from nwfilter.engine import Engine
from nwfilter.locks import LevelledLock

FILTER_UUID = uuid.uuid5(uuid.NAMESPACE_URL, "nwfilter-bench:web")


def filter_xml(port: int) -> str:
    return (
        f"<filter name='web' chain='root'><uuid>{FILTER_UUID}</uuid>"
        "<rule action='accept' direction='in' priority='500'>"
        f"<tcp dstportstart='{port}'/></rule>"
        "<rule action='accept' direction='out' priority='500'><udp dstportstart='53'/></rule>"
        "<rule action='drop' direction='inout' priority='900'><all/></rule></filter>"
    )


def domain_xml(name: str, index: int) -> str:
    mac = f"52:54:00:{(index >> 16) & 255:02x}:{(index >> 8) & 255:02x}:{index & 255:02x}"
    return (
        f"<domain type='test'><name>{name}</name><devices>"
        f"<interface type='bridge'><mac address='{mac}'/><source bridge='br0'/>"
        "<filterref filter='web'><parameter name='IP' value='10.0.0.1'/></filterref>"
        "</interface></devices></domain>"
    )


class HoldProbe:
    """Registered last with the coordinator: measures how long every driver lock is held."""

    def __init__(self) -> None:
        self.holds: list[float] = []
        self._since = 0.0

    def lock(self) -> None:
        self._since = time.perf_counter()

    def unlock(self) -> None:
        self.holds.append(time.perf_counter() - self._since)


def timed_lock(lock: LevelledLock, waits: list[float], only: threading.Thread) -> None:
    """Record how long `only` waits for `lock`."""
    original = lock.acquire

    def acquire(timeout: float | None = None) -> None:
        if threading.current_thread() is not only:
            original(timeout)
            return
        began = time.perf_counter()
        original(timeout)
        waits.append(time.perf_counter() - began)

    lock.acquire = acquire  # type: ignore[method-assign]


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--domains", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=5.0)
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="nwfilter-bench-") as tmp:
        root = Path(tmp)
        (root / "no-stock").mkdir()
        backend = MemoryBackend()
        engine = Engine(root, backend, stock_dir=root / "no-stock")
        engine.start()
        manager = DomainManager.for_engine(engine, hypervisors={"test": TestHypervisor()})
        manager.start()
        driver = manager.driver("test")
        probe = HoldProbe()
        engine.coordinator.register_driver("bench-probe", probe.lock, probe.unlock)
        engine.define_filter(filter_xml(80))

        began = time.perf_counter()
        for i in range(args.domains):
            manager.define_xml(domain_xml(f"vm{i}", i))
            manager.run("start", f"vm{i}")
        setup = time.perf_counter() - began
        manager.define_xml(domain_xml("probe-vm", args.domains + 1))
        print(f"domains running: {len(manager.list_domains())} "
              f"(defined and started in {setup:.2f}s, {setup / args.domains * 1e3:.2f} ms each)")

        # rebuilds alone
        solo: list[float] = []
        for n in range(5):
            t0 = time.perf_counter()
            outcome = engine.define_filter(filter_xml(1000 + n))
            solo.append(time.perf_counter() - t0)
        assert len(outcome.rebuilt) == args.domains, len(outcome.rebuilt)
        print(f"rebuild of {len(outcome.rebuilt)} ports, alone: define_filter "
              f"median {statistics.median(solo) * 1e3:.1f} ms; driver locks held "
              f"median {statistics.median(probe.holds) * 1e3:.1f} ms, "
              f"max {max(probe.holds) * 1e3:.1f} ms")
        probe.holds.clear()

        # rebuilds in a loop while another thread starts and stops a domain
        stop = threading.Event()
        rebuilds = [0]

        def rebuild_loop() -> None:
            port = 2000
            while not stop.is_set():
                port += 1
                engine.define_filter(filter_xml(port))
                rebuilds[0] += 1

        waits: list[float] = []
        starts: list[float] = []

        def start_loop() -> None:
            while not stop.is_set():
                t0 = time.perf_counter()
                manager.run("start", "probe-vm")
                starts.append(time.perf_counter() - t0)
                manager.run("destroy", "probe-vm")

        starter = threading.Thread(target=start_loop, name="starter")
        timed_lock(driver.lock, waits, starter)
        rebuilder = threading.Thread(target=rebuild_loop, name="rebuilder")
        rebuilder.start()
        starter.start()
        time.sleep(args.seconds)
        stop.set()
        rebuilder.join()
        starter.join()
        print(f"under load ({args.seconds:g}s): {rebuilds[0]} rebuilds, {len(starts)} starts")
        print(f"  driver locks held per rebuild: median "
              f"{statistics.median(probe.holds) * 1e3:.1f} ms, max {max(probe.holds) * 1e3:.1f} ms"
              f"  (target < 500 ms)")
        print(f"  concurrent start, longest wait for one lock: {max(waits) * 1e3:.1f} ms, "
              f"p99 {percentile(waits, 0.99) * 1e3:.1f} ms, median "
              f"{statistics.median(waits) * 1e3:.2f} ms  (target < 50 ms)")
        print(f"  concurrent start, whole call: median {statistics.median(starts) * 1e3:.1f} ms, "
              f"max {max(starts) * 1e3:.1f} ms")
        manager.stop_all()
        engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
