"""Fixtures for integration tests: throwaway network labs in namespaces.

`lab` gives a bridge lab that mirrors a VM host: a host namespace with bridge
`br0` (10.77.0.1/24) and two guest namespaces, each joined to the bridge by a
veth pair whose host end is `vnetN` (the guest end is `eth0` with MAC
52:54:00:00:00:0N and address 10.77.0.1N/24, N = 0, 1).  Everything lives in namespaces
named `nwt-<hex>-…` and is deleted when the test ends, even on failure.
"""

from __future__ import annotations

import contextlib
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from nwfilter.backends.base import Backend
from nwfilter.engine import Engine
from nwfilter.netlab import NetLab

STOCK_DIR = Path(__file__).resolve().parents[2] / "filters"

SUBNET = "10.77.0.0/24"
HOST_IP = "10.77.0.1"


@dataclass(frozen=True)
class Guest:
    ns: str
    portdev: str  # host-side veth end on the bridge
    ifname: str  # guest-side interface
    mac: str
    ip: str


@dataclass
class BridgeLab:
    lab: NetLab
    host: str  # host namespace (bridge br0 lives here)
    bridge: str
    guests: tuple[Guest, ...]

    def run(
        self, ns: str, argv: list[str], *, timeout: float = 10, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        return self.lab.run(ns, argv, timeout=timeout, check=check)

    def ping(self, src: Guest | str, dst_ip: str, *, count: int = 1, wait: float = 1) -> bool:
        ns = src.ns if isinstance(src, Guest) else src
        return self.lab.ping(ns, dst_ip, count=count, wait=wait)


def build_bridge_lab(lab: NetLab, n_guests: int = 2) -> BridgeLab:
    host = lab.add_ns("host")
    lab.add_bridge(host, "br0")
    lab.set_addr(host, "br0", f"{HOST_IP}/24")
    # The nft backend's layer-3 chains see bridged frames only through these hooks.
    lab.enable_bridge_netfilter(host)
    guests = []
    for i in range(n_guests):
        ns = lab.add_ns(f"g{i}")
        mac = f"52:54:00:00:00:{i:02x}"
        ip = f"10.77.0.1{i}"
        lab.add_veth(host, f"vnet{i}", ns, "eth0", mac=mac, addrs=[f"{ip}/24"], bridge="br0")
        guests.append(Guest(ns=ns, portdev=f"vnet{i}", ifname="eth0", mac=mac, ip=ip))
    return BridgeLab(lab=lab, host=host, bridge="br0", guests=tuple(guests))


@pytest.fixture
def lab() -> Iterator[BridgeLab]:
    with NetLab() as netlab:
        yield build_bridge_lab(netlab)


@contextlib.contextmanager
def kernel_engine(backend: Backend, root: Path) -> Iterator[Engine]:
    """An engine on `backend` with the stock filters, started; closed on
    the way out, and everything the backend applied removed."""
    eng = Engine(root, backend, stock_dir=STOCK_DIR)
    eng.start()
    try:
        yield eng
    finally:
        eng.close()
        backend.clear_all()
