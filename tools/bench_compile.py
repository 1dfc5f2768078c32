"""Benchmark: compile the stock clean-traffic filter for many ports.

Usage: .venv/bin/python tools/bench_compile.py [--ports N] [--repeat R]

Prints ports per second (best of R runs) for one batch through
`compile_many`, which shares the per-filter work between ports.
"""

from __future__ import annotations

import argparse
import time
import uuid
from pathlib import Path

from nwfilter.compile import compile_many
from nwfilter.conf import parse_filter
from nwfilter.conf.model import BindingDef, FilterDef, FilterRef, Parameter

STOCK = Path(__file__).resolve().parent.parent / "filters"


def load_stock() -> dict[str, FilterDef]:
    filters: dict[str, FilterDef] = {}
    for path in sorted(STOCK.glob("*.xml")):
        fdef = parse_filter(path.read_bytes(), source=str(path))
        filters[fdef.name] = fdef
    return filters


def make_bindings(count: int) -> list[BindingDef]:
    out = []
    for n in range(count):
        mac = f"52:54:00:{(n >> 16) & 0xFF:02x}:{(n >> 8) & 0xFF:02x}:{n & 0xFF:02x}"
        ip = f"10.{(n >> 16) & 0xFF}.{(n >> 8) & 0xFF}.{n & 0xFF}"
        out.append(
            BindingDef(
                f"vm{n}", uuid.UUID(int=n + 1), f"vnet{n}", mac,
                FilterRef("clean-traffic", (Parameter("IP", ip),)),
            )
        )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=int, default=10_000)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    filters = load_stock()
    bindings = make_bindings(args.ports)
    best = float("inf")
    for _ in range(args.repeat):
        start = time.perf_counter()
        rulesets = compile_many(bindings, filters)
        best = min(best, time.perf_counter() - start)
    assert len(rulesets) == args.ports
    rules = sum(len(c.rules) for rs in rulesets.values() for cs in rs.l2.values() for c in cs)
    print(
        f"clean-traffic: {args.ports} ports in {best:.3f} s = {args.ports / best:,.0f} ports/s"
        f" ({rules / args.ports:.0f} layer-2 rules per port)"
    )


if __name__ == "__main__":
    main()
