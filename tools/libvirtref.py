"""libvirt 9.0 as a reference: its daemon inside its own network and mount
namespaces, for the recording tools (`record_libvirt_dumps.py`,
`record_libvirt_verdicts.py`).  Nothing of the project's tests needs it.

`ReferenceDaemon` installs Debian's libvirt packages when they are missing,
starts `libvirtd` under `ip netns exec` (which gives it a private mount
namespace as well) with tmpfs over /run/libvirt, /var/lib/libvirt and
/var/cache/libvirt and a copy of /etc/libvirt bind-mounted over it, so the
filters it defines and the rules it makes stay in the namespace and in a
scratch directory.  Its API socket lives in that directory and `virsh`
reaches it with `?socket=`.  `stop` kills the daemon by its pid and deletes
the namespace.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

PACKAGES = (
    "libvirt-daemon", "libvirt-clients", "libvirt-daemon-config-nwfilter",
    "libvirt-daemon-driver-qemu", "iptables", "ebtables", "nftables",
)


def ensure_installed() -> None:
    """Install libvirt 9.0 and the firewall tools it drives (Debian 12)."""
    if shutil.which("libvirtd") and shutil.which("virsh") and shutil.which("ebtables"):
        return
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run(["apt-get", "install", "-y", "--no-install-recommends", *PACKAGES],
                   check=True, env=env)
    subprocess.run(["groupadd", "-f", "kvm"], check=True)
    subprocess.run(["groupadd", "-f", "libvirt-qemu"], check=True)
    if subprocess.run(["id", "libvirt-qemu"], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "-r", "-g", "libvirt-qemu", "-G", "kvm", "libvirt-qemu"],
                       check=True)


class ReferenceDaemon:
    """A private libvirtd in network namespace `netns`, which it creates and
    deletes unless `existing` (a lab namespace that its owner deletes)."""

    def __init__(self, netns: str = "nwf-lvref", *, existing: bool = False) -> None:
        self.netns = netns
        self.existing = existing
        self.work = Path(tempfile.mkdtemp(prefix="nwf-lvref-"))
        self.pid: int | None = None

    @property
    def uri(self) -> str:
        return f"qemu:///system?socket={self.work}/run/libvirt-sock"

    def start(self) -> None:
        ensure_installed()
        (self.work / "run").mkdir()
        (self.work / "log").mkdir()
        shutil.copytree("/etc/libvirt", self.work / "etc", symlinks=True)
        conf = self.work / "libvirtd.conf"
        conf.write_text(
            f'unix_sock_dir = "{self.work}/run"\n'
            'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
            f'log_outputs = "3:file:{self.work}/log/libvirtd.log"\n'
        )
        for path in ("/run/libvirt", "/var/lib/libvirt", "/var/cache/libvirt",
                     "/var/log/libvirt"):
            Path(path).mkdir(parents=True, exist_ok=True)
        if not self.existing:
            subprocess.run(["ip", "netns", "add", self.netns], check=True)
        script = (
            "mount -t tmpfs nwf-lvref /run/libvirt"
            " && mount -t tmpfs nwf-lvref /var/lib/libvirt"
            " && mount -t tmpfs nwf-lvref /var/cache/libvirt"
            f" && mount --bind {self.work}/etc /etc/libvirt"
            f" && exec libvirtd -d -f {conf} -p {self.work}/pid"
        )
        subprocess.run(["ip", "netns", "exec", self.netns, "sh", "-c", script], check=True)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if (self.work / "pid").exists() and (self.work / "run" / "libvirt-sock").exists():
                text = (self.work / "pid").read_text().strip()
                if text and self.virsh("nwfilter-list", check=False).returncode == 0:
                    self.pid = int(text)
                    return
            time.sleep(0.2)
        raise RuntimeError(f"libvirtd did not come up; see {self.work}/log/libvirtd.log")

    def virsh(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["virsh", "-q", "-c", self.uri, *args], capture_output=True,
                              text=True, check=check, timeout=60)

    def run(self, *argv: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """A command inside the daemon's network namespace."""
        return subprocess.run(["ip", "netns", "exec", self.netns, *argv], capture_output=True,
                              text=True, check=check, timeout=60)

    def define(self, document: str) -> str | None:
        """Define a filter; None on success, else libvirt's error text."""
        path = self.work / "define.xml"
        path.write_text(document)
        done = self.virsh("nwfilter-define", str(path), check=False)
        if done.returncode == 0:
            return None
        return " ".join(line.strip() for line in done.stderr.splitlines()
                        if line.strip() and "Failed to define" not in line)

    def stop(self) -> None:
        if self.pid is not None:
            try:
                os.kill(self.pid, signal.SIGTERM)
                for _ in range(100):
                    os.kill(self.pid, 0)
                    time.sleep(0.05)
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.pid = None
        if not self.existing:
            subprocess.run(["ip", "netns", "del", self.netns], check=False)
        shutil.rmtree(self.work, ignore_errors=True)

    def __enter__(self) -> ReferenceDaemon:
        self.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()
