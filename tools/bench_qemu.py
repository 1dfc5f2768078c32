"""Start-to-running time of QEMU domains with `clean-traffic` on their NICs,
and the share of it spent applying their filters.

Everything runs in a throwaway namespace (a bridge, the domains' taps, the
nft backend); the guests are QEMU processes with no disk (TCG by default,
`--kvm` for KVM).  Each round starts `--domains` domains one after the
other and then all at once (a thread each), and reports per domain: the
whole start, the taps (`prepare`), the filters (`create_bindings`) and QEMU
(`launch`: spawn, monitor, `cont`).

    python tools/bench_qemu.py --domains 10
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

from nwfilter.backends.nft import NftBackend
from nwfilter.conf.model import BindingDef, DomainDef
from nwfilter.domain.hypervisor import PortPlan
from nwfilter.domain.manager import DomainManager
from nwfilter.domain.qemuvm import QemuHypervisor
from nwfilter.engine import Engine
from nwfilter.netlab import NetLab

STOCK = Path(__file__).resolve().parents[1] / "filters"


class Timings:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.spans: dict[str, list[float]] = defaultdict(list)

    def add(self, what: str, seconds: float) -> None:
        with self.lock:
            self.spans[what].append(seconds)


class TimedHypervisor(QemuHypervisor):
    timings: Timings

    def prepare(self, dom: DomainDef, ports: Sequence[PortPlan]) -> None:
        began = time.perf_counter()
        super().prepare(dom, ports)
        self.timings.add("taps (prepare)", time.perf_counter() - began)

    def launch(self, dom: DomainDef) -> None:
        began = time.perf_counter()
        super().launch(dom)
        self.timings.add("qemu (launch)", time.perf_counter() - began)


class TimedEngine:
    def __init__(self, engine: Engine, timings: Timings) -> None:
        self.engine, self.timings = engine, timings

    def create_bindings(self, defs: Sequence[BindingDef]) -> object:
        began = time.perf_counter()
        try:
            return self.engine.create_bindings(defs)
        finally:
            self.timings.add("filters (create_bindings)", time.perf_counter() - began)

    def delete_binding(self, portdev: str) -> object:
        return self.engine.delete_binding(portdev)


def domain_xml(i: int, dtype: str) -> str:
    return (
        f"<domain type='{dtype}'><name>vm{i}</name><memory unit='MiB'>64</memory>"
        "<devices><interface type='bridge'><source bridge='br0'/><model type='virtio'/>"
        f"<filterref filter='clean-traffic'><parameter name='IP' value='10.1.0.{i + 10}'/>"
        "</filterref></interface></devices></domain>"
    )


def run_round(manager: DomainManager, names: list[str], timings: Timings,
              concurrent: bool) -> float:
    began = time.perf_counter()

    def start(name: str) -> None:
        t0 = time.perf_counter()
        manager.run("start", name)
        timings.add("start (whole)", time.perf_counter() - t0)

    if concurrent:
        threads = [threading.Thread(target=start, args=(n,)) for n in names]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
    else:
        for name in names:
            start(name)
    return time.perf_counter() - began


def report(label: str, wall: float, timings: Timings, count: int) -> None:
    print(f"\n{label}: {count} domains running after {wall * 1000:.0f} ms")
    whole = sum(timings.spans["start (whole)"])
    print(f"  {'phase':28} {'median ms':>10} {'max ms':>8} {'share':>7}")
    for what in ("start (whole)", "taps (prepare)", "filters (create_bindings)",
                 "qemu (launch)"):
        spans = timings.spans.get(what, [])
        if not spans:
            continue
        share = sum(spans) / whole * 100 if whole else 0.0
        print(f"  {what:28} {statistics.median(spans) * 1000:10.1f} "
              f"{max(spans) * 1000:8.1f} {share:6.1f}%")


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=10)
    parser.add_argument("--kvm", action="store_true", help="type 'kvm' instead of 'qemu'")
    args = parser.parse_args(argv)
    dtype = "kvm" if args.kvm else "qemu"
    names = [f"vm{i}" for i in range(args.domains)]
    with NetLab() as lab, tempfile.TemporaryDirectory(prefix="bench-qemu.") as tmp:
        host = lab.add_ns("host")
        lab.add_bridge(host, "br0")
        root = Path(tmp) / "root"
        engine = Engine(root, NftBackend(netns=host), stock_dir=STOCK)
        engine.start()
        hypervisor = TimedHypervisor(dtype, root / "run" / "hypervisor" / dtype, host)
        manager = DomainManager.for_engine(engine, netns=host, hypervisors={dtype: hypervisor})
        try:
            for i in range(args.domains):
                manager.define_xml(domain_xml(i, dtype))
            for label, concurrent in (("one after the other", False), ("all at once", True)):
                timings = Timings()
                hypervisor.timings = timings
                manager.engine = TimedEngine(engine, timings)
                for driver in manager.drivers():
                    driver.engine = manager.engine
                wall = run_round(manager, names, timings, concurrent)
                report(label, wall, timings, args.domains)
                manager.stop_all()
        finally:
            manager.stop_all()
            hypervisor.close()
            engine.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
