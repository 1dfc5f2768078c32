"""Raw Ethernet frames sent and captured on an interface inside a namespace.

An `AF_PACKET` socket belongs to the network namespace it was opened in, so
the calling thread enters the namespace (`in_netns`) only to open and bind
it; the socket is then used from wherever the thread is.  Frames go out
exactly as given: the caller builds the Ethernet header.
"""

from __future__ import annotations

import select
import socket
import time
from collections.abc import Iterable, Iterator

from nwfilter.netns import in_netns

ETH_P_ALL = 0x0003


def _packet_socket(netns: str | None, ifname: str, protocol: int) -> socket.socket:
    with in_netns(netns):
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(protocol))
        try:
            sock.bind((ifname, 0))
        except OSError:
            sock.close()
            raise
    return sock


def send_frames(netns: str | None, ifname: str, frames: Iterable[bytes]) -> None:
    """Send each raw frame out of `ifname` inside namespace `netns`."""
    # Protocol 0: a socket that only sends is handed no frames to queue.
    with _packet_socket(netns, ifname, 0) as sock:
        for frame in frames:
            sock.send(frame)


class FrameCapture:
    """Every frame that reaches an interface, from the moment this is made."""

    def __init__(self, netns: str | None, ifname: str) -> None:
        self._sock = _packet_socket(netns, ifname, ETH_P_ALL)
        self._sock.setblocking(False)

    def __enter__(self) -> FrameCapture:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def incoming(self, seconds: float) -> Iterator[bytes]:
        """The frames received within `seconds`, as they arrive.

        Frames the interface sent are left out: a packet socket sees both
        directions, and a reply may carry what the caller looks for.  Stop
        iterating to stop waiting early.
        """
        deadline = time.monotonic() + seconds
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            ready, _, _ = select.select([self._sock], [], [], left)
            if not ready:
                return
            while True:
                try:
                    data, addr = self._sock.recvfrom(65535)
                except BlockingIOError:
                    break
                if addr[2] != socket.PACKET_OUTGOING:
                    yield data

    def close(self) -> None:
        self._sock.close()
