"""Benchmark of `nwfilter audit` and `nwfilter explain`.

Binds `--ports` ports (default 1,000) to `clean-traffic` (plus a layer-3
rule) with the nft backend in a throwaway network namespace (no bridge or
interfaces are needed: the rules are keyed by port name), then times a
whole audit of every port (one listing of both tables, drift against the
backend's records, exposure probes and hygiene per port), wall and CPU
time of this process:

  a. the first audit: every port compiled (bound after the engine's start,
     so the engine holds no compile of theirs yet);
  b. one-shot audits (`run_audit`, a fresh `Auditor`, as the embedded
     command line runs one): the engine's compiled rulesets reused, every
     probe walked; best and median of `--rounds`;
  c. audits through one `Auditor` (as nwfilterd's `audit.run` and its
     periodic audit hold it): nothing changed, so no probe is walked
     again; best and median of `--rounds`;
  d. explain of one packet through one port (the walk with its trace, as
     `explain.packet` answers it), mean over 1,000 packets.

Prints figures, asserts nothing.  Needs root; the namespace and the state
root (under /var/tmp) are removed at the end.

Usage: python tools/bench_audit.py [--ports N] [--rounds N]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from nwfilter.audit.explain import Explainer
from nwfilter.audit.packet import PacketSpec, build_frame
from nwfilter.audit.run import Auditor, run_audit
from nwfilter.backends.nft import NftBackend
from nwfilter.conf.model import BindingDef, FilterRef, Parameter
from nwfilter.engine import Engine
from nwfilter.ir import Hook
from nwfilter.netlab import NetLab

STOCK = Path(__file__).resolve().parents[1] / "filters"
GUEST = """<filter name='guest' chain='root'>
  <filterref filter='clean-traffic'/>
  <rule action='drop' direction='out' priority='-900'>
    <udp srcportstart='67' dstportstart='68'/></rule>
  <rule action='accept' direction='in'><tcp dstportstart='22'/></rule>
</filter>"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ports", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="nwfilter-bench-audit-", dir="/var/tmp"))
    try:
        with NetLab() as lab:
            ns = lab.add_ns("audit")
            backend = NftBackend(netns=ns)
            engine = Engine(root / "state", backend, stock_dir=STOCK)
            engine.start()
            engine.define_filter(GUEST)
            bindings = [
                BindingDef(f"vm{n}", uuid.UUID(int=n + 1), f"vnet{n}",
                           f"52:54:00:{n >> 16 & 255:02x}:{n >> 8 & 255:02x}:{n & 255:02x}",
                           FilterRef("guest", (Parameter("IP", f"10.{n >> 16 & 255}."
                                                                f"{n >> 8 & 255}.{n & 255}"),)))
                for n in range(args.ports)]
            engine.create_bindings(bindings)

            def timed(audit: Callable[[], dict[str, Any]]) -> tuple[float, float, int]:
                began, cpu = time.perf_counter(), time.process_time()
                result = audit()
                return (time.perf_counter() - began, time.process_time() - cpu,
                        len(result["findings"]))

            wall, cpu, findings = timed(lambda: run_audit(engine, None))
            print(f"a. first audit of {args.ports} ports: {wall * 1000:.0f} ms "
                  f"(cpu {cpu * 1000:.0f} ms, {findings} findings)")
            auditor = Auditor()
            for label, audit in (
                ("b. one-shot audit", lambda: run_audit(engine, None)),
                ("c. audit through one Auditor", lambda: auditor.run(engine, None)),
            ):
                rounds = [timed(audit) for _ in range(args.rounds)]
                walls = [r[0] for r in rounds]
                cpus = [r[1] for r in rounds]
                print(f"{label} of {args.ports} ports: best {min(walls) * 1000:.0f} ms, "
                      f"median {statistics.median(walls) * 1000:.0f} ms (cpu best "
                      f"{min(cpus) * 1000:.0f} ms, median {statistics.median(cpus) * 1000:.0f}"
                      f" ms) over {args.rounds} rounds ({rounds[-1][2]} findings)")
            explainer = Explainer(engine.ruleset("vnet0"))
            frame = build_frame(PacketSpec(src_mac="52:54:00:00:00:00", proto="tcp",
                                           src_ip="10.0.0.0", dst_ip="10.0.0.1", sport=40000,
                                           dport=22))
            began = time.perf_counter()
            for _ in range(1000):
                explainer.explain(Hook.FROM_VM, frame)
            per = (time.perf_counter() - began)
            began = time.perf_counter()
            for _ in range(100):
                Explainer(engine.ruleset("vnet0")).explain(Hook.FROM_VM, frame)
            cold = (time.perf_counter() - began) * 10
            print(f"d. explain of one packet: {per:.3f} ms (walk), {cold:.3f} ms "
                  "(with the port's ruleset looked up)")
            engine.close()
            backend.clear_all()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
