"""A client for `nwfilterd`'s socket: one call, one reply; or, after
`subscribe`, the stream of events that follows."""

from __future__ import annotations

import errno
import itertools
import socket
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nwfilter import protocol
from nwfilter.errors import PermissionDeniedError, UnavailableError, ValidationError

if TYPE_CHECKING:
    from nwfilter.events import Event

# Waits between connect attempts while the daemon's listen queue is full.
_RETRY_FIRST = 0.005
_RETRY_MAX = 0.2


class Client:
    """One connection to the daemon.

    A connect that finds the daemon's listen queue full (EAGAIN: many
    clients at once) is retried with growing waits for up to
    `connect_timeout` seconds; a daemon that is not there (no socket, or
    nobody listening on it) is reported at once, and a socket this user
    may not connect to as `PermissionDeniedError`.
    """

    def __init__(
        self, path: Path, *, timeout: float = 60.0, connect_timeout: float = 10.0
    ) -> None:
        self.path = path
        self._ids = itertools.count(1)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._connect(connect_timeout)
        except OSError as exc:
            self._sock.close()
            if exc.errno in (errno.EACCES, errno.EPERM):
                raise PermissionDeniedError(
                    f"cannot connect to nwfilterd at '{path}': permission denied"
                ) from exc
            raise UnavailableError(f"cannot connect to nwfilterd at '{path}': {exc}") from exc
        except UnavailableError:
            self._sock.close()
            raise
        self._reader = self._sock.makefile("rb")

    def _connect(self, connect_timeout: float) -> None:
        deadline = time.monotonic() + connect_timeout
        wait = _RETRY_FIRST
        while True:
            try:
                self._sock.connect(str(self.path))
                return
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise UnavailableError(
                        f"cannot connect to nwfilterd at '{self.path}': its listen queue "
                        f"stayed full for {connect_timeout:g} s"
                    ) from None
                time.sleep(min(wait, left))
                wait = min(wait * 2, _RETRY_MAX)

    def call(self, method: str, params: dict[str, object] | None = None) -> Any:
        request_id = next(self._ids)
        request = {"id": request_id, "method": method, "params": params or {}}
        self._sock.sendall(protocol.encode(request))
        try:
            reply = protocol.read_message(self._reader)
        except protocol.MessageTooLargeError:
            # the rest of the oversized reply would be taken for the next one
            self.close()
            raise
        if reply is None:
            raise UnavailableError("nwfilterd closed the connection")
        return protocol.raise_for_reply(reply)

    def subscribe(self, kinds: list[str] | None = None) -> Any:
        """Turn this connection into an event stream (`events.subscribe`);
        read it with `next_event`.  No call can be made on it afterwards."""
        return self.call("events.subscribe", {"kinds": kinds} if kinds else {})

    def next_event(self, timeout: float | None = None) -> Event | None:
        """The next event of a subscribed connection, waiting up to
        `timeout` s (None: for ever); None when the time ran out (the
        connection is then unusable: a line may have been cut).
        `UnavailableError` when the daemon closed the stream."""
        from nwfilter.events import Event  # only event streams need it

        self._sock.settimeout(timeout)
        try:
            message = protocol.read_message(self._reader)
        except TimeoutError:
            return None
        if message is None:
            raise UnavailableError("nwfilterd closed the event stream")
        if set(message) != {"event"}:
            raise ValidationError("malformed event line from nwfilterd")
        return Event.from_json(message["event"])

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
