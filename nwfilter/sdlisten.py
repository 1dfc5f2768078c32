"""Listening sockets handed over by systemd (socket activation).

The protocol of sd_listen_fds(3): the service manager passes listening
sockets from file descriptor 3 on and sets LISTEN_FDS (how many) and
LISTEN_PID (the process meant to take them).  nwfilterd takes its admin
and read-only sockets this way (each recognised by the path it is bound
to) instead of binding them, and leaves their paths in place on exit: they
belong to the socket units, which start the daemon again at the next
connection.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Mapping, MutableMapping, Sequence
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


def inherited_sockets(
    environ: MutableMapping[str, str] | None = None,
    *,
    first_fd: int = SD_LISTEN_FDS_START,
) -> list[InheritedSocket]:
    """The listening sockets passed to this process (none when none were).

    The variables are removed (a child must not take the sockets too).
    `ValidationError` when one of them cannot be served: not a listening
    UNIX stream socket bound to a path."""
    env = os.environ if environ is None else environ
    pid, count = env.get("LISTEN_PID"), env.get("LISTEN_FDS")
    if pid is None or count is None or pid != str(os.getpid()):
        return []
    for name in _VARIABLES:
        env.pop(name, None)
    try:
        fds = int(count)
    except ValueError:
        raise ValidationError(f"LISTEN_FDS is not a number: {count!r}") from None
    taken: list[InheritedSocket] = []
    try:
        for fd in range(first_fd, first_fd + max(fds, 0)):
            taken.append(_take(fd))
    except BaseException:
        for each in taken:
            each.sock.detach()  # the descriptors stay the service manager's business
        raise
    return taken


def check_inherited(
    inherited: Sequence[BoundSocket], wanted: Sequence[Path | None]
) -> Mapping[Path, BoundSocket]:
    """The inherited sockets by the path of `wanted` each is bound to;
    `ValidationError` for one bound to none of them."""
    found: dict[Path, BoundSocket] = {}
    for bound in inherited:
        match = [w for w in wanted if w is not None and _same(w, bound.path)]
        if not match:
            paths = " or ".join(f"'{w}'" for w in wanted if w is not None)
            raise ValidationError(
                f"the socket passed by the service manager is bound to '{bound.path}', "
                f"not to {paths}"
            )
        found[match[0]] = bound
    return found


def _same(a: Path, b: Path) -> bool:
    return os.path.abspath(a) == os.path.abspath(b)


def _take(fd: int) -> InheritedSocket:
    try:
        sock = socket.socket(fileno=fd)
    except OSError as exc:
        raise ValidationError(
            f"file descriptor {fd} passed by LISTEN_FDS is not a socket: {exc.strerror}"
        ) from exc
    try:
        return _checked(sock, fd)
    except BaseException:
        with contextlib.suppress(OSError):
            sock.detach()
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
