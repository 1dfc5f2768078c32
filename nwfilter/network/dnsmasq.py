"""A network's dnsmasq: its configuration and the process that serves it.

dnsmasq runs as a daemon of its own (so a network outlives the command
that started it, as under libvirt), in the root's recorded namespace, bound
to the network's bridge alone (`interface=`, `bind-dynamic`,
`except-interface=lo`): it never listens outside that namespace nor on any
other interface.  Its configuration, pid, lease and hosts files live in the
root's network run directory, written through `SafeDir`.

A process counts as the network's dnsmasq only when the pid file names a
live process whose command line is dnsmasq with that network's
configuration file, so a recycled pid is never signalled.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from nwfilter.errors import BackendError, UnavailableError
from nwfilter.fileio import SafeDir
from nwfilter.netns import check_netns_name
from nwfilter.network.model import NetworkDef

log = logging.getLogger(__name__)

DNSMASQ = "dnsmasq"
_START_TIMEOUT = 10.0
_STOP_TIMEOUT = 5.0

Popen = Callable[[Sequence[str]], "subprocess.Popen[bytes]"]


def _popen(argv: Sequence[str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(list(argv), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, close_fds=True)


class DnsmasqFiles:
    """The file names of one network's dnsmasq in the run directory."""

    def __init__(self, directory: Path, name: str) -> None:
        self.directory = directory
        self.conf = f"{name}.conf"
        self.pid = f"{name}.pid"
        self.leases = f"{name}.leases"
        self.hosts = f"{name}.hostsfile"

    def path(self, file: str) -> Path:
        return self.directory / file


def config_text(net: NetworkDef, files: DnsmasqFiles) -> str:
    """The dnsmasq configuration of `net` (libvirt's choices, one per line)."""
    assert net.bridge is not None and net.address is not None
    net4 = net.address.network
    lines = [
        "# written by nwfilter; changes are overwritten when the network starts",
        "strict-order",
        f"pid-file={files.path(files.pid)}",
        "except-interface=lo",
        "bind-dynamic",
        f"interface={net.bridge}",
        # DNS is served on the bridge only; no upstream is read from the host.
        "no-resolv",
        "no-hosts",
        f"dhcp-leasefile={files.path(files.leases)}",
        f"dhcp-hostsfile={files.path(files.hosts)}",
    ]
    for rng in net.ranges:
        lease = f",{rng.lease}" if rng.lease is not None else ""
        lines.append(f"dhcp-range={rng.start},{rng.end},{net4.netmask}{lease}")
    if net.hosts and not net.ranges:
        lines.append(f"dhcp-range={net4.network_address},static,{net4.netmask}")
    size = sum(int(r.end) - int(r.start) + 1 for r in net.ranges) + len(net.hosts)
    lines += ["dhcp-no-override", "dhcp-authoritative", f"dhcp-lease-max={size}"]
    return "\n".join(lines) + "\n"


def hosts_text(net: NetworkDef) -> str:
    out = []
    for host in net.hosts:
        parts = [p for p in (host.mac, str(host.ip), host.name) if p]
        out.append(",".join(parts))
    return "\n".join(out) + ("\n" if out else "")


def argv_for(netns: str | None, conf: Path) -> list[str]:
    base = [DNSMASQ, f"--conf-file={conf}"]
    if netns is None:
        return base
    return ["ip", "netns", "exec", check_netns_name(netns), *base]


class Dnsmasq:
    """Starts, finds and stops the dnsmasq of one network."""

    def __init__(self, directory: SafeDir, net: NetworkDef, netns: str | None, *,
                 popen: Popen = _popen, proc: Path = Path("/proc")) -> None:
        self.directory = directory
        self.net = net
        self.netns = netns
        self.files = DnsmasqFiles(directory.path, net.name)
        self._popen = popen
        self._proc = proc

    def write_config(self) -> None:
        self.directory.write(self.files.hosts, hosts_text(self.net))
        self.directory.write(self.files.conf, config_text(self.net, self.files))

    def start(self) -> int:
        """Start dnsmasq (it daemonizes once ready); its pid.  A dnsmasq of
        this network that runs already is kept."""
        running = self.pid()
        if running is not None:
            return running
        self.write_config()
        self.directory.remove(self.files.pid)
        argv = argv_for(self.netns, self.files.path(self.files.conf))
        try:
            child = self._popen(argv)
        except FileNotFoundError as exc:
            raise UnavailableError("dnsmasq is not installed (Debian package dnsmasq-base)"
                                   ) from exc
        try:
            _out, err = child.communicate(timeout=_START_TIMEOUT)
        except subprocess.TimeoutExpired as exc:
            child.kill()
            child.wait()
            raise BackendError(f"network '{self.net.name}': dnsmasq did not start in "
                               f"{_START_TIMEOUT:.0f} s") from exc
        if child.returncode != 0:
            text = err.decode("utf-8", "replace").strip()
            raise BackendError(f"network '{self.net.name}': dnsmasq failed: {text}")
        deadline = time.monotonic() + _START_TIMEOUT
        while time.monotonic() < deadline:
            pid = self.pid()
            if pid is not None:
                log.info("network '%s': dnsmasq runs as pid %d", self.net.name, pid)
                return pid
            time.sleep(0.02)
        raise BackendError(f"network '{self.net.name}': dnsmasq wrote no pid file")

    def pid(self) -> int | None:
        """The pid of this network's dnsmasq if it runs, else None."""
        raw = self.directory.read_if_exists(self.files.pid)
        if raw is None:
            return None
        text = raw.decode("ascii", "replace").strip()
        if not text.isdigit():
            return None
        pid = int(text)
        return pid if self._is_ours(pid) else None

    def _is_ours(self, pid: int) -> bool:
        try:
            cmdline = (self._proc / str(pid) / "cmdline").read_bytes().split(b"\0")
            state = (self._proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            return False
        if state == "Z":
            return False
        conf = f"--conf-file={self.files.path(self.files.conf)}".encode()
        return bool(cmdline) and os.path.basename(cmdline[0]) == DNSMASQ.encode() and \
            conf in cmdline

    def stop(self) -> None:
        """Stop dnsmasq if it runs; idempotent."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + _STOP_TIMEOUT
            while self._is_ours(pid):
                if time.monotonic() > deadline:
                    os.kill(pid, signal.SIGKILL)
                    deadline = time.monotonic() + _STOP_TIMEOUT
                time.sleep(0.02)
            log.info("network '%s': dnsmasq (pid %d) stopped", self.net.name, pid)
        self.directory.remove(self.files.pid)

    def remove_files(self) -> None:
        for name in (self.files.conf, self.files.hosts, self.files.leases, self.files.pid):
            self.directory.remove(name)
