"""The ebiptables backend next to the nft backend, in throwaway namespaces (needs root).

For each backend, in a fresh namespace with a bridge and br_netfilter on:
  * bind N ports (default 1000) to the stock clean-traffic filter through
    `Engine.create_bindings`, in batches (default 100 ports per call: one
    transaction each), and report ms per port;
  * redefine no-ip-spoofing with one more rule: every port is rebuilt in
    one transaction (total ms, ms per port);
  * unbind and bind one port with N installed;
  * processes started by the backend (restore/save runs; nft: none, it
    speaks to the kernel in process) for each step.

Usage: .venv/bin/python tools/bench_ebiptables.py [--ports N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nwfilter.backends import get_backend
from nwfilter.backends.base import Backend
from nwfilter.conf import parse_binding
from nwfilter.engine import Engine
from nwfilter.netlab import NetLab

ROOT = Path(__file__).resolve().parents[1]
EDIT = ("  <rule action='return' direction='out' priority='600'>\n"
        "    <ip srcipaddr='192.0.2.1'/>\n  </rule>\n</filter>")


def binding(i: int, ip_last: int = 0) -> str:
    mac = f"52:54:01:00:{i // 256:02x}:{i % 256:02x}"
    ip = f"10.{100 + i // 65536}.{(i // 256) % 256}.{(i + ip_last) % 256}"
    return (f"<filterbinding><owner><name>vm{i}</name><uuid>{uuid.UUID(int=i + 1)}</uuid>"
            f"</owner><portdev name='tap{i}'/><mac address='{mac}'/>"
            f"<filterref filter='clean-traffic'><parameter name='IP' value='{ip}'/>"
            f"</filterref></filterbinding>")


def processes(backend: Backend) -> int:
    runner = getattr(backend, "runner", None)
    return 0 if runner is None else int(runner.processes)


def run(name: str, ports: int, batch: int) -> None:
    with NetLab() as lab, tempfile.TemporaryDirectory() as tmp:
        ns = lab.add_ns("bench")
        lab.add_bridge(ns, "br0")
        lab.enable_bridge_netfilter(ns)
        backend = get_backend(name, ns)
        engine = Engine(Path(tmp), backend, stock_dir=ROOT / "filters")
        engine.start()
        try:
            p0, t0 = processes(backend), time.perf_counter()
            for start in range(0, ports, batch):
                engine.create_bindings([parse_binding(binding(i))
                                        for i in range(start, min(ports, start + batch))])
            dt, dp = time.perf_counter() - t0, processes(backend) - p0
            calls = -(-ports // batch)
            print(f"{name:<11} create {ports} ports, {batch} per call  {dt * 1000:9.0f} ms  "
                  f"{dt / ports * 1000:6.2f} ms/port  {dp} processes ({dp / calls:.1f} per call)")
            text = (ROOT / "filters" / "no-ip-spoofing.xml").read_text()
            p0, t0 = processes(backend), time.perf_counter()
            engine.define_filter(text.replace("</filter>", EDIT))
            dt, dp = time.perf_counter() - t0, processes(backend) - p0
            print(f"{name:<11} rebuild {ports} ports (no-ip-spoofing edited) {dt * 1000:9.0f} ms  "
                  f"{dt / ports * 1000:6.2f} ms/port  {dp} processes")
            p0, t0 = processes(backend), time.perf_counter()
            engine.delete_binding("tap0")
            engine.create_bindings([parse_binding(binding(0, ip_last=1))])
            dt, dp = time.perf_counter() - t0, processes(backend) - p0
            print(f"{name:<11} unbind and bind 1 port, {ports} installed  {dt * 1000:9.1f} ms  "
                  f"{dp} processes")
        finally:
            engine.close()
            backend.clear_all()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=100)
    parser.add_argument("--backends", default="nft,ebiptables")
    args = parser.parse_args()
    for name in args.backends.split(","):
        run(name, args.ports, args.batch)
    return 0


if __name__ == "__main__":
    sys.exit(main())
