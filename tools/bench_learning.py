"""Benchmark of IP address learning in a throwaway namespace (needs root).

Ports are veth pairs in one namespace, each bound to clean-traffic with
CTRL_IP_LEARNING=dhcp and a DHCPSERVER; the engine uses the nft backend and
the learning listener runs on its own event loop, as in nwfilterd.  A
DHCPACK is sent out of each port (the listener sees it on its way to the
guest, as a real server's reply); the figure is the time from that send to
the moment the engine's one transaction with the port's full ruleset
(learnt IP in force) was committed by the kernel.

Prints, for 1 port and for N ports whose ACKs are sent at once (default
100): p50, p95 and max of that latency, the transactions made, and the
listener's CPU time per learnt packet (parsing and deciding, on the loop
thread; the kernel transaction is in the latency).

Usage: .venv/bin/python tools/bench_learning.py [--ports N]
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nwfilter.backends.nft import NftBackend
from nwfilter.conf.model import BindingDef, FilterRef, Parameter
from nwfilter.domain.eventloop import EventLoop
from nwfilter.engine import Engine
from nwfilter.learn.listener import ETH_P_ALL, Listener
from nwfilter.netlab import NetLab
from nwfilter.netns import in_netns
from tests.unit.learn.frames import dhcp_reply

SERVER = "10.0.0.1"


def mac(i: int) -> str:
    return f"52:54:02:00:{i // 256:02x}:{i % 256:02x}"


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def run(lab: NetLab, host: str, count: int, offset: int) -> None:
    ports = [f"lp{offset + i}" for i in range(count)]
    for i, port in enumerate(ports):
        lab.iproute.ip(host, "link", "add", port, "type", "veth", "peer", "name",
                       f"lq{offset + i}")
        lab.iproute.ip(host, "link", "set", port, "up")
        lab.iproute.ip(host, "link", "set", f"lq{offset + i}", "up")
    root = Path(tempfile.mkdtemp(prefix="nwfilter-bench-"))
    engine = Engine(root, NftBackend(netns=host))
    engine.start()
    loop = EventLoop()
    loop.start()
    listener = Listener(engine, loop, host)
    done: dict[str, float] = {}
    all_done = threading.Event()

    def applied(names: list[str]) -> None:
        now = time.perf_counter()
        for name in names:
            done.setdefault(name, now)
        if len(done) >= count:
            all_done.set()

    listener.on_applied = applied
    listener.start()
    try:
        params = (Parameter("CTRL_IP_LEARNING", "dhcp"), Parameter("DHCPSERVER", SERVER))
        engine.create_bindings([
            BindingDef(f"vm{offset + i}", uuid.uuid4(), port, mac(offset + i),
                       FilterRef("clean-traffic", params))
            for i, port in enumerate(ports)
        ])
        deadline = time.monotonic() + 10
        while len(listener.ports()) < count and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)
        frames = [dhcp_reply("ack", f"10.0.{(offset + i) // 250}.{(offset + i) % 250 + 2}",
                             SERVER, chaddr=mac(offset + i), lease=3600)
                  for i in range(count)]
        socks = []
        with in_netns(host):
            for port in ports:
                sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
                sock.bind((port, ETH_P_ALL))
                socks.append(sock)
        sent: dict[str, float] = {}
        for port, sock, frame in zip(ports, socks, frames, strict=True):
            sent[port] = time.perf_counter()
            sock.send(frame)
        all_done.wait(30)
        for sock in socks:
            sock.close()
        lat = [(done[p] - sent[p]) * 1000 for p in ports if p in done]
        frames_seen = listener.counters["frames"]
        cpu_us = listener.cpu_ns / 1000 / max(1, frames_seen)
        print(f"{count:>4} port(s): learnt {len(lat)}/{count}; ACK on the wire -> ruleset in "
              f"force: p50 {statistics.median(lat):.1f} ms, p95 {percentile(lat, 0.95):.1f} ms, "
              f"max {max(lat):.1f} ms; {listener.applied} transaction(s); listener CPU "
              f"{cpu_us:.0f} us per packet ({frames_seen} packets)")
    finally:
        loop.stop()
        listener.stop()
        for port in ports:
            engine.delete_binding(port)
        engine.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ports", type=int, default=100)
    args = parser.parse_args()
    with NetLab() as lab:
        run(lab, lab.add_ns("one"), 1, 0)
        run(lab, lab.add_ns("many"), args.ports, 1000)
    return 0


if __name__ == "__main__":
    sys.exit(main())
