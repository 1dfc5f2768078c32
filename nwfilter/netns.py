"""Network namespace plumbing: entering a namespace, and iproute2 inside one.

`in_netns(name)` moves the *calling thread* into a named namespace and back,
which lets in-process netlink users (libnftables, pyroute2) and sockets work
inside a namespace without a subprocess.

`Iproute2` builds namespaces, bridges, veth pairs and addresses with the `ip`
tool, through an injectable runner so that callers can be tested without
root.  iproute2 rather than pyroute2: it is what operators read in the logs,
and its error messages are clear; and `ip netns add` mounts a namespace's
name the way every other tool finds it.  The domain drivers use it only
for their guests' namespaces: their links go through netlink in process
(`nwfilter.domain.links`), one socket per batch instead of one process
per step.  Names are checked before they reach `ip`:
no shell is involved, but a name such as ``-x`` or ``x%d`` would still mean
something else to it or to the kernel.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import signal
import subprocess
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from nwfilter.errors import BackendError, NwfilterError, UnavailableError, ValidationError

Runner = Callable[[Sequence[str]], "subprocess.CompletedProcess[str]"]

# Where `ip netns add` mounts named namespaces.
NETNS_DIR = Path("/run/netns")
# The longest namespace name accepted; callers that build names from a
# prefix (the ns hypervisor) check their results against it.
NETNS_NAME_MAX = 63
NETNS_NAME_RE = re.compile(rf"[A-Za-z0-9][A-Za-z0-9_.-]{{0,{NETNS_NAME_MAX - 1}}}")
# Stricter than the kernel's rule (conf.values.check_ifname), which lets
# through '%' (`ip link add x%d` makes the kernel choose the name) and other
# punctuation that namespaces built here never need.
IFNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,14}")

IP_TIMEOUT = 15.0


def check_netns_name(name: str) -> str:
    """`name` if it can name a network namespace here; raise otherwise."""
    if not NETNS_NAME_RE.fullmatch(name):
        raise ValidationError(
            f"invalid network namespace name '{name}' "
            f"(1-{NETNS_NAME_MAX} of A-Z a-z 0-9 _ . -, starting with a letter or digit)"
        )
    return name


def check_ifname(name: str) -> str:
    """`name` if it can name an interface here; raise otherwise."""
    if not IFNAME_RE.fullmatch(name):
        raise ValidationError(f"invalid interface name '{name}' (1-15 of A-Z a-z 0-9 _ . -)")
    return name


# --------------------------------------------------------------------------
# entering a namespace

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
    target = NETNS_DIR / check_netns_name(name)
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


# --------------------------------------------------------------------------
# iproute2


def run_tool(argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    """Run `argv` (no shell) with its output captured; give up after `IP_TIMEOUT`."""
    try:
        return subprocess.run(
            list(argv), capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
        )
    except FileNotFoundError as exc:
        raise UnavailableError(f"'{argv[0]}' is not installed (Debian package iproute2)") from exc
    except subprocess.TimeoutExpired as exc:
        raise BackendError(f"'{' '.join(argv)}' did not finish in {IP_TIMEOUT:.0f} s") from exc


def ip_argv(netns: str | None, *args: str) -> list[str]:
    """`ip <args>` run in `netns` (`None`: the caller's namespace).

    `ip netns ...` commands always run where the caller is: they name their
    namespace themselves.
    """
    if netns is None or args[:1] == ("netns",):
        return ["ip", *args]
    return ["ip", "-n", check_netns_name(netns), *args]


class Iproute2:
    """The `ip` commands that build and tear down namespaces, bridges and veths.

    Each method runs `ip` through the runner given at construction and
    raises `BackendError` (naming the command and the namespace) when it
    fails.  A namespace argument of `None` means the caller's namespace.
    """

    def __init__(self, runner: Runner | None = None) -> None:
        self._run = runner if runner is not None else run_tool

    def query(self, netns: str | None, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `ip <args>` in `netns` and return the result, failed or not."""
        return self._run(ip_argv(netns, *args))

    def ip(self, netns: str | None, *args: str) -> subprocess.CompletedProcess[str]:
        """Run `ip <args>` in `netns`; raise `BackendError` if it fails."""
        proc = self.query(netns, *args)
        if proc.returncode != 0:
            where = netns or "the host namespace"
            raise BackendError(f"ip {' '.join(args)} failed in {where}: {proc.stderr.strip()}")
        return proc

    def add_netns(self, name: str) -> None:
        """Create namespace `name` with `lo` up; nothing is left if a step fails."""
        self.ip(None, "netns", "add", check_netns_name(name))
        try:
            self.ip(name, "link", "set", "lo", "up")
        except BaseException:
            with suppress(NwfilterError):
                self.ip(None, "netns", "del", name)
            raise

    def add_bridge(self, netns: str | None, name: str, *, alias: str | None = None) -> None:
        """Create bridge `name` (with interface alias `alias`) and set it up."""
        # STP off and no forward delay: otherwise a new port spends its first
        # seconds listening and learning, and the first frames vanish.
        self.ip(netns, "link", "add", check_ifname(name), "type", "bridge",
                "stp_state", "0", "forward_delay", "0")
        if alias is not None:
            self.ip(netns, "link", "set", name, "alias", alias)
        self.set_up(netns, name)

    def add_veth(
        self,
        netns: str | None,
        name: str,
        peer_netns: str,
        peer: str,
        *,
        mac: str | None = None,
        peer_mac: str | None = None,
    ) -> None:
        """A veth pair: `name` in `netns`, `peer` moved to `peer_netns`; both down."""
        argv = ["link", "add", check_ifname(name)]
        if mac is not None:
            argv += ["address", mac]
        argv += ["type", "veth", "peer", "name", check_ifname(peer)]
        if peer_mac is not None:
            argv += ["address", peer_mac]
        argv += ["netns", check_netns_name(peer_netns)]
        self.ip(netns, *argv)

    def set_master(self, netns: str | None, ifname: str, bridge: str) -> None:
        """Attach `ifname` to `bridge` as a port."""
        self.ip(netns, "link", "set", check_ifname(ifname), "master", check_ifname(bridge))

    def set_up(self, netns: str | None, ifname: str, up: bool = True) -> None:
        """Set `ifname` administratively up (or down)."""
        self.ip(netns, "link", "set", check_ifname(ifname), "up" if up else "down")

    def add_address(self, netns: str | None, ifname: str, cidr: str) -> None:
        """Add address `cidr` (``10.0.0.1/24``, ``fd00::1/64``) to `ifname`."""
        argv = ["addr", "add", cidr, "dev", check_ifname(ifname)]
        if ":" in cidr:
            # Duplicate address detection would hold the address 'tentative'
            # (unusable) for a second or more.
            argv.append("nodad")
        self.ip(netns, *argv)

    def kill_processes(self, name: str) -> None:
        """SIGKILL every process (but this one) whose namespace is `name`."""
        proc = self.ip(None, "netns", "pids", check_netns_name(name))
        for word in proc.stdout.split():
            if word.isdigit() and int(word) != os.getpid():
                try:
                    os.kill(int(word), signal.SIGKILL)
                except ProcessLookupError:
                    pass
                except OSError as exc:
                    raise BackendError(
                        f"cannot kill process {word} of '{name}': {exc.strerror}"
                    ) from exc

    def delete_netns(self, name: str) -> None:
        """Kill the processes left in namespace `name`, then delete it.

        A namespace lives on, with its interfaces, while a process is in it;
        deleting the name alone would leave it running unseen.  The name is
        deleted even if killing failed.
        """
        check_netns_name(name)
        try:
            self.kill_processes(name)
        finally:
            self.ip(None, "netns", "del", name)
