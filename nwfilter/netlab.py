"""Throwaway network labs: namespaces, bridges and veth pairs for tests and tools.

`NetLab` owns every namespace it creates (all named with one unique prefix,
e.g. ``nwt-1a2b3c``) and deletes them, with any process left in them, on
`close()`, on leaving the `with` block and at interpreter exit, so a failed
test never leaves namespaces behind.  Interfaces live inside the lab's
namespaces and vanish with them; nothing is created in the caller's own
namespace.  The plumbing itself (iproute2, `in_netns`) is `nwfilter.netns`.
"""

from __future__ import annotations

import atexit
import logging
import secrets
import subprocess
from collections.abc import Sequence

from nwfilter.errors import NwfilterError
from nwfilter.netns import NETNS_DIR, Iproute2, check_netns_name

log = logging.getLogger(__name__)

# Bridged frames reach the ip/ip6/arp hooks (where layer-3 rules live) only
# with these set; they are per namespace, and exist once br_netfilter is loaded.
BRIDGE_NETFILTER_SYSCTLS = (
    "net.bridge.bridge-nf-call-iptables",
    "net.bridge.bridge-nf-call-ip6tables",
    "net.bridge.bridge-nf-call-arptables",
)


# A script for busybox's DHCP client (`udhcpc -s`): it puts the leased
# address (and nothing else) on the interface, or takes it off.
UDHCPC_SCRIPT = """#!/bin/sh
case "$1" in
  deconfig) ip -4 addr flush dev "$interface" ;;
  bound|renew) ip -4 addr flush dev "$interface"
               ip addr add "$ip/$subnet" dev "$interface" ;;
esac
exit 0
"""


class NetLab:
    """A set of network namespaces with a common unique prefix."""

    def __init__(self, prefix: str | None = None, *, iproute: Iproute2 | None = None) -> None:
        self.prefix = check_netns_name(
            prefix if prefix is not None else "nwt-" + secrets.token_hex(3)
        )
        self.iproute = iproute if iproute is not None else Iproute2()
        self.namespaces: list[str] = []
        self._closed = False
        atexit.register(self.close)

    # -- context manager -------------------------------------------------
    def __enter__(self) -> NetLab:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- building --------------------------------------------------------
    def ns_name(self, name: str) -> str:
        return f"{self.prefix}-{name}"

    def add_ns(self, name: str) -> str:
        """Create namespace `<prefix>-<name>` with `lo` up; return its full name."""
        full = self.ns_name(name)
        self.iproute.add_netns(full)
        self.namespaces.append(full)
        return full

    def add_bridge(self, ns: str, name: str) -> None:
        self.iproute.add_bridge(ns, name)

    def add_veth(
        self,
        host_ns: str,
        host_if: str,
        guest_ns: str,
        guest_if: str = "eth0",
        *,
        mac: str | None = None,
        addrs: Sequence[str] = (),
        bridge: str | None = None,
    ) -> None:
        """A veth pair: `host_if` in `host_ns`, `guest_if` (with `mac`, `addrs`) in `guest_ns`."""
        self.iproute.add_veth(host_ns, host_if, guest_ns, guest_if, peer_mac=mac)
        if bridge is not None:
            self.iproute.set_master(host_ns, host_if, bridge)
        self.iproute.set_up(host_ns, host_if)
        for cidr in addrs:
            self.set_addr(guest_ns, guest_if, cidr)
        self.iproute.set_up(guest_ns, guest_if)

    def set_addr(self, ns: str, ifname: str, cidr: str) -> None:
        self.iproute.add_address(ns, ifname, cidr)

    def sysctl(self, ns: str, key: str, value: str, *, check: bool = True) -> bool:
        """Set `key` to `value` in `ns`; whether that worked (raise instead if `check`)."""
        proc = self.run(ns, ["sysctl", "-q", "-w", f"{key}={value}"], check=check)
        return proc.returncode == 0

    def enable_bridge_netfilter(self, ns: str, *, check: bool = True) -> bool:
        """Hand the frames bridged in `ns` to the ip/ip6/arp hooks too.

        Whether every key could be set; without `check` a missing key (no
        br_netfilter) is not an error.
        """
        return all([self.sysctl(ns, key, "1", check=check) for key in BRIDGE_NETFILTER_SYSCTLS])

    def ping(self, ns: str, ip: str, *, count: int = 1, wait: float = 1) -> bool:
        """Whether `count` ICMP echoes from `ns` to `ip` get a reply within `wait` s each."""
        proc = self.run(
            ns, ["ping", "-n", "-q", "-c", str(count), "-W", str(wait), "-i", "0.2", ip],
            timeout=count * wait + 10, check=False,
        )
        return proc.returncode == 0

    def run(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        timeout: float = 10,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside namespace `ns` (no shell); raise on failure if `check`."""
        full = ["ip", "netns", "exec", check_netns_name(ns), *argv]
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise NwfilterError(
                f"command failed in {ns} (exit {proc.returncode}): {' '.join(argv)}\n"
                f"{proc.stderr.strip()}"
            )
        return proc

    def popen(self, ns: str, argv: Sequence[str]) -> subprocess.Popen[str]:
        """Start `argv` in `ns` in the background; the caller waits/kills it."""
        return subprocess.Popen(
            ["ip", "netns", "exec", check_netns_name(ns), *argv],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )

    # -- teardown --------------------------------------------------------
    def close(self) -> None:
        """Delete every namespace this lab made; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        atexit.unregister(self.close)
        for ns in reversed(self.namespaces):
            self.remove_ns(ns)
        self.namespaces.clear()

    def remove_ns(self, ns: str) -> None:
        """Best effort: kill what runs in `ns` and delete it; log what is left."""
        try:
            self.iproute.delete_netns(ns)
        except NwfilterError as exc:
            if (NETNS_DIR / ns).exists():
                log.warning("could not delete namespace %s: %s", ns, exc)
