"""End-to-end benchmark: bindings of the stock clean-traffic filter through
the engine (parse, compile, nft) in a throwaway namespace (needs root).

Prints, for N ports (default 1000):
  * creating N bindings one call each (total and per port);
  * creating N bindings in one call (one transaction);
  * redefining `no-ip-spoofing` with a changed rule, which rebuilds every
    bound port in one transaction;
  * redefining it unchanged (nothing to rebuild).

Usage: .venv/bin/python tools/bench_bindings.py [--ports N]
"""

from __future__ import annotations

import argparse
import re
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nwfilter.backends.nft import NftBackend
from nwfilter.conf.model import BindingDef, FilterRef, Parameter
from nwfilter.engine import Engine
from nwfilter.netlab import NetLab

STOCK = Path(__file__).resolve().parents[1] / "filters"


def binding(i: int) -> BindingDef:
    return BindingDef(
        owner_name=f"vm{i}",
        owner_uuid=uuid.UUID(int=i + 1),
        portdev=f"tap{i}",
        mac=f"52:54:01:00:{i // 256:02x}:{i % 256:02x}",
        filterref=FilterRef(
            "clean-traffic",
            (Parameter("IP", f"10.{100 + i // 65536}.{(i // 256) % 256}.{i % 256}"),),
        ),
    )


def report(label: str, seconds: float, per: int | None = None) -> None:
    extra = f"  ({seconds / per * 1000:.2f} ms per port)" if per else ""
    print(f"{label:<52} {seconds * 1000:9.1f} ms{extra}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=int, default=1000)
    args = parser.parse_args()
    n = args.ports
    defs = [binding(i) for i in range(n)]
    spoof = (STOCK / "no-ip-spoofing.xml").read_text()
    edited = spoof.replace("</filter>", "  <rule action='drop' direction='out' priority='999'>"
                           "<ip srcipaddr='192.0.2.1'/></rule>\n</filter>")
    with NetLab() as lab, tempfile.TemporaryDirectory() as tmp:
        host = lab.add_ns("host")
        engine = Engine(Path(tmp), NftBackend(netns=host), stock_dir=STOCK)
        engine.start()
        t0 = time.perf_counter()
        for b in defs:
            engine.create_bindings([b])
        report(f"create {n} bindings, one call each", time.perf_counter() - t0, n)
        for b in defs:
            engine.delete_binding(b.portdev)
        t0 = time.perf_counter()
        engine.create_bindings(defs)
        report(f"create {n} bindings in one call", time.perf_counter() - t0, n)
        t0 = time.perf_counter()
        outcome = engine.define_filter(edited)
        report(f"edit no-ip-spoofing: rebuild {len(outcome.rebuilt)} ports",
               time.perf_counter() - t0)
        t0 = time.perf_counter()
        outcome = engine.define_filter(edited)
        report(f"same define again: rebuild {len(outcome.rebuilt)} ports",
               time.perf_counter() - t0)
        t0 = time.perf_counter()
        engine.define_filter(spoof)
        report("edit it back", time.perf_counter() - t0)
        out = lab.run(host, ["nft", "list", "ruleset"], timeout=120).stdout
        chains = len(re.findall(r"^\s*chain \S+ \{", out, re.M))
        print(f"kernel ruleset: {out.count(chr(10))} lines, {chains} chains")
        engine.backend.clear_all()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
