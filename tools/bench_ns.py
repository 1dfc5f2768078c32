"""Time to start (and stop) `ns` domains with `clean-traffic` on their NICs.

Everything runs in a throwaway namespace (the host side: a bridge and the
nft backend); each domain is a network namespace joined to the bridge by a
veth pair with an address.  Each round starts `--domains` domains one after
the other, then stops them, and reports the wall time and how much of the
start went to building the links (`prepare`) and bringing them up until
they carry (`launch`); the rest is filters and bookkeeping.  It also
prints the CPU time of the starts (this process and the `ip` processes
it ran), which a busy machine sways less than wall time, and how many
`ip` processes a start ran.

    python tools/bench_ns.py --domains 20 --rounds 3
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from nwfilter.backends.nft import NftBackend
from nwfilter.conf.model import DomainDef
from nwfilter.domain.hypervisor import PortPlan
from nwfilter.domain.manager import DomainManager
from nwfilter.domain.nsvm import NsHypervisor
from nwfilter.engine import Engine
from nwfilter.netlab import NetLab
from nwfilter.netns import run_tool

STOCK = Path(__file__).resolve().parents[1] / "filters"


class Spawns:
    """The `ip` processes the hypervisor runs (its runner)."""

    def __init__(self) -> None:
        self.count = 0

    def __call__(self, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
        self.count += 1
        return run_tool(argv)


class TimedNs(NsHypervisor):
    prepared = 0.0
    launched = 0.0

    def prepare(self, dom: DomainDef, ports: Sequence[PortPlan]) -> None:
        began = time.perf_counter()
        super().prepare(dom, ports)
        self.prepared += time.perf_counter() - began

    def launch(self, dom: DomainDef) -> None:
        began = time.perf_counter()
        super().launch(dom)
        self.launched += time.perf_counter() - began


def _cpu() -> float:
    """CPU seconds used so far by this process and its waited-for children:
    less swayed than wall time by whatever else the machine runs."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def domain_xml(i: int) -> str:
    return (
        f"<domain type='ns'><name>vm{i}</name><memory unit='MiB'>64</memory>"
        "<devices><interface type='bridge'><source bridge='br0'/>"
        f"<mac address='52:54:00:00:10:{i:02x}'/><ip address='10.1.0.{i + 10}' prefix='24'/>"
        f"<filterref filter='clean-traffic'><parameter name='IP' value='10.1.0.{i + 10}'/>"
        "</filterref></interface></devices></domain>"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--domains", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    names = [f"vm{i}" for i in range(args.domains)]
    starts: list[float] = []
    stops: list[float] = []
    start_spawns: list[int] = []
    start_cpu: list[float] = []
    prepared: list[float] = []
    launched: list[float] = []
    with NetLab() as lab, tempfile.TemporaryDirectory(prefix="bench-ns.") as tmp:
        host = lab.add_ns("host")
        lab.add_bridge(host, "br0")
        root = Path(tmp) / "root"
        engine = Engine(root, NftBackend(netns=host), stock_dir=STOCK)
        engine.start()
        spawns = Spawns()
        hypervisor = TimedNs(root / "run" / "hypervisor" / "ns", host, runner=spawns)
        manager = DomainManager.for_engine(engine, netns=host, hypervisors={"ns": hypervisor})
        try:
            for i in range(args.domains):
                manager.define_xml(domain_xml(i))
            for _ in range(args.rounds):
                hypervisor.prepared = hypervisor.launched = 0.0
                spawns.count = 0
                cpu = _cpu()
                began = time.perf_counter()
                for name in names:
                    manager.run("start", name)
                starts.append(time.perf_counter() - began)
                start_cpu.append(_cpu() - cpu)
                start_spawns.append(spawns.count)
                prepared.append(hypervisor.prepared)
                launched.append(hypervisor.launched)
                began = time.perf_counter()
                for name in names:
                    manager.run("destroy", name)
                stops.append(time.perf_counter() - began)
        finally:
            manager.stop_all()
            engine.close()
    print(f"{args.domains} ns domains one after the other, {args.rounds} rounds")
    print(f"  {'':12} {'min ms':>8} {'median ms':>10}")
    for label, spans in (("start all", starts), ("  prepare", prepared),
                         ("  launch", launched), ("destroy all", stops)):
        print(f"  {label:12} {min(spans) * 1000:8.0f} {statistics.median(spans) * 1000:10.0f}")
    print(f"  {'start CPU':12} {min(start_cpu) * 1000:8.0f} "
          f"{statistics.median(start_cpu) * 1000:10.0f}  (this process and its 'ip' children)")
    print(f"  'ip' processes per start: {max(start_spawns) / args.domains:.1f}")
    print("  (prepare: namespace, veth pairs, addresses, bridge ports;"
          " launch: ports up until they carry)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
