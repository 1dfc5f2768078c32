"""A listening socket handed over by systemd (socket activation).

The protocol of sd_listen_fds(3): the service manager passes listening
sockets from file descriptor 3 on and sets LISTEN_FDS (how many) and
LISTEN_PID (the process meant to take them).  nwfilterd takes one UNIX
stream socket this way instead of binding its own, and leaves its path in
place on exit: the path belongs to the socket unit, which starts the daemon
again at the next connection.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import MutableMapping
from pathlib import Path

from nwfilter.connserver import BoundSocket
from nwfilter.errors import ValidationError

SD_LISTEN_FDS_START = 3
_VARIABLES = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


class InheritedSocket(BoundSocket):
    """A socket systemd listens on for us: closing it never removes its path."""

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self.sock = sock
        self.path = path

    def close(self) -> None:
        self.sock.close()


def inherited_socket(
    environ: MutableMapping[str, str] | None = None,
    *,
    first_fd: int = SD_LISTEN_FDS_START,
) -> InheritedSocket | None:
    """The listening socket passed to this process, or None when none was.

    The variables are removed (a child must not take the socket too).
    `ValidationError` when what was passed cannot be served: more than one
    socket, or not a listening UNIX stream socket bound to a path."""
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if pid is None or count is None or pid != str(os.getpid()):
        return None
    for name in _VARIABLES:
        env.pop(name, None)
    try:
        fds = int(count)
    except ValueError:
        raise ValidationError(f"LISTEN_FDS is not a number: {count!r}") from None
    if fds < 1:
        return None
    if fds > 1:
        raise ValidationError(f"{fds} sockets were passed (LISTEN_FDS); nwfilterd serves one")
    try:
        sock = socket.socket(fileno=first_fd)
    except OSError as exc:
        raise ValidationError(
            f"file descriptor {first_fd} passed by LISTEN_FDS is not a socket: {exc.strerror}"
        ) from exc
    try:
        return _checked(sock, first_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            sock.detach()  # the descriptor stays the service manager's business
        raise


def _checked(sock: socket.socket, fd: int) -> InheritedSocket:
    what = f"the socket passed at file descriptor {fd}"
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ValidationError(f"{what} is not a UNIX stream socket")
    if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
        raise ValidationError(f"{what} is not listening")
    name = sock.getsockname()
    if not isinstance(name, str) or not name:
        raise ValidationError(f"{what} is not bound to a path")
    os.set_inheritable(sock.fileno(), False)
    sock.setblocking(False)
    return InheritedSocket(sock, Path(name))
