"""Socket activation: nwfilterd serves a listening socket passed by systemd."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwfilter.client import Client
from nwfilter.errors import ValidationError
from nwfilter.sdlisten import inherited_socket

TOP = Path(__file__).resolve().parent.parent.parent


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[socket.socket]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(str(tmp_path / "activated.sock"))
    sock.listen(16)
    yield sock
    sock.close()


def _env(fd: int, pid: int | None = None) -> dict[str, str]:
    return {"LISTEN_PID": str(os.getpid() if pid is None else pid), "LISTEN_FDS": "1",
            "LISTEN_FDNAMES": "nwfilterd.socket"}


def test_takes_the_passed_socket_and_clears_the_variables(
    listening: socket.socket, tmp_path: Path
) -> None:
    fd = os.dup(listening.fileno())
    env = _env(fd)
    bound = inherited_socket(env, first_fd=fd)
    assert bound is not None
    assert bound.path == tmp_path / "activated.sock"
    assert env == {}
    bound.close()
    assert (tmp_path / "activated.sock").exists()  # the path is the socket unit's


def test_variables_for_another_process_are_ignored(listening: socket.socket) -> None:
    env = _env(listening.fileno(), pid=os.getpid() + 1)
    assert inherited_socket(env, first_fd=listening.fileno()) is None
    assert "LISTEN_FDS" in env
    assert inherited_socket({}, first_fd=listening.fileno()) is None


@pytest.mark.parametrize("kind", ["pipe", "datagram", "not-listening", "two"])
def test_what_cannot_be_served_is_refused(kind: str, tmp_path: Path) -> None:
    keep: list[int] = []
    if kind == "pipe":
        fd, other = os.pipe()
        keep.append(other)
        expected = "is not a socket"
    elif kind == "datagram":
        dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        fd = dgram.detach()
        expected = "is not a UNIX stream socket"
    else:
        stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stream.bind(str(tmp_path / "s"))
        fd = stream.detach()
        expected = "is not listening" if kind == "not-listening" else "2 sockets were passed"
    env = _env(fd)
    if kind == "two":
        env["LISTEN_FDS"] = "2"
    try:
        with pytest.raises(ValidationError, match=expected):
            inherited_socket(env, first_fd=fd)
        os.fstat(fd)  # still open: a refusal closes nothing
    finally:
        for one in (fd, *keep):
            os.close(one)


def test_daemon_serves_the_inherited_socket_and_leaves_its_path(
    listening: socket.socket, tmp_path: Path
) -> None:
    path = tmp_path / "activated.sock"
    fd = listening.fileno()
    # LISTEN_PID is the shell's pid, which `exec` hands on to the daemon
    # (bash: dash moves no descriptor above 9).
    script = f'LISTEN_PID=$$ LISTEN_FDS=1 exec "$@" 3<&{fd} {fd}<&-'
    proc = subprocess.Popen(
        ["bash", "-c", script, "bash", sys.executable, "-m", "nwfilter.daemon",
         "--root", str(tmp_path / "root"), "--backend", "memory"],
        pass_fds=(fd,), env={**os.environ, "PYTHONPATH": str(TOP)},
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    log: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # until it serves, or ends
            log.append(line)
            if "listening on" in line:
                break
        assert f"listening on {path}" in "".join(log), "".join(log)
        with Client(path) as client:
            names = [row["name"] for row in client.call("filter.list")]
        assert "clean-traffic" in names
        assert not (tmp_path / "root" / "run" / "nwfilterd.sock").exists()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert path.exists()
