"""Packet tools for integration tests: raw frames and TCP probes inside namespaces.

Everything runs in the calling process with the thread moved into the
guest's namespace (`in_netns`), so no traffic ever leaves the lab.  Raw
frames go through `nwfilter.frames`.
"""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable

from nwfilter.frames import FrameCapture, send_frames
from nwfilter.netns import in_netns

__all__ = ["FrameCatcher", "send_frames", "tcp_connect", "tcp_server"]


class FrameCatcher:
    """Collects frames arriving on an interface that satisfy a predicate."""

    def __init__(self, ns: str, ifname: str, predicate: Callable[[bytes], bool]) -> None:
        self._capture = FrameCapture(ns, ifname)
        self.predicate = predicate
        self.frames: list[bytes] = []

    def collect(self, duration: float) -> list[bytes]:
        self.frames += filter(self.predicate, self._capture.incoming(duration))
        return self.frames

    def close(self) -> None:
        self._capture.close()


def tcp_server(
    ns: str, ip: str, port: int, *, keep: list[socket.socket] | None = None
) -> tuple[socket.socket, threading.Thread]:
    """Listen on ip:port in `ns`; each accepted connection gets b'ok' and is
    closed, or with `keep` left open and appended to it."""
    with in_netns(ns):
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((ip, port))
    srv.listen(16)
    srv.settimeout(0.2)

    def loop() -> None:
        while True:
            try:
                conn, _ = srv.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if keep is not None:
                conn.sendall(b"ok")
                keep.append(conn)
                continue
            with conn:
                conn.sendall(b"ok")

    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    return srv, thread


def tcp_connect(ns: str, ip: str, port: int, timeout: float = 1.0) -> bool:
    """True if a connection to ip:port from `ns` succeeds and reads b'ok'."""
    with in_netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    with sock:
        sock.settimeout(timeout)
        try:
            sock.connect((ip, port))
            return sock.recv(2) == b"ok"
        except OSError:
            return False
