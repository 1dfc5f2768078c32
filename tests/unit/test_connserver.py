"""The connection layer holds its limits: connections, buffered bytes,
workers, a full listen queue, clients that leave, and shutdown."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nwfilter import protocol
from nwfilter.client import Client
from nwfilter.connserver import BoundSocket, ConnectionServer, Limits, Peer, bind_unix
from nwfilter.errors import ErrorCode, UnavailableError

Answer = Callable[[bytes, Peer], tuple[bytes, "str | None"]]


def echo(line: bytes, peer: Peer) -> tuple[bytes, str | None]:
    request = json.loads(line)
    return protocol.encode({"id": request.get("id"), "result": [peer.pid, peer.uid]}), None


@pytest.fixture
def private(tmp_path: Path) -> Path:
    path = tmp_path / "private"
    path.mkdir(mode=0o700)
    return path


class Running:
    def __init__(self, private: Path, answer: Answer, limits: Limits) -> None:
        self.path = private / "s.sock"
        self.bound: BoundSocket = bind_unix(self.path, backlog=limits.backlog)
        self.server = ConnectionServer(limits)
        self.server.add_listener(self.bound, answer)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)
        assert not self.thread.is_alive()


@pytest.fixture
def start(private: Path) -> Iterator[Callable[..., Running]]:
    running: list[Running] = []

    def make(answer: Answer = echo, **limits: int) -> Running:
        run = Running(private, answer, Limits(**limits))
        running.append(run)
        return run

    yield make
    for run in running:
        run.stop()


def connect(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(10)
    sock.connect(str(path))
    return sock


def roundtrip(sock: socket.socket, request_id: int = 1) -> dict[str, object]:
    sock.sendall(protocol.encode({"id": request_id, "method": "m"}))
    line = sock.makefile("rb").readline()
    reply: dict[str, object] = json.loads(line)
    return reply


def test_thirty_simultaneous_clients_all_succeed_with_a_tiny_backlog(
    start: Callable[..., Running],
) -> None:
    # A backlog of 1 makes most connects find the queue full (EAGAIN):
    # the client waits and retries instead of failing.
    run = start(backlog=1)
    barrier = threading.Barrier(30)
    results: list[object] = []

    def one() -> None:
        barrier.wait()
        try:
            with Client(run.path) as client:
                results.append(client.call("m"))
        except Exception as exc:
            results.append(exc)

    threads = [threading.Thread(target=one) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 30
    assert results == [[os.getpid(), os.geteuid()]] * 30, results


def test_a_listen_queue_that_stays_full_is_a_clear_error(private: Path) -> None:
    path = private / "full.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(str(path))
        listener.listen(0)
        fillers = []
        try:
            while True:  # fill the queue: nobody accepts
                sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
                sock.setblocking(False)
                fillers.append(sock)
                sock.connect(str(path))
        except BlockingIOError:
            pass
        try:
            with pytest.raises(UnavailableError) as err:
                Client(path, connect_timeout=0.3)
            assert "listen queue" in err.value.message and str(path) in err.value.message
        finally:
            for sock in fillers:
                sock.close()


def test_peer_credentials_reach_the_answer(start: Callable[..., Running]) -> None:
    run = start()
    with connect(run.path) as sock:
        assert roundtrip(sock)["result"] == [os.getpid(), os.geteuid()]


def test_over_the_cap_the_longest_idle_connection_makes_room(
    start: Callable[..., Running],
) -> None:
    run = start(max_connections=4)
    idle = [connect(run.path) for _ in range(4)]
    with connect(run.path) as fresh:
        assert roundtrip(fresh)["result"]
    # the first idle connection was closed for it; the others still serve
    assert idle[0].recv(100) == b""
    for sock in idle[1:]:
        assert "result" in roundtrip(sock)
    for sock in idle:
        sock.close()


def test_over_the_cap_with_nothing_idle_a_new_connection_gets_one_error(
    start: Callable[..., Running],
) -> None:
    gate = threading.Event()
    started = threading.Semaphore(0)

    def slow(line: bytes, peer: Peer) -> tuple[bytes, str | None]:
        started.release()
        gate.wait(10)
        return echo(line, peer)

    run = start(slow, max_connections=3)
    busy = [connect(run.path) for _ in range(3)]
    for sock in busy:
        sock.sendall(b'{"id": 1, "method": "m"}\n')
    for _ in busy:
        assert started.acquire(timeout=10)
    with connect(run.path) as refused:
        reply = json.loads(refused.makefile("rb").readline())
        assert reply["id"] is None
        assert reply["error"]["code"] == ErrorCode.UNAVAILABLE.value
        assert "limit of 3 connections" in reply["error"]["message"]
        assert refused.recv(100) == b""
    gate.set()
    for sock in busy:
        assert json.loads(sock.makefile("rb").readline())["id"] == 1
        sock.close()


def test_partial_lines_past_the_buffer_budget_are_refused(
    start: Callable[..., Running],
) -> None:
    run = start(max_buffered=300_000, max_line=200_000)
    holders = [connect(run.path) for _ in range(5)]
    for sock in holders:
        with contextlib.suppress(OSError):  # refused while sending
            sock.sendall(b" " * 150_000)
    # a small request on another connection needs no buffer and goes through
    with connect(run.path) as other:
        assert "result" in roundtrip(other)
    # leading white space is allowed: a survivor's line completes as a request
    refused = served = 0
    for sock in holders:
        with contextlib.suppress(OSError):
            sock.sendall(b'{"id": 5, "method": "m"}\n')
        try:
            line = sock.makefile("rb").readline()
        except OSError:
            line = b""
        reply = json.loads(line) if line else None
        if reply is not None and reply.get("id") == 5:
            served += 1
        else:
            refused += 1
            if reply is not None:
                assert reply["error"]["code"] == ErrorCode.UNAVAILABLE.value
                assert "buffers are full" in reply["error"]["message"]
        sock.close()
    assert 1 <= served <= 2 and refused >= 3


def test_workers_are_bounded_and_requests_wait_their_turn(
    start: Callable[..., Running],
) -> None:
    gate = threading.Event()
    running = 0
    most = 0
    lock = threading.Lock()

    def slow(line: bytes, peer: Peer) -> tuple[bytes, str | None]:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
        gate.wait(10)
        with lock:
            running -= 1
        return echo(line, peer)

    run = start(slow, workers=2)
    socks = [connect(run.path) for _ in range(6)]
    for i, sock in enumerate(socks):
        sock.sendall(protocol.encode({"id": i, "method": "m"}))
    threading.Timer(0.3, gate.set).start()
    for i, sock in enumerate(socks):
        assert json.loads(sock.makefile("rb").readline())["id"] == i
        sock.close()
    assert most == 2


def test_a_client_that_leaves_before_its_reply_logs_no_traceback(
    start: Callable[..., Running], caplog: pytest.LogCaptureFixture
) -> None:
    gate = threading.Event()

    def slow(line: bytes, peer: Peer) -> tuple[bytes, str | None]:
        gate.wait(10)
        return protocol.encode({"id": 1, "result": "x" * 1_000_000}), None

    run = start(slow)
    caplog.set_level(logging.DEBUG, logger="nwfilter.connserver")
    for _ in range(3):
        sock = connect(run.path)
        sock.sendall(b'{"id": 1, "method": "m"}\n')
        sock.close()
    gate.set()
    with connect(run.path) as other:
        assert "result" in roundtrip(other)
    assert not [r for r in caplog.records if r.exc_info or r.levelno >= logging.WARNING]


def test_shutdown_finishes_running_requests_then_stops(
    start: Callable[..., Running],
) -> None:
    gate = threading.Event()
    started = threading.Event()

    def slow(line: bytes, peer: Peer) -> tuple[bytes, str | None]:
        started.set()
        gate.wait(10)
        return echo(line, peer)

    run = start(slow)
    idle = [connect(run.path) for _ in range(50)]
    with connect(run.path) as sock:
        sock.sendall(protocol.encode({"id": 42, "method": "m"}))
        assert started.wait(10)
        run.server.request_shutdown()
        threading.Timer(0.2, gate.set).start()
        assert json.loads(sock.makefile("rb").readline())["id"] == 42
    run.thread.join(10)
    assert not run.thread.is_alive()
    for sock in idle:
        assert sock.recv(100) == b""
        sock.close()
