"""Throwaway network labs: namespaces, bridges and veth pairs for tests and tools.

`NetLab` owns every namespace it creates (all named with one unique prefix,
e.g. ``nwt-1a2b3c``) and deletes them on `close()`, on leaving the `with`
block and at interpreter exit, so a failed test never leaves namespaces
behind.  Interfaces live inside the lab's namespaces and vanish with them;
nothing is created in the caller's own namespace.

`in_netns(name)` moves the *calling thread* into a named namespace and back,
which lets in-process netlink users (libnftables, pyroute2) work inside a
lab without a subprocess.

iproute2 is used rather than pyroute2 for construction: it is what operators
read in the logs, its error messages are clear, and a lab is built once.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import logging
import os
import re
import secrets
import subprocess
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

from nwfilter.errors import NwfilterError, UnavailableError, ValidationError

log = logging.getLogger(__name__)

NETNS_DIR = Path("/run/netns")
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
# Stricter than the kernel's rule (conf.values.check_ifname), which lets
# through '%' (`ip link add x%d` makes the kernel choose the name) and other
# punctuation a lab never needs.
_IFNAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,14}$")


def _check_name(kind: str, value: str, pattern: re.Pattern[str]) -> str:
    if not pattern.fullmatch(value):
        raise ValidationError(f"invalid {kind} name '{value}'")
    return value


_CLONE_NEWNET = 0x40000000


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _setns(fd: int) -> None:
    # os.setns exists only from Python 3.12; libc's setns(2) is the same call.
    if _libc().setns(ctypes.c_int(fd), ctypes.c_int(_CLONE_NEWNET)) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"setns: {os.strerror(err)}")


@contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the body with the calling thread inside network namespace `name`.

    `None` means "stay where you are".  Only the calling thread moves (setns
    acts per thread on Linux); the previous namespace is restored on exit
    even if the body raises.
    """
    if name is None:
        yield
        return
    _check_name("namespace", name, _NAME_RE)
    target = NETNS_DIR / name
    try:
        target_fd = os.open(target, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise UnavailableError(
            f"network namespace '{name}' cannot be opened: {exc.strerror}"
            + (" (create it with 'ip netns add')" if isinstance(exc, FileNotFoundError) else "")
        ) from exc
    # /proc/thread-self, not /proc/self: the thread may already sit in a
    # different namespace than the process's main thread.
    own_fd = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        _setns(target_fd)
        try:
            yield
        finally:
            _setns(own_fd)
    finally:
        os.close(target_fd)
        os.close(own_fd)


class NetLab:
    """A set of network namespaces with a common unique prefix."""

    def __init__(self, prefix: str | None = None) -> None:
        self.prefix = prefix if prefix is not None else "nwt-" + secrets.token_hex(3)
        _check_name("lab prefix", self.prefix, _NAME_RE)
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
        full = _check_name("namespace", self.ns_name(name), _NAME_RE)
        _ip(["netns", "add", full])
        self.namespaces.append(full)
        self.run(full, ["ip", "link", "set", "lo", "up"])
        return full

    def add_bridge(self, ns: str, name: str) -> None:
        _check_name("interface", name, _IFNAME_RE)
        # STP off and forward delay 0: the port must forward at once, or the
        # first seconds of every test are lost to the listening/learning states.
        self.run(ns, ["ip", "link", "add", name, "type", "bridge", "stp_state", "0",
                      "forward_delay", "0"])
        self.run(ns, ["ip", "link", "set", name, "up"])

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
        _check_name("interface", host_if, _IFNAME_RE)
        _check_name("interface", guest_if, _IFNAME_RE)
        argv = ["ip", "link", "add", host_if, "type", "veth", "peer", "name", guest_if,
                "netns", guest_ns]
        if mac is not None:
            argv += ["address", mac]
        self.run(host_ns, argv)
        if bridge is not None:
            self.run(host_ns, ["ip", "link", "set", host_if, "master", bridge])
        self.run(host_ns, ["ip", "link", "set", host_if, "up"])
        for cidr in addrs:
            self.set_addr(guest_ns, guest_if, cidr)
        self.run(guest_ns, ["ip", "link", "set", guest_if, "up"])

    def set_addr(self, ns: str, ifname: str, cidr: str) -> None:
        # nodad: IPv6 duplicate address detection would hold the address
        # 'tentative' for a second or more and make tests flaky.
        argv = ["ip", "addr", "add", cidr, "dev", ifname]
        if ":" in cidr:
            argv.append("nodad")
        self.run(ns, argv)

    def sysctl(self, ns: str, key: str, value: str) -> None:
        self.run(ns, ["sysctl", "-q", "-w", f"{key}={value}"])

    def run(
        self,
        ns: str,
        argv: Sequence[str],
        *,
        timeout: float = 10,
        check: bool = True,
    ) -> subprocess.CompletedProcess[str]:
        """Run `argv` inside namespace `ns` (no shell); raise on failure if `check`."""
        _check_name("namespace", ns, _NAME_RE)
        full = ["ip", "netns", "exec", ns, *argv]
        proc = subprocess.run(full, capture_output=True, text=True, timeout=timeout, check=False)
        if check and proc.returncode != 0:
            raise NwfilterError(
                f"command failed in {ns} (exit {proc.returncode}): {' '.join(argv)}\n"
                f"{proc.stderr.strip()}"
            )
        return proc

    def popen(self, ns: str, argv: Sequence[str]) -> subprocess.Popen[str]:
        """Start `argv` in `ns` in the background; the caller waits/kills it."""
        _check_name("namespace", ns, _NAME_RE)
        return subprocess.Popen(
            ["ip", "netns", "exec", ns, *argv],
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
            proc = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True,
                                  check=False)
            if proc.returncode != 0 and (NETNS_DIR / ns).exists():
                log.warning("could not delete namespace %s: %s", ns, proc.stderr.strip())
        self.namespaces.clear()


def _ip(argv: Sequence[str]) -> None:
    proc = subprocess.run(["ip", *argv], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise NwfilterError(f"ip {' '.join(argv)} failed: {proc.stderr.strip()}")
