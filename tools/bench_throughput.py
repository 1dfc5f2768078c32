"""TCP throughput through a filtered bridge with few and with many bound ports (needs root).

Builds a throwaway lab (namespaces `nwt-<hex>-…`): a host namespace with
bridge br0 and two guest namespaces on vnet0/vnet1, both bound to the
stock clean-traffic filter through the engine and the nft backend.  It
measures iperf3 TCP throughput from guest 0 to guest 1

  1. with only the two guest ports bound, then
  2. with N more ports bound (default 999) to clean-traffic, each with its
     own MAC and IP parameters.  The extra ports are interface names only:
     the backend dispatches on names, so no interface has to exist.

Each case runs REPS times (default 3) for SECONDS each (default 5) and
prints Gbit/s per run, the mean, and the relative difference of the means.
The per-packet cost of dispatch is one verdict-map lookup per base chain,
so the target is that the loaded figure is within 5% of the baseline.

Usage: .venv/bin/python tools/bench_throughput.py [--extra N] [--reps R] [--seconds S]
                                                  [--affinity C,S]
Needs iperf3 (`apt-get install -y iperf3`).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import subprocess
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
IPERF_PORT = 5201
TARGET = 0.05


def clean_traffic(i: int, portdev: str, mac: str, ip: str) -> BindingDef:
    return BindingDef(
        owner_name=f"vm{i}",
        owner_uuid=uuid.UUID(int=i + 1),
        portdev=portdev,
        mac=mac,
        filterref=FilterRef("clean-traffic", (Parameter("IP", ip),)),
    )


def extra_bindings(n: int) -> list[BindingDef]:
    return [
        clean_traffic(1000 + i, f"dum{i}", f"52:54:01:00:{i // 256:02x}:{i % 256:02x}",
                      f"10.100.{i // 250}.{i % 250 + 1}")
        for i in range(n)
    ]


def iperf_gbits(lab: NetLab, client_ns: str, server_ip: str, seconds: float,
                affinity: str | None = None) -> float:
    """Receiver-side TCP throughput of one iperf3 run, in Gbit/s."""
    argv = ["iperf3", "-c", server_ip, "-p", str(IPERF_PORT), "-t", f"{seconds:g}", "-J"]
    if affinity:
        argv += ["-A", affinity]
    proc = lab.run(client_ns, argv, timeout=seconds + 30)
    report = json.loads(proc.stdout)
    return float(report["end"]["sum_received"]["bits_per_second"]) / 1e9


def measure(lab: NetLab, label: str, client_ns: str, server_ip: str, seconds: float,
            affinity: str | None) -> float:
    gbits = iperf_gbits(lab, client_ns, server_ip, seconds, affinity)
    print(f"  {label:<28} {gbits:7.2f} Gbit/s", flush=True)
    return gbits


def summary(label: str, runs: list[float]) -> str:
    spread = statistics.stdev(runs) if len(runs) > 1 else 0.0
    return (f"{label:<34} mean {statistics.mean(runs):7.2f} Gbit/s  "
            f"(min {min(runs):.2f}, max {max(runs):.2f}, stdev {spread:.2f})")


def main() -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--extra", type=int, default=999, help="ports bound besides the guests")
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--affinity", default=None, metavar="C,S",
                        help="pin the iperf3 client to CPU C and the server to CPU S (iperf3 -A)")
    args = parser.parse_args()
    if shutil.which("iperf3") is None:
        print("iperf3 is not installed; install it with: apt-get install -y iperf3",
              file=sys.stderr)
        return 2

    with NetLab() as lab, tempfile.TemporaryDirectory(prefix="nwt-bench-") as root:
        host = lab.add_ns("host")
        lab.add_bridge(host, "br0")
        guests: list[tuple[str, str, str]] = []  # (namespace, mac, ip)
        for i in range(2):
            ns = lab.add_ns(f"g{i}")
            mac, ip = f"52:54:00:00:00:{i:02x}", f"10.77.0.1{i}"
            lab.add_veth(host, f"vnet{i}", ns, mac=mac, addrs=[f"{ip}/24"], bridge="br0")
            guests.append((ns, mac, ip))
        (client_ns, _, _), (server_ns, _, server_ip) = guests

        backend = NftBackend(netns=host)
        engine = Engine(Path(root), backend, stock_dir=STOCK)
        engine.start()
        engine.create_bindings([clean_traffic(i, f"vnet{i}", mac, ip)
                                for i, (_, mac, ip) in enumerate(guests)])
        base: list[float] = []
        loaded: list[float] = []
        server = lab.popen(server_ns, ["iperf3", "-s", "-B", server_ip, "-p", str(IPERF_PORT)])
        try:
            time.sleep(0.3)  # let the server listen
            if server.poll() is not None:
                print(f"iperf3 server exited: {server.communicate()[1].strip()}",
                      file=sys.stderr)
                return 1
            # Warm-up: ARP, conntrack and the bridge's FDB; not counted.
            iperf_gbits(lab, client_ns, server_ip, 1)

            extras = extra_bindings(args.extra)
            base_label = f"{len(backend.ports())} bound ports"
            loaded_label = f"{len(backend.ports()) + len(extras)} bound ports"
            print(f"TCP {guests[0][2]} -> {server_ip} through br0, clean-traffic on both "
                  f"guests, {args.reps} x {args.seconds:g} s per case, cases interleaved")
            # Interleaved (base, loaded, base, ...) so that drift of the machine
            # over the run does not show up as a difference between the cases.
            for rep in range(args.reps):
                base.append(measure(lab, f"{base_label}, run {rep + 1}", client_ns, server_ip,
                                    args.seconds, args.affinity))
                t0 = time.perf_counter()
                engine.create_bindings(extras)
                bind_s = time.perf_counter() - t0
                loaded.append(measure(lab, f"{loaded_label}, run {rep + 1}", client_ns,
                                      server_ip, args.seconds, args.affinity))
                t0 = time.perf_counter()
                for binding in extras:
                    engine.delete_binding(binding.portdev)
                print(f"  (bound {len(extras)} ports in one call in {bind_s:.2f} s, "
                      f"unbound them one by one in {time.perf_counter() - t0:.2f} s)",
                      flush=True)
        finally:
            server.terminate()
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                server.kill()
                server.wait()
            backend.clear_all()

    print(summary(base_label, base))
    print(summary(loaded_label, loaded))
    diff = statistics.mean(loaded) / statistics.mean(base) - 1
    verdict = "within" if abs(diff) <= TARGET else "OUTSIDE"
    print(f"relative difference: {diff * 100:+.1f}%  ({verdict} the {TARGET * 100:.0f}% target)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
