"""Socket activation: nwfilterd serves listening sockets passed by systemd."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nwfilter.client import Client
from nwfilter.errors import PermissionDeniedError, ValidationError
from nwfilter.sdlisten import check_inherited, inherited_sockets

TOP = Path(__file__).resolve().parent.parent.parent


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[Callable[[str], socket.socket]]:
    made: list[socket.socket] = []

    def make(name: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(tmp_path / name))
        sock.listen(16)
        made.append(sock)
        return sock

    yield make
    for sock in made:
        sock.close()


def _env(count: int = 1, pid: int | None = None) -> dict[str, str]:
    return {"LISTEN_PID": str(os.getpid() if pid is None else pid), "LISTEN_FDS": str(count),
            "LISTEN_FDNAMES": "nwfilterd.socket"}


def test_takes_the_passed_sockets_and_clears_the_variables(
    listening: Callable[[str], socket.socket], tmp_path: Path
) -> None:
    # The sockets first: a number found free before they exist could be
    # the one a socket then gets.
    socks = [listening(name) for name in ("a.sock", "b.sock")]
    start = _free_fds(2)
    for fd, sock in zip((start, start + 1), socks, strict=True):
        os.dup2(sock.fileno(), fd)
    env = _env(2)
    taken = inherited_sockets(env, first_fd=start)
    assert [s.path for s in taken] == [tmp_path / "a.sock", tmp_path / "b.sock"]
    assert env == {}
    for bound in taken:
        bound.close()
    assert (tmp_path / "a.sock").exists()


def _free_fds(count: int) -> int:
    """The first of `count` consecutive descriptor numbers not in use."""
    start = 200
    while any(_open(fd) for fd in range(start, start + count)):
        start += count
    return start


def _open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_variables_for_another_process_are_ignored(
    listening: Callable[[str], socket.socket],
) -> None:
    sock = listening("a.sock")
    env = _env(pid=os.getpid() + 1)
    assert inherited_sockets(env, first_fd=sock.fileno()) == []
    assert "LISTEN_FDS" in env
    assert inherited_sockets({}, first_fd=sock.fileno()) == []


def test_closing_leaves_the_path(listening: Callable[[str], socket.socket], tmp_path: Path) -> None:
    fd = os.dup(listening("a.sock").fileno())
    (bound,) = inherited_sockets(_env(), first_fd=fd)
    bound.close()
    assert (tmp_path / "a.sock").exists()  # the path is the socket unit's
    with pytest.raises(OSError):
        os.fstat(fd)


@pytest.mark.parametrize("kind", ["pipe", "datagram", "not-listening"])
def test_what_cannot_be_served_is_refused(kind: str, tmp_path: Path) -> None:
    keep: list[int] = []
    if kind == "pipe":
        fd, other = os.pipe()
        keep.append(other)
        expected = "is not a socket"
    elif kind == "datagram":
        fd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM).detach()
        expected = "is not a UNIX stream socket"
    else:
        stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        stream.bind(str(tmp_path / "s"))
        fd = stream.detach()
        expected = "is not listening"
    try:
        with pytest.raises(ValidationError, match=expected):
            inherited_sockets(_env(), first_fd=fd)
        os.fstat(fd)  # still open: a refusal closes nothing
    finally:
        for one in (fd, *keep):
            os.close(one)


def test_a_socket_bound_elsewhere_is_refused(
    listening: Callable[[str], socket.socket], tmp_path: Path
) -> None:
    (bound,) = inherited_sockets(_env(), first_fd=os.dup(listening("other.sock").fileno()))
    admin, ro = tmp_path / "admin.sock", tmp_path / "ro.sock"
    expected = r"bound to '.*other\.sock', not to '.*admin\.sock' or '.*ro\.sock'"
    with pytest.raises(ValidationError, match=expected):
        check_inherited([bound], (admin, ro))
    assert check_inherited([], (admin, None)) == {}
    bound.close()


def test_daemon_serves_the_inherited_sockets_and_leaves_their_paths(
    listening: Callable[[str], socket.socket], tmp_path: Path
) -> None:
    admin, ro = tmp_path / "admin.sock", tmp_path / "ro.sock"
    fds = [listening(p.name).fileno() for p in (admin, ro)]
    assert min(fds) > 4
    # LISTEN_PID is the shell's pid, which `exec` hands on to the daemon
    # (bash: dash moves no descriptor above 9).
    script = (f'LISTEN_PID=$$ LISTEN_FDS=2 exec "$@" 3<&{fds[0]} 4<&{fds[1]} '
              f'{fds[0]}<&- {fds[1]}<&-')
    proc = subprocess.Popen(
        ["bash", "-c", script, "bash", sys.executable, "-m", "nwfilter.daemon",
         "--root", str(tmp_path / "root"), "--backend", "memory",
         "--socket", str(admin), "--ro-socket", str(ro)],
        pass_fds=fds, env={**os.environ, "PYTHONPATH": str(TOP)},
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )
    log: list[str] = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:  # until it serves, or ends
            log.append(line)
            if "listening on" in line:
                break
        assert f"listening on {admin}" in "".join(log), "".join(log)
        with Client(admin) as client:
            assert "clean-traffic" in [row["name"] for row in client.call("filter.list")]
        with Client(ro) as client:
            assert client.call("binding.list") == []
            with pytest.raises(PermissionDeniedError):
                client.call("filter.undefine", {"name": "clean-traffic"})
        assert sorted(p.name for p in (tmp_path / "root" / "run").glob("*.sock")) == []
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=60)
    assert proc.returncode == 0
    assert admin.exists() and ro.exists()
