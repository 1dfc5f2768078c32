"""Benchmark of the nft backend in a throwaway namespace (needs root).

Measures, for N ports with clean-traffic-sized rulesets (default 1000):
  * apply one port per transaction (total and per port);
  * clear everything, then apply all ports in one transaction;
  * rebuild (replace) all ports in one transaction;
  * replace one port while N are installed;
  * optionally (--throughput) UDP throughput between two guests on the
    bridge with 0 and with N other ports installed, using a Python socket
    blaster (iperf3 is not required).

Usage: .venv/bin/python tools/bench_nft.py [--ports N] [--throughput]
"""

from __future__ import annotations

import argparse
import contextlib
import re
import socket
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nwfilter.backends.nft import NftBackend
from nwfilter.ir import Changes, Ruleset
from nwfilter.netlab import NetLab
from nwfilter.netns import in_netns
from tests.nft_rulesets import clean_traffic


def rulesets(n: int) -> list[Ruleset]:
    return [clean_traffic(f"tap{i}", f"52:54:01:00:{i // 256:02x}:{i % 256:02x}",
                          f"10.{100 + i // 65536}.{(i // 256) % 256}.{i % 256}")
            for i in range(n)]


def timed(label: str, fn: object, per: int | None = None) -> float:
    assert callable(fn)
    t0 = time.perf_counter()
    fn()
    dt = time.perf_counter() - t0
    extra = f"  ({dt / per * 1000:.2f} ms per port)" if per else ""
    print(f"{label:<48} {dt * 1000:9.1f} ms{extra}")
    return dt


def blast(lab: NetLab, src: str, dst: str, dst_ip: str, seconds: float) -> float:
    """UDP packets/s received by `dst` from a sender in `src`."""
    with in_netns(dst):
        rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    rx.bind((dst_ip, 5001))
    rx.settimeout(0.2)
    count = 0
    stop = threading.Event()

    def receive() -> None:
        nonlocal count
        while not stop.is_set():
            try:
                rx.recv(2048)
                count += 1
            except TimeoutError:
                continue

    thread = threading.Thread(target=receive)
    thread.start()
    with in_netns(src):
        tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    payload = b"x" * 1000
    end = time.monotonic() + seconds
    t0 = time.monotonic()
    while time.monotonic() < end:
        for _ in range(200):
            with contextlib.suppress(OSError):  # ENOBUFS when the queue is full
                tx.sendto(payload, (dst_ip, 5001))
    elapsed = time.monotonic() - t0
    time.sleep(0.3)
    stop.set()
    thread.join()
    rx.close()
    tx.close()
    return count / elapsed


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=int, default=1000)
    parser.add_argument("--throughput", action="store_true")
    args = parser.parse_args()
    n = args.ports
    with NetLab() as lab:
        host = lab.add_ns("host")
        backend = NftBackend(netns=host)
        backend.probe()
        sets = rulesets(n)
        print(f"{n} ports, {sum(len(c.rules) for c in sets[0].chains(next(iter(sets[0].l2))))}"
              f"+ rules each (clean-traffic shape)")

        def per_port() -> None:
            for rs in sets:
                backend.apply(Changes(set=(rs,)))

        timed(f"apply {n} ports, one transaction each", per_port, per=n)
        backend.clear_all()
        timed(f"apply {n} ports in one transaction",
              lambda: backend.apply(Changes(set=tuple(sets))), per=n)
        timed(f"rebuild all {n} ports in one transaction",
              lambda: backend.apply(Changes(set=tuple(sets))), per=n)
        timed(f"replace 1 port with {n} installed",
              lambda: backend.apply(Changes(set=(sets[n // 2],))))
        timed(f"remove 1 port with {n} installed",
              lambda: backend.apply(Changes(remove=(sets[n // 2].port.portdev,))))
        out = lab.run(host, ["nft", "list", "ruleset"], timeout=60).stdout
        chains = len(re.findall(r"^\s*chain \S+ \{", out, re.M))
        print(f"kernel ruleset: {out.count(chr(10))} lines, {chains} chains")
        if args.throughput:
            lab.add_bridge(host, "br0")
            guests = []
            for i in range(2):
                ns = lab.add_ns(f"g{i}")
                lab.add_veth(host, f"vnet{i}", ns, mac=f"52:54:00:00:00:{i:02x}",
                             addrs=[f"10.77.0.1{i}/24"], bridge="br0")
                guests.append(ns)
            g = [clean_traffic(f"vnet{i}", f"52:54:00:00:00:{i:02x}", f"10.77.0.1{i}")
                 for i in range(2)]
            backend.clear_all()
            blast(lab, guests[0], guests[1], "10.77.0.11", 0.5)  # warm-up, ARP
            base = blast(lab, guests[0], guests[1], "10.77.0.11", 3)
            print(f"UDP throughput, no filters:         {base:10.0f} pkt/s")
            backend.apply(Changes(set=tuple(g)))
            one = blast(lab, guests[0], guests[1], "10.77.0.11", 3)
            print(f"UDP throughput, 2 filtered ports:   {one:10.0f} pkt/s")
            backend.apply(Changes(set=tuple(sets)))
            many = blast(lab, guests[0], guests[1], "10.77.0.11", 3)
            print(f"UDP throughput, {n + 2} filtered ports: {many:10.0f} pkt/s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
