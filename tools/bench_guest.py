"""Boot time of a real guest on a filtered tap: Debian's kernel with the
tests' busybox initramfs (tests/integration/guestimage.py; tools/install.sh
fetches the kernel), booted directly by the `qemu` driver with
`clean-traffic` on its NIC, in a throwaway namespace.

For each of `--boots` boots it reports: the domain start (taps, filters,
QEMU running), the time until the guest's shell answers on its serial
console, and until its first ping to the host's address on the bridge is
answered through the filtered tap.

    PYTHONPATH=$PWD .venv/bin/python tools/bench_guest.py --boots 3 [--kvm]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from nwfilter.backends.nft import NftBackend
from nwfilter.domain.manager import DomainManager
from nwfilter.domain.qemuvm import QemuHypervisor
from nwfilter.engine import Engine
from nwfilter.netlab import NetLab
from tests.integration import guestimage
from tests.integration.guestimage import CMDLINE, KERNEL, READY, Console, build_initramfs

STOCK = Path(__file__).resolve().parents[1] / "filters"
GUEST_IP, HOST_IP = "10.1.0.10", "10.1.0.1"


def domain_xml(dtype: str, initrd: Path, console: Path) -> str:
    return (
        f"<domain type='{dtype}'><name>guest</name><memory unit='MiB'>128</memory>"
        f"<os><type>hvm</type><kernel>{KERNEL}</kernel><initrd>{initrd}</initrd>"
        f"<cmdline>{CMDLINE}</cmdline></os><devices>"
        "<interface type='bridge'><source bridge='br0'/><model type='virtio'/><rom enabled='no'/>"
        f"<filterref filter='clean-traffic'><parameter name='IP' value='{GUEST_IP}'/>"
        "</filterref></interface>"
        f"<serial type='unix'><source mode='connect' path='{console}'/></serial>"
        "</devices></domain>"
    )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--boots", type=int, default=3)
    parser.add_argument("--kvm", action="store_true", help="type 'kvm' instead of 'qemu'")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds per boot")
    args = parser.parse_args(argv)
    why = guestimage.missing()
    if why is not None:
        print(f"bench_guest: {why}", file=sys.stderr)
        return 1
    dtype = "kvm" if args.kvm else "qemu"
    spans: dict[str, list[float]] = {"start": [], "shell": [], "first ping": []}
    with NetLab() as lab, tempfile.TemporaryDirectory(prefix="bench-guest.") as tmp:
        host = lab.add_ns("host")
        lab.add_bridge(host, "br0")
        lab.set_addr(host, "br0", f"{HOST_IP}/24")
        lab.enable_bridge_netfilter(host)
        root = Path(tmp) / "root"
        began = time.perf_counter()
        initrd = build_initramfs(Path(tmp) / "initrd.gz")
        print(f"initramfs: {initrd.stat().st_size // 1024} KiB, built in "
              f"{(time.perf_counter() - began) * 1000:.0f} ms")
        engine = Engine(root, NftBackend(netns=host), stock_dir=STOCK)
        engine.start()
        hypervisor = QemuHypervisor(dtype, root / "run" / "hypervisor" / dtype, host)
        manager = DomainManager.for_engine(engine, netns=host, hypervisors={dtype: hypervisor})
        console = Console(Path(tmp) / "console.sock")
        try:
            manager.define_xml(domain_xml(dtype, initrd, console.path))
            for _ in range(args.boots):
                began = time.perf_counter()
                manager.run("start", "guest")
                spans["start"].append(time.perf_counter() - began)
                console.accept()
                console.wait_for(READY, args.timeout)
                spans["shell"].append(time.perf_counter() - began)
                console.check(f"ip addr add {GUEST_IP}/24 dev eth0")
                while console.run(f"ping -c 1 -W 1 {HOST_IP}")[0] != 0:
                    if time.perf_counter() - began > args.timeout:
                        raise SystemExit("bench_guest: the guest never reached the host")
                spans["first ping"].append(time.perf_counter() - began)
                manager.run("destroy", "guest")
        finally:
            console.close()
            manager.stop_all()
            hypervisor.close()
            engine.close()
    print(f"{dtype}, {args.boots} boots, seconds from the start call:")
    print(f"  {'until':12} {'median':>8} {'min':>8} {'max':>8}")
    for what, values in spans.items():
        print(f"  {what:12} {statistics.median(values):8.2f} {min(values):8.2f} "
              f"{max(values):8.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
