"""A client for `nwfilterd`'s socket: one call, one reply."""

from __future__ import annotations

import itertools
import socket
from pathlib import Path
from typing import Any

from nwfilter import protocol
from nwfilter.errors import UnavailableError


class Client:
    def __init__(self, path: Path, *, timeout: float = 60.0) -> None:
        self.path = path
        self._ids = itertools.count(1)
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._sock.settimeout(timeout)
        try:
            self._sock.connect(str(path))
        except OSError as exc:
            self._sock.close()
            raise UnavailableError(f"cannot connect to nwfilterd at '{path}': {exc}") from exc
        self._reader = self._sock.makefile("rb")

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

    def close(self) -> None:
        self._reader.close()
        self._sock.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
