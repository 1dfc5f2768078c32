"""Benchmark of an engine restart and of one embedded command with many bound
ports (needs root; everything happens in a throwaway namespace).

With N ports (default 1000) bound to the stock clean-traffic filter:
  * an engine restart with nothing changed: its time, and how many kernel
    writes it made (events on our tables that `nft monitor`, run in the
    namespace, printed; 0 means no transaction at all);
  * one embedded `nwfilter-binding-create` of a new port (what the CLI does
    without a daemon: start an engine, bind, close), in-process, so the
    interpreter's start-up is not counted; and the events it caused.

Usage: .venv/bin/python tools/bench_restart.py [--ports N] [--repeat R]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nwfilter import cli
from nwfilter.backends.nft import NftBackend
from nwfilter.conf.model import BindingDef, FilterRef, Parameter
from nwfilter.engine import Engine
from nwfilter.netlab import NetLab

STOCK = Path(__file__).resolve().parents[1] / "filters"


class Events:
    """`nft monitor` in `ns`; `take()` counts the events on our tables since
    the last call, once a marker transaction shows all of them were written."""

    def __init__(self, lab: NetLab, ns: str, path: Path) -> None:
        self.lab, self.ns, self.path = lab, ns, path
        self._out = path.open("w")
        self.proc = subprocess.Popen(["ip", "netns", "exec", ns, "nft", "monitor"],
                                     stdout=self._out, stderr=subprocess.STDOUT)
        self._seen = 0
        self._marks = 0
        self.take()

    def take(self) -> int:
        self._marks += 1
        mark = f"bench_mark{self._marks}"
        while True:
            self.lab.run(self.ns, ["nft", "add", "table", "ip", mark])
            self.lab.run(self.ns, ["nft", "delete", "table", "ip", mark])
            for _ in range(100):
                lines = self.path.read_text().splitlines()
                hits = [i for i, line in enumerate(lines) if mark in line]
                if hits:
                    count = sum(1 for line in lines[self._seen:hits[0]] if " nwfilter " in line)
                    self._seen = hits[-1] + 1
                    return count
                time.sleep(0.05)

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        self._out.close()


def binding(i: int) -> BindingDef:
    return BindingDef(f"vm{i}", uuid.uuid4(), f"tap{i}",
                      f"52:54:01:00:{i // 256:02x}:{i % 256:02x}",
                      FilterRef("clean-traffic", (Parameter(
                          "IP", f"10.{100 + i // 65536}.{(i // 256) % 256}.{i % 256}"),)))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=int, default=1000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with NetLab() as lab, tempfile.TemporaryDirectory() as tmp:
        ns = lab.add_ns("host")
        lab.enable_bridge_netfilter(ns)
        root = Path(tmp) / "root"
        engine = Engine(root, NftBackend(netns=ns), stock_dir=STOCK)
        engine.start()
        t0 = time.perf_counter()
        engine.create_bindings([binding(i) for i in range(args.ports)])
        print(f"bind {args.ports} ports (one transaction)      "
              f"{(time.perf_counter() - t0) * 1000:9.1f} ms")
        engine.close()
        events = Events(lab, ns, Path(tmp) / "monitor.txt")
        try:
            restarts: list[float] = []
            writes = 0
            for _ in range(args.repeat):
                engine = Engine(root, NftBackend(netns=ns), stock_dir=STOCK)
                t0 = time.perf_counter()
                engine.start()
                restarts.append(time.perf_counter() - t0)
                engine.close()
                writes += events.take()
            print(f"engine restart, nothing changed ({args.ports} bound)  "
                  f"{statistics.median(restarts) * 1000:9.1f} ms  (median of {args.repeat}; "
                  f"{writes} kernel write(s) in all)")
            creates: list[float] = []
            added = []
            base = ["--root", str(root), "--backend", "nft", "--netns", ns, "-q"]
            for k in range(args.repeat):
                xml = Path(tmp) / f"new{k}.xml"
                xml.write_text(
                    f"<filterbinding><owner><name>new{k}</name><uuid>{uuid.uuid4()}</uuid>"
                    f"</owner><portdev name='new{k}'/><mac address='52:54:02:00:00:{k:02x}'/>"
                    "<filterref filter='clean-traffic'><parameter name='IP' "
                    f"value='10.99.0.{k + 1}'/></filterref></filterbinding>")
                t0 = time.perf_counter()
                status = cli.main([*base, "nwfilter-binding-create", str(xml)])
                creates.append(time.perf_counter() - t0)
                assert status == 0, status
                added.append(events.take())
            print(f"embedded nwfilter-binding-create ({args.ports} bound) "
                  f"{statistics.median(creates) * 1000:9.1f} ms  (median of {args.repeat}; "
                  f"events per call: {added})")
        finally:
            events.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
