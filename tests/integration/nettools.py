"""Packet tools for integration tests: raw frames and TCP probes inside namespaces.

Everything runs in the calling process with the thread moved into the
guest's namespace (`in_netns`), so no traffic ever leaves the lab.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable

from nwfilter.netlab import in_netns

ETH_P_ALL = 0x0003


def send_frames(ns: str, ifname: str, frames: list[bytes]) -> None:
    with in_netns(ns), socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as sock:
        sock.bind((ifname, 0))
        for frame in frames:
            sock.send(frame)


class FrameCatcher:
    """Collects frames arriving on an interface that satisfy a predicate."""

    def __init__(self, ns: str, ifname: str, predicate: Callable[[bytes], bool]) -> None:
        with in_netns(ns):
            self.sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.bind((ifname, 0))
        self.sock.settimeout(0.05)
        self.predicate = predicate
        self.frames: list[bytes] = []

    def collect(self, duration: float) -> list[bytes]:
        end = time.monotonic() + duration
        while time.monotonic() < end:
            try:
                data, addr = self.sock.recvfrom(65535)
            except TimeoutError:
                continue
            if addr[2] == socket.PACKET_OUTGOING:
                continue
            if self.predicate(data):
                self.frames.append(data)
        return self.frames

    def close(self) -> None:
        self.sock.close()


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
