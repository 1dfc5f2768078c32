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
import ssl
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
    scheme: str = "http"

    @property
    def client_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.client_port}"

    @property
    def peer_url(self) -> str:
        return f"http://127.0.0.1:{self.peer_port}"


@dataclass(frozen=True)
class TlsFiles:
    """A throwaway CA, a server certificate for 127.0.0.1 and a client
    certificate it signed (`make_tls`)."""

    ca_cert: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path


def make_tls(directory: Path) -> TlsFiles:
    """Make the certificates of `TlsFiles` in `directory` with openssl."""
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(*(directory / n for n in ("ca.pem", "server.pem", "server.key",
                                                "client.pem", "client.key")))
    ca_key = directory / "ca.key"

    def run(*argv: str) -> None:
        subprocess.run(["openssl", *argv], check=True, capture_output=True, timeout=60)

    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj",
        "/CN=nwfilter test CA", "-keyout", str(ca_key), "-out", str(files.ca_cert))
    for cert, key, cn, ext in (
        (files.server_cert, files.server_key, "127.0.0.1",
         # etcd 3.4's gateway reaches its own gRPC port with this certificate.
         "subjectAltName=IP:127.0.0.1\nextendedKeyUsage=serverAuth,clientAuth"),
        (files.client_cert, files.client_key, "nwfilter-host",
         "extendedKeyUsage=clientAuth"),
    ):
        request = directory / f"{cn}.csr"
        extfile = directory / f"{cn}.ext"
        extfile.write_text(ext + "\n")
        run("req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
            "-keyout", str(key), "-out", str(request))
        run("x509", "-req", "-in", str(request), "-CA", str(files.ca_cert), "-CAkey",
            str(ca_key), "-CAcreateserial", "-days", "2", "-extfile", str(extfile),
            "-out", str(cert))
    return files


class EtcdLab:
    """N etcd members forming one cluster on loopback (clients over TLS
    with client certificates when `tls` is given)."""

    def __init__(self, base: Path, members: int = 3, *, binary: str | None = None,
                 tls: TlsFiles | None = None) -> None:
        found = binary or shutil.which("etcd")
        if found is None:
            raise UnavailableError("etcd is not installed (Debian package 'etcd-server')")
        self.binary = found
        self.base = Path(base)
        self.tls = tls
        self.members = [
            Member(f"m{i}", free_port(), free_port(), self.base / f"m{i}",
                   scheme="https" if tls else "http")
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
                *(() if self.tls is None else (
                    "--cert-file", str(self.tls.server_cert),
                    "--key-file", str(self.tls.server_key),
                    "--trusted-ca-file", str(self.tls.ca_cert), "--client-cert-auth",
                )),
            ],
            stdin=subprocess.DEVNULL, stdout=log_file, stderr=log_file,
        )
        log_file.close()
        if wait:
            self.wait_healthy(index)

    def healthy(self, index: int) -> bool:
        context = None
        if self.tls is not None:
            context = ssl.create_default_context(cafile=str(self.tls.ca_cert))
            context.load_cert_chain(str(self.tls.client_cert), str(self.tls.client_key))
        try:
            with urllib.request.urlopen(self.members[index].client_url + "/health",
                                        timeout=2, context=context) as reply:
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
