"""Throwaway etcd clusters on loopback, for tests and benchmarks.

`EtcdLab` starts N real `etcd` members (Debian's `etcd-server`) on free
127.0.0.1 ports with their data directories under a directory it is given,
and kills them by pid on `close()` (also at interpreter exit).  Members
can be killed and started again (with their data) to test failures.
"""

from __future__ import annotations

import atexit
import json
import logging
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from nwfilter.errors import UnavailableError

log = logging.getLogger(__name__)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Member:
    name: str
    client_port: int
    peer_port: int
    data_dir: Path
    process: subprocess.Popen[bytes] | None = None

    @property
    def client_url(self) -> str:
        return f"http://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


class EtcdLab:
    """N etcd members forming one cluster on loopback."""

    def __init__(self, base: Path, members: int = 3, *, binary: str | None = None) -> None:
        found = binary or shutil.which("etcd")
        if found is None:
            raise UnavailableError("etcd is not installed (Debian package 'etcd-server')")
        self.binary = found
        self.base = Path(base)
        self.members = [
            Member(f"m{i}", free_port(), free_port(), self.base / f"m{i}")
            for i in range(members)
        ]
        self._closed = False
        atexit.register(self.close)

    @property
    def urls(self) -> list[str]:
        return [m.client_url for m in self.members]

    def start(self, timeout: float = 30.0) -> EtcdLab:
        for index in range(len(self.members)):
            self.start_member(index, wait=False)
        for index in range(len(self.members)):
            self.wait_healthy(index, timeout)
        return self

    def start_member(self, index: int, *, wait: bool = True) -> None:
        member = self.members[index]
        initial = ",".join(f"{m.name}={m.peer_url}" for m in self.members)
        member.data_dir.mkdir(parents=True, exist_ok=True)
        log_file = (self.base / f"{member.name}.log").open("ab")
        member.process = subprocess.Popen(
            [
                self.binary, "--name", member.name, "--data-dir", str(member.data_dir),
                "--listen-client-urls", member.client_url,
                "--advertise-client-urls", member.client_url,
                "--listen-peer-urls", member.peer_url,
                "--initial-advertise-peer-urls", member.peer_url,
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", f"nwfilter-{self.members[0].peer_port}",
                "--heartbeat-interval", "100", "--election-timeout", "1000",
                "--log-level", "warn",
            ],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
        )
        log_file.close()
        if wait:
            self.wait_healthy(index)

    def healthy(self, index: int) -> bool:
        try:
            with urllib.request.urlopen(self.members[index].client_url + "/health",
                                        timeout=2) as reply:
                return bool(json.loads(reply.read()).get("health") == "true")
        except (OSError, urllib.error.URLError, ValueError):
            return False

    def wait_healthy(self, index: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        member = self.members[index]
        while time.monotonic() < deadline:
            if member.process is not None and member.process.poll() is not None:
                raise UnavailableError(
                    f"etcd member {member.name} exited with {member.process.returncode}; "
                    f"see {self.base / (member.name + '.log')}"
                )
            if self.healthy(index):
                return
            time.sleep(0.1)
        raise UnavailableError(f"etcd member {member.name} not healthy after {timeout} s")

    def kill(self, index: int) -> None:
        """SIGKILL one member (its data stays for `start_member`)."""
        process = self.members[index].process
        if process is not None and process.poll() is None:
            process.kill()
            process.wait(10)
        self.members[index].process = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for index in range(len(self.members)):
            self.kill(index)
        for member in self.members:
            shutil.rmtree(member.data_dir, ignore_errors=True)

    def __enter__(self) -> EtcdLab:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.close()
