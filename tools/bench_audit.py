"""Benchmark of `nwfilter audit` and `nwfilter explain`.

Binds `--ports` ports (default 1,000) to `clean-traffic` (plus a layer-3
rule) with the nft backend in a throwaway network namespace (no bridge or
interfaces are needed: the rules are keyed by port name), then times:

  a. a whole audit of every port (`run_audit`: one listing of both tables,
     a fresh compile, render and digest comparison, exposure probes and
     hygiene per port), best and median of `--rounds`;
  b. explain of one packet through one port (the walk with its trace, as
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
from pathlib import Path

from nwfilter.audit.explain import Explainer
from nwfilter.audit.packet import PacketSpec, build_frame
from nwfilter.audit.run import run_audit
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
            times = []
            findings = 0
            for _ in range(args.rounds):
                began = time.perf_counter()
                result = run_audit(engine, None)
                times.append(time.perf_counter() - began)
                findings = len(result["findings"])
            print(f"audit of {args.ports} ports: best {min(times) * 1000:.0f} ms, median "
                  f"{statistics.median(times) * 1000:.0f} ms over {args.rounds} rounds "
                  f"({findings} findings)")
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
            print(f"explain of one packet: {per:.3f} ms (walk), {cold:.3f} ms "
                  "(with the port's ruleset looked up)")
            engine.close()
            backend.clear_all()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
