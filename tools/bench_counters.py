"""Per-packet cost of the nft rule counters (needs root).

Builds a throwaway lab (namespaces `nwt-<hex>-…`): a host namespace with
bridge br0 and two guest namespaces on vnet0/vnet1, both bound to the
stock clean-traffic filter through the engine and the nft backend.  Guest 0
sends small UDP packets to guest 1 (which drops them in its own INPUT, so
nothing answers), as fast as one process can, and the bench reports the
sender's CPU time per packet (the bridge and its hooks run in the sender's
context on a veth pair; the wall time is printed too)

  * with the rules as the renderer writes them (a `counter` in every rule
    of the ports' chains, an entry counter at the top of each root), and
  * with the same rules without any counter (written by the bench, as a
    renderer without counters would: the same expressions less `counter`),

interleaved (counted, uncounted, counted, ...) so that drift of the machine
over the run does not show up as a difference.  A counter costs only where
its rule matches; the bench prints how many counters each packet moved.

Usage: .venv/bin/python tools/bench_counters.py [--packets N] [--reps R]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nwfilter.backends.nft import NftBackend, render
from nwfilter.conf.model import BindingDef, FilterRef, Parameter
from nwfilter.engine import Engine
from nwfilter.netlab import NetLab

STOCK = Path(__file__).resolve().parents[1] / "filters"
PAYLOAD = 18

SENDER = """
import socket, sys, time
ip, count, size = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
data = b"x" * size
send = s.sendto
where = (ip, 9)
t0, c0 = time.perf_counter(), time.process_time()
for _ in range(count):
    send(data, where)
print(time.perf_counter() - t0, time.process_time() - c0)
"""


def binding(i: int, mac: str, ip: str) -> BindingDef:
    return BindingDef(owner_name=f"vm{i}", owner_uuid=uuid.UUID(int=i + 1), portdev=f"vnet{i}",
                      mac=mac, filterref=FilterRef("clean-traffic", (Parameter("IP", ip),)))


def uncounted(backend: NftBackend) -> dict[str, Any]:
    """One transaction rewriting every port's chains without counters."""
    caps = backend.capabilities()
    commands: list[dict[str, Any]] = []
    for portdev in backend.ports():
        held = backend.record(portdev)
        assert held is not None
        ruleset, record = held
        _batch, record = render.render_port(ruleset, record.port_id, None, caps)
        for (family, name), rules in sorted(record.contents.items()):
            if name.endswith("/" + render.STAMP_CHAIN):
                continue
            commands.append({"flush": {"chain": {"family": family, "table": render.TABLE,
                                                 "name": name}}})
            for exprs, origin in rules:
                if origin == render.ENTRY_TEXT:
                    continue
                plain = [e for e in exprs if e != render.COUNTER]
                text = origin if origin is not None else render.port_id_comment(record.port_id)
                commands.append({"add": {"rule": {
                    "family": family, "table": render.TABLE, "chain": name, "expr": plain,
                    "comment": render.rule_comment(text, render.digest(plain, text))}}})
    return {"nftables": commands}


def hits(backend: NftBackend) -> int:
    """The packets all our counters counted so far."""
    found = 0
    for text in backend.listing_text().values():
        for line in (text or "").splitlines():
            if "#d=" in line and "counter packets " in line:
                found += int(line.split("counter packets ", 1)[1].split()[0])
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--packets", type=int, default=200_000, help="UDP packets per run")
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()

    with NetLab() as lab, tempfile.TemporaryDirectory(prefix="nwt-bench-") as tmp:
        host = lab.add_ns("host")
        lab.add_bridge(host, "br0")
        guests: list[tuple[str, str, str]] = []
        for i in range(2):
            ns = lab.add_ns(f"g{i}")
            mac, ip = f"52:54:00:00:00:{i:02x}", f"10.77.0.1{i}"
            lab.add_veth(host, f"vnet{i}", ns, mac=mac, addrs=[f"{ip}/24"], bridge="br0")
            guests.append((ns, mac, ip))
        (g0, _mac0, ip0), (g1, mac1, ip1) = guests
        lab.run(g0, ["ip", "neigh", "replace", ip1, "lladdr", mac1, "dev", "eth0",
                     "nud", "permanent"])
        lab.run(g1, ["iptables", "-A", "INPUT", "-p", "udp", "-j", "DROP"])

        backend = NftBackend(netns=host)
        engine = Engine(Path(tmp) / "root", backend, stock_dir=STOCK)
        engine.start()
        engine.create_bindings([binding(i, mac, ip) for i, (_ns, mac, ip) in enumerate(guests)])
        plain = Path(tmp) / "uncounted.json"
        plain.write_text(json.dumps(uncounted(backend)))

        def run(label: str) -> float:
            out = lab.run(g0, [sys.executable, "-c", SENDER, ip1, str(args.packets),
                               str(PAYLOAD)], timeout=600).stdout
            wall, cpu = (float(x) / args.packets * 1e9 for x in out.split())
            print(f"  {label:>10}: {cpu:7.0f} ns/packet CPU ({wall:7.0f} wall)", flush=True)
            return cpu

        counted: list[float] = []
        bare: list[float] = []
        try:
            run("warm-up")
            print(f"UDP {ip0} -> {ip1} through br0, {PAYLOAD}-byte payload, clean-traffic on "
                  f"both ports, {args.reps} x {args.packets} packets per case, interleaved")
            before = hits(backend)
            for rep in range(args.reps):
                counted.append(run("counted"))
                if rep == 0:
                    print(f"  (each packet moved {(hits(backend) - before) / args.packets:.2f} "
                          "counters)", flush=True)
                lab.run(host, ["nft", "-j", "-f", str(plain)])
                bare.append(run("uncounted"))
                backend.repair(None)  # as rendered again: with counters
        finally:
            engine.close()
            backend.clear_all()

    # The fastest run of each case is the one least disturbed by the rest
    # of the machine; the medians show how much that disturbance is.
    for name, pick in (("fastest", min), ("median", statistics.median)):
        c, b = pick(counted), pick(bare)
        print(f"{name}: with counters {c:.0f} ns/packet, without {b:.0f} ns/packet: "
              f"{c - b:+.0f} ns/packet ({(c / b - 1) * 100:+.1f}%)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
