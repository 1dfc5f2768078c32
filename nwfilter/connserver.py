"""The connection layer of `nwfilterd`: UNIX sockets, lines in, lines out.

One I/O thread (the caller of `serve_forever`) accepts connections and reads
them without blocking; each complete line goes to a bounded pool of worker
threads, whose reply is written back without blocking.  What a client can
make the daemon hold is bounded by `Limits`:

- connections: at most `max_connections`, kept below RLIMIT_NOFILE.  At the
  cap a new connection makes the daemon close the connection that has been
  idle longest (no request in progress, nothing buffered); when none is
  idle, the new one gets one error line and is closed.
- a request line: at most `max_line` bytes; a longer one is answered with
  one error and its connection closed (its rest cannot be told apart from
  new requests).
- buffered partial lines over all connections: at most `max_buffered`
  bytes; the connection whose read would pass it is answered with one error
  and closed.  A complete small request needs no buffer and always goes
  through.
- one request at a time per connection: while it runs, or its reply is
  not yet taken, the connection is not read (the kernel's socket buffer
  holds what comes next), so pending output is at most one reply.  A reply
  the client does not read for `write_timeout` seconds closes the
  connection.
- workers: at most `workers` requests run at once; others wait their turn
  in arrival order, costing nothing but the line already read.

- streams: an answer may turn its connection into a stream (`Streaming`):
  after the reply the server pushes the lines its `Stream` gives, pulling
  only while the connection's pending output is below `stream_buffer`
  bytes; a client that reads nothing for `write_timeout` seconds is
  closed.  The stream's source bounds what waits behind that (the event
  bus drops a subscriber that falls behind).  A stream needs no thread:
  its source wakes the I/O thread.  What the client sends on a stream is
  read and ignored, so its leaving is seen at once.

An idle connection costs a file descriptor and a few hundred bytes, never a
thread.  `request_shutdown` (safe from a signal handler) stops accepting
and reading; requests already running finish and their replies are sent,
then every connection is closed.

A socket is bound by `bind_unix`, which never removes anything but a stale
socket (one on which a connect is refused); a second socket with other
rights is a second `add_listener` with another `Answer`.  A listener's
`admit` function sees each connection's `Peer` once, when it is accepted,
and gives the `Answer` for that connection: this is where access is
checked.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import resource
import selectors
import socket
import stat
import struct
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from queue import SimpleQueue
from typing import Protocol

from nwfilter import protocol
from nwfilter.errors import (
    ConflictError,
    NwfilterError,
    StorageError,
    UnavailableError,
    ValidationError,
)

log = logging.getLogger(__name__)

# Linux 4.13; Python does not name it.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_NGROUPS_MAX = 65536
# Descriptors kept free for the engine (state files, netlink, the nft
# monitor) when the connection cap is derived from RLIMIT_NOFILE.
FD_RESERVE = 128
_RECV_SIZE = 65536
_ACCEPT_BATCH = 64


@dataclass(frozen=True)
class Limits:
    """What clients can make the daemon hold; see the module docstring."""

    max_connections: int = 4096
    max_line: int = protocol.MAX_LINE
    max_buffered: int = 64 * 1024 * 1024
    workers: int = 8
    backlog: int = 1024
    write_timeout: float = 30.0
    shutdown_grace: float = 30.0
    stream_buffer: int = 256 * 1024

    def __post_init__(self) -> None:
        for name in ("max_connections", "max_line", "max_buffered", "workers", "backlog",
                     "stream_buffer"):
            if getattr(self, name) < 1:
                raise ValidationError(f"limit '{name}' must be at least 1")
        if self.write_timeout <= 0 or self.shutdown_grace < 0:
            raise ValidationError("timeouts must be positive")


@dataclass(frozen=True)
class Peer:
    """The process at the other end, as the kernel saw it at connect time."""

    pid: int
    uid: int
    gid: int
    groups: tuple[int, ...] | None = None  # supplementary; None: not reported

    @classmethod
    def of(cls, sock: socket.socket) -> Peer:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        except OSError:
            return cls(0, -1, -1)
        pid, uid, gid = struct.unpack("3i", raw)
        return cls(pid, uid, gid, _peer_groups(sock))

    def __str__(self) -> str:
        return f"pid {self.pid} uid {self.uid}"


class Stream(Protocol):
    """Lines a server pushes on a connection after its reply."""

    def attach(self, wake: Callable[[], None]) -> None:
        """From now on call `wake` (from any thread; it never blocks) when
        lines become ready to pull."""

    def pull(self, room: int) -> tuple[bytes, bool]:
        """Whole lines ready to send, about `room` bytes at most (one line
        may pass it), and whether the stream has ended (the connection is
        closed once they are written)."""

    def close(self) -> None:
        """The connection is gone or the server stops: produce no more."""


@dataclass(frozen=True)
class Streaming:
    """An answer that turns its connection into a stream: `reply`, then
    the lines of `stream` until one side closes."""

    reply: bytes
    stream: Stream


def _peer_groups(sock: socket.socket) -> tuple[int, ...] | None:
    for count in (64, _NGROUPS_MAX):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * count)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            return None
        return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return None


# One request line and its peer in; the reply line (or a stream) and, for a
# malformed request, why it was refused, out.  Must not raise.
Answer = Callable[[bytes, Peer], tuple["bytes | Streaming", str | None]]
# A connection's peer in, the `Answer` for its requests out.  Must not raise.
Admit = Callable[[Peer], Answer]


def raise_nofile_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard one; the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
    return soft


class BoundSocket:
    """A listening UNIX socket at `path`, removed on close only if still ours."""

    def __init__(self, sock: socket.socket, path: Path) -> None:
        self.sock = sock
        self.path = path
        st = os.stat(path, follow_symlinks=False)
        self._identity = (st.st_dev, st.st_ino)

    def close(self) -> None:
        with contextlib.suppress(OSError):
            st = os.stat(self.path, follow_symlinks=False)
            if (st.st_dev, st.st_ino) == self._identity:
                self.path.unlink()
        self.sock.close()


def _error(path: Path, what: str, exc: OSError) -> StorageError:
    return StorageError(f"cannot {what} socket '{path}': {exc.strerror or exc}")


def _bind(path: Path, mode: int) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old_umask = os.umask(0o777 & ~mode)
    try:
        sock.bind(str(path))
    except BaseException:
        sock.close()
        raise
    finally:
        os.umask(old_umask)
    return sock


def _check_stale(path: Path) -> None:
    """Return if `path` is a socket nobody listens on; raise otherwise."""
    try:
        st = os.stat(path, follow_symlinks=False)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise _error(path, "inspect", exc) from exc
    if not stat.S_ISSOCK(st.st_mode):
        kind = "a directory" if stat.S_ISDIR(st.st_mode) else (
            "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a socket")
        raise ConflictError(f"socket path '{path}' exists and is {kind}; not replacing it")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC) as probe:
        probe.settimeout(2)
        try:
            probe.connect(str(path))
        except ConnectionRefusedError:
            return
        except (BlockingIOError, TimeoutError):
            pass  # a full listen queue: someone is there
        except OSError as exc:
            raise _error(path, "probe", exc) from exc
    raise ConflictError(f"socket '{path}' is in use by a running daemon")


def bind_unix(path: Path, *, mode: int = 0o600, backlog: int = Limits.backlog) -> BoundSocket:
    """Bind and listen on `path` (its directory made 0700 if missing).

    Something already at `path` is replaced only when it is a socket on
    which a connect is refused (left by a daemon that died); a live socket,
    a file, a directory or a link is refused with `ConflictError`, and a
    path that cannot be created with `StorageError`.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    except FileExistsError as exc:
        raise StorageError(
            f"cannot create socket '{path}': '{exc.filename}' is not a directory"
        ) from exc
    except OSError as exc:
        raise StorageError(
            f"cannot create directory '{path.parent}' for socket: {exc.strerror or exc}"
        ) from exc
    try:
        sock = _bind(path, mode)
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            raise _error(path, "create", exc) from exc
        _check_stale(path)
        log.info("removing stale socket '%s'", path)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        try:
            # bind() never replaces a path: had another daemon bound it in
            # the meantime, this fails instead of taking its socket.
            sock = _bind(path, mode)
        except OSError as again:
            raise _error(path, "create", again) from again
    try:
        sock.listen(backlog)
        sock.setblocking(False)
        return BoundSocket(sock, path)
    except OSError as exc:
        sock.close()
        raise _error(path, "listen on", exc) from exc


class _Listening:
    __slots__ = ("admit", "answer", "bound")

    def __init__(self, bound: BoundSocket, answer: Answer, admit: Admit | None) -> None:
        self.bound = bound
        self.answer = answer
        self.admit = admit


class _Conn:
    __slots__ = (
        "answer",
        "bad",
        "busy",
        "closed",
        "closing",
        "events",
        "inbuf",
        "listening",
        "out",
        "out_pos",
        "peer",
        "progress",
        "sock",
        "stream",
    )

    def __init__(self, sock: socket.socket, peer: Peer, listening: _Listening,
                 answer: Answer) -> None:
        self.sock = sock
        self.peer = peer
        self.listening = listening
        self.answer = answer
        self.inbuf = bytearray()
        self.out = b""
        self.out_pos = 0
        self.busy = False  # a request of this connection is queued or running
        self.closing = False  # close once `out` is written
        self.closed = False
        self.bad = 0  # malformed requests seen
        self.events = 0
        self.progress = 0.0  # when `out` last moved
        self.stream: Stream | None = None  # set once the connection streams


class _Throttled:
    """A warning logged at most every `interval` seconds, with a count."""

    def __init__(self, interval: float = 5.0) -> None:
        self.interval = interval
        self._last = -interval
        self._count = 0

    def warn(self, message: str, *args: object) -> None:
        self._count += 1
        now = time.monotonic()
        if now - self._last >= self.interval:
            suffix = f" ({self._count} times since last report)" if self._count > 1 else ""
            log.warning(message + suffix, *args)
            self._last = now
            self._count = 0


class ConnectionServer:
    """Serves line requests on bound UNIX sockets within `Limits`."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
        self.max_connections = max(1, min(self.limits.max_connections, soft - FD_RESERVE))
        if self.max_connections < self.limits.max_connections:
            log.warning(
                "connection limit lowered to %d to stay below RLIMIT_NOFILE (%d)",
                self.max_connections,
                soft,
            )
        self._selector = selectors.DefaultSelector()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._selector.register(self._wake_r, selectors.EVENT_READ, None)
        self._listening: list[_Listening] = []
        self._paused: dict[_Listening, float] = {}
        self._conns: set[_Conn] = set()
        self._idle: dict[_Conn, None] = {}  # oldest first
        self._writing: set[_Conn] = set()
        self._buffered = 0
        self._ready: deque[tuple[_Conn, bytes]] = deque()
        self._running = 0
        self._results: SimpleQueue[tuple[_Conn, bytes | Streaming, str | None]] = SimpleQueue()
        self._stream_ready: SimpleQueue[_Conn] = SimpleQueue()
        self._pool = ThreadPoolExecutor(self.limits.workers, thread_name_prefix="nwfilterd-worker")
        self._stopping = False
        # `request_shutdown` stays lock-free: it runs in signal handlers.
        self._state = threading.Lock()
        self._loop_thread: int | None = None
        self._done = threading.Event()
        self._done.set()
        self._closed = False
        self._refused = _Throttled()
        self._evicted = _Throttled()
        self._accept_failed = _Throttled()

    # --- public -----------------------------------------------------------

    def add_listener(
        self, bound: BoundSocket, answer: Answer, *, admit: Admit | None = None
    ) -> None:
        """Serve `bound`: with `answer`, or with what `admit` gives each connection."""
        bound.sock.listen(self.limits.backlog)
        listening = _Listening(bound, answer, admit)
        self._listening.append(listening)
        self._selector.register(bound.sock, selectors.EVENT_READ, listening)

    @property
    def connection_count(self) -> int:
        return len(self._conns)

    @property
    def pending_output(self) -> dict[int, int]:
        """Bytes written by the server but not yet taken by the client, per
        connection with some pending (keyed by descriptor; a snapshot)."""
        return {
            conn.sock.fileno(): len(conn.out) - conn.out_pos
            for conn in list(self._writing) if not conn.closed
        }

    def serve_forever(self) -> None:
        with self._state:
            if self._stopping or self._closed:
                return  # shut down before it started
            self._loop_thread = threading.get_ident()
            self._done.clear()
        try:
            while not self._stopping:
                self._poll(1.0)
            self._drain()
        finally:
            self._close_connections()
            self._done.set()

    def request_shutdown(self) -> None:
        """Ask `serve_forever` to finish; returns at once (signal-safe)."""
        self._stopping = True
        self._wake()

    def shutdown(self) -> None:
        """Stop `serve_forever` and wait until it has returned (at once if
        it has not started: it will not start)."""
        with self._state:
            self._stopping = True
            loop = self._loop_thread
        self._wake()
        if loop is not None and loop != threading.get_ident():
            self._done.wait()

    def server_close(self) -> None:
        """Stop serving if need be, then close the listening sockets
        (removing their paths) and the pool."""
        if self._closed:
            return
        self.shutdown()
        self._closed = True
        self._close_connections()
        for listening in self._listening:
            with contextlib.suppress(KeyError, ValueError):
                self._selector.unregister(listening.bound.sock)
            listening.bound.close()
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._selector.close()
        self._wake_r.close()
        self._wake_w.close()

    # --- the loop -----------------------------------------------------------

    def _poll(self, timeout: float) -> None:
        for key, mask in self._selector.select(timeout):
            data = key.data
            if data is None:
                with contextlib.suppress(OSError):
                    while self._wake_r.recv(4096):
                        pass
            elif isinstance(data, _Listening):
                self._accept(data)
            else:
                if mask & selectors.EVENT_READ and not data.closed:
                    self._read(data)
                if mask & selectors.EVENT_WRITE and not data.closed:
                    self._write(data)
        self._complete()
        while not self._stream_ready.empty():
            self._pump(self._stream_ready.get())
        self._start_ready()
        self._housekeeping()

    def _wake(self) -> None:
        with contextlib.suppress(OSError):
            self._wake_w.send(b"\0")

    def _housekeeping(self) -> None:
        now = time.monotonic()
        for listening, until in list(self._paused.items()):
            if now >= until and not self._stopping:
                del self._paused[listening]
                self._selector.register(listening.bound.sock, selectors.EVENT_READ, listening)
        for conn in [c for c in self._writing if now - c.progress > self.limits.write_timeout]:
            log.warning("closing connection of %s: its %s not read for %.0f s", conn.peer,
                        "events were" if conn.stream is not None else "reply was",
                        self.limits.write_timeout)
            self._close(conn)

    def _accept(self, listening: _Listening) -> None:
        for _ in range(_ACCEPT_BATCH):
            try:
                sock, _ = listening.bound.sock.accept()
            except BlockingIOError:
                return
            except OSError as exc:
                # Out of descriptors or memory: stop accepting for a moment
                # rather than spin on a listener that stays readable.
                self._accept_failed.warn("cannot accept a connection: %s", exc.strerror or exc)
                self._selector.unregister(listening.bound.sock)
                self._paused[listening] = time.monotonic() + 0.1
                return
            sock.setblocking(False)
            peer = Peer.of(sock)
            if len(self._conns) >= self.max_connections and not self._evict_idle():
                self._refused.warn(
                    "refusing connection of %s: %d connections are busy",
                    peer, len(self._conns),
                )
                error = UnavailableError(
                    f"nwfilterd is at its limit of {self.max_connections} connections; "
                    "retry later"
                )
                with contextlib.suppress(OSError):
                    sock.send(protocol.encode(protocol.error_reply(None, error)))
                sock.close()
                continue
            answer = listening.answer
            if listening.admit is not None:
                try:
                    answer = listening.admit(peer)
                except Exception:
                    log.exception("cannot check the connection of %s", peer)
                    sock.close()
                    continue
            conn = _Conn(sock, peer, listening, answer)
            self._conns.add(conn)
            self._idle[conn] = None
            self._set_events(conn, selectors.EVENT_READ)

    def _evict_idle(self) -> bool:
        if not self._idle:
            return False
        oldest = next(iter(self._idle))
        self._evicted.warn(
            "at %d connections: closing the longest idle one (%s)",
            len(self._conns), oldest.peer,
        )
        self._close(oldest)
        return True

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(_RECV_SIZE)
        except BlockingIOError:
            return
        except OSError as exc:
            log.debug("connection of %s failed: %s", conn.peer, exc)
            self._close(conn)
            return
        if not data:
            self._close(conn)
            return
        if conn.stream is not None:
            return  # a stream takes no requests; what comes is dropped
        self._idle.pop(conn, None)
        self._buffered -= len(conn.inbuf)
        conn.inbuf += data
        self._buffered += len(conn.inbuf)
        self._next_line(conn)

    def _next_line(self, conn: _Conn) -> None:
        """Queue the next buffered line of `conn`, or go on reading."""
        end = conn.inbuf.find(b"\n")
        limit = self.limits.max_line
        if end >= 0 and end < limit:
            line = bytes(conn.inbuf[: end + 1])
            del conn.inbuf[: end + 1]
            self._buffered -= end + 1
            conn.busy = True
            self._idle.pop(conn, None)
            self._set_events(conn, 0)
            self._ready.append((conn, line))
            return
        if end >= 0 or len(conn.inbuf) >= limit:
            self._refuse(conn, protocol.MessageTooLargeError(f"message larger than {limit} bytes"))
        elif self._buffered > self.limits.max_buffered:
            self._refuse(conn, UnavailableError(
                f"nwfilterd's request buffers are full ({self.limits.max_buffered} bytes "
                "of partial requests); retry later"
            ))
        else:
            if not conn.inbuf:
                self._idle.pop(conn, None)
                self._idle[conn] = None
            self._set_events(conn, selectors.EVENT_READ)

    def _refuse(self, conn: _Conn, exc: NwfilterError) -> None:
        log.warning("closing connection of %s: %s", conn.peer, exc.message)
        self._drop_input(conn)
        conn.closing = True
        self._send(conn, protocol.encode(protocol.error_reply(None, exc)))

    def _drop_input(self, conn: _Conn) -> None:
        self._buffered -= len(conn.inbuf)
        conn.inbuf = bytearray()

    def _start_ready(self) -> None:
        while self._ready and self._running < self.limits.workers and not self._stopping:
            conn, line = self._ready.popleft()
            if conn.closed:
                continue
            self._running += 1
            self._pool.submit(self._work, conn, line)

    def _work(self, conn: _Conn, line: bytes) -> None:
        try:
            reply, refusal = conn.answer(line, conn.peer)
        except BaseException as exc:
            log.exception("request of %s failed", conn.peer)
            failure = NwfilterError(f"internal error: {exc}")
            reply, refusal = protocol.encode(protocol.error_reply(None, failure)), None
        self._results.put((conn, reply, refusal))
        self._wake()

    def _complete(self) -> None:
        while not self._results.empty():
            conn, reply, refusal = self._results.get()
            self._running -= 1
            if refusal is not None:
                conn.bad += 1
                if conn.bad == 1:
                    log.warning("malformed request from %s: %s", conn.peer, refusal[:200])
                else:
                    log.debug("malformed request from %s: %s", conn.peer, refusal[:200])
            if conn.closed:
                log.debug("%s left before its reply", conn.peer)
                if isinstance(reply, Streaming):
                    reply.stream.close()
                continue
            conn.busy = False
            if isinstance(reply, Streaming):
                self._start_stream(conn, reply)
            else:
                self._send(conn, reply)

    # --- streams ------------------------------------------------------------

    def _start_stream(self, conn: _Conn, streaming: Streaming) -> None:
        if self._stopping:
            streaming.stream.close()
            conn.closing = True
            self._send(conn, streaming.reply)
            return
        conn.stream = streaming.stream
        self._idle.pop(conn, None)
        self._drop_input(conn)  # requests sent after the subscription are not served
        conn.out, conn.out_pos, conn.progress = streaming.reply, 0, time.monotonic()
        self._writing.add(conn)

        def wake() -> None:
            self._stream_ready.put(conn)
            self._wake()

        streaming.stream.attach(wake)
        self._pump(conn)

    def _pump(self, conn: _Conn) -> None:
        """Write what a stream connection has pending and pull more while
        it is below `stream_buffer`; close it once an ended stream is out."""
        stream = conn.stream
        while stream is not None and not conn.closed:
            pending = len(conn.out) - conn.out_pos
            room = self.limits.stream_buffer - pending
            if not conn.closing and room > 0:
                data, ended = stream.pull(room)
                conn.closing = ended
                if data:
                    if pending:
                        conn.out = conn.out[conn.out_pos:] + data
                    else:
                        conn.out, conn.progress = data, time.monotonic()
                    conn.out_pos = 0
                    pending = len(conn.out)
                elif not pending:
                    if ended:
                        self._close(conn)
                    else:
                        self._writing.discard(conn)
                        self._set_events(conn, selectors.EVENT_READ)
                    return
            elif not pending:
                self._close(conn)  # closing, and all is written
                return
            self._writing.add(conn)
            if not self._send_some(conn):
                if not conn.closed:
                    self._set_events(conn, selectors.EVENT_READ | selectors.EVENT_WRITE)
                return

    def _send(self, conn: _Conn, data: bytes) -> None:
        conn.out, conn.out_pos, conn.progress = data, 0, time.monotonic()
        self._writing.add(conn)
        self._write(conn)

    def _send_some(self, conn: _Conn) -> bool:
        """Send what the socket takes of `conn.out`; True when all of it
        went (False also when the connection failed and was closed)."""
        try:
            sent = conn.sock.send(memoryview(conn.out)[conn.out_pos:])
        except BlockingIOError:
            sent = 0
        except OSError as exc:
            log.debug("%s left before its reply: %s", conn.peer, exc)
            self._close(conn)
            return False
        if sent:
            conn.out_pos += sent
            conn.progress = time.monotonic()
        if conn.out_pos < len(conn.out):
            return False
        conn.out, conn.out_pos = b"", 0
        return True

    def _write(self, conn: _Conn) -> None:
        if conn.stream is not None:
            self._pump(conn)
            return
        if not self._send_some(conn):
            if not conn.closed:
                self._set_events(conn, selectors.EVENT_WRITE)
            return
        self._writing.discard(conn)
        if conn.closing:
            self._close(conn)
        elif self._stopping:
            self._set_events(conn, 0)
        else:
            self._next_line(conn)

    def _set_events(self, conn: _Conn, events: int) -> None:
        if events == conn.events:
            return
        if events == 0:
            self._selector.unregister(conn.sock)
        elif conn.events == 0:
            self._selector.register(conn.sock, events, conn)
        else:
            self._selector.modify(conn.sock, events, conn)
        conn.events = events

    def _close(self, conn: _Conn) -> None:
        if conn.closed:
            return
        conn.closed = True
        if conn.stream is not None:
            conn.stream.close()
            conn.stream = None
        self._set_events(conn, 0)
        self._drop_input(conn)
        self._conns.discard(conn)
        self._idle.pop(conn, None)
        self._writing.discard(conn)
        conn.sock.close()

    # --- shutting down ------------------------------------------------------

    def _drain(self) -> None:
        """Stop accepting and reading; finish running requests, send their
        replies, and refuse the ones not started."""
        for listening in self._listening:
            if listening not in self._paused:
                with contextlib.suppress(KeyError, ValueError):
                    self._selector.unregister(listening.bound.sock)
        self._paused.clear()
        for conn in list(self._conns):
            if conn.stream is not None:
                # Nothing more is pulled; what is written already goes out.
                conn.stream.close()
                conn.closing = True
                if conn.out_pos < len(conn.out):
                    self._set_events(conn, selectors.EVENT_WRITE)
                else:
                    self._close(conn)
        stopping = UnavailableError("nwfilterd is shutting down")
        while self._ready:
            conn, _line = self._ready.popleft()
            if not conn.closed:
                conn.busy = False
                conn.closing = True
                self._send(conn, protocol.encode(protocol.error_reply(None, stopping)))
        for conn in list(self._conns):
            if conn.events & selectors.EVENT_READ:
                self._set_events(conn, 0)
        deadline = time.monotonic() + self.limits.shutdown_grace
        while self._running and time.monotonic() < deadline:
            self._poll(0.1)
        if self._running:
            log.warning("exiting with %d requests still running", self._running)
        flush_until = time.monotonic() + 2.0
        while self._writing and time.monotonic() < flush_until:
            self._poll(0.1)

    def _close_connections(self) -> None:
        for conn in list(self._conns):
            self._close(conn)
        self._ready.clear()
