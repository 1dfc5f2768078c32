"""A QMP monitor connection: commands with a timeout, events through the loop.

One `Monitor` per running QEMU process.  Its socket is watched by the
domain core's event loop (`nwfilter.domain.eventloop`): the loop thread
reads, hands each reply to the command waiting for it (matched by `id`)
and each asynchronous event (`STOP`, `RESUME`, `SHUTDOWN`, ...) to the
owner's `on_event`; when QEMU goes away (end of file, a reset), the owner's
`on_eof` runs once and every waiting command fails.

Commands are serialised by the monitor lock (libvirt's rule: one command
in flight per monitor).  Both the wait for that lock and the wait for the
reply are bounded by the command's timeout, so a QEMU that never answers
(stopped with SIGSTOP, wedged) makes its own domain's calls fail with
`MonitorTimeoutError`, naming the domain and the command, and delays no
one else.  A reply that arrives after its command gave up is dropped.

Lifetime: the socket is closed only once the loop has let go of the watch
(its `free` callback), so the loop never polls a closed or reused fd, and
no callback runs after `close()` returned.
"""

from __future__ import annotations

import itertools
import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from nwfilter.domain.eventloop import EVENT_ERROR, EVENT_HANGUP, EVENT_READABLE, EventLoop
from nwfilter.errors import BackendError, ErrorCode, NwfilterError, StateError

log = logging.getLogger(__name__)

COMMAND_TIMEOUT = 10.0
_MAX_LINE = 1 << 20

EventHandler = Callable[[str, Mapping[str, Any]], None]  # (event name, data)


class MonitorTimeoutError(NwfilterError):
    """A monitor command got no answer in time (QEMU hung or overloaded)."""

    code = ErrorCode.TIMEOUT


class MonitorClosedError(StateError):
    """The monitor went away (QEMU exited) before or while a command ran."""


class _Waiter:
    __slots__ = ("done", "reply")

    def __init__(self) -> None:
        self.done = threading.Event()
        self.reply: Mapping[str, Any] | None = None


class Monitor:
    """The QMP connection of one domain."""

    def __init__(self, domain: str, sock: socket.socket, loop: EventLoop, *,
                 on_event: EventHandler, on_eof: Callable[[], None],
                 timeout: float = COMMAND_TIMEOUT) -> None:
        self.domain = domain
        self.timeout = timeout
        self._sock = sock
        self._loop = loop
        self._on_event = on_event
        self._on_eof = on_eof
        self._lock = threading.Lock()  # the monitor lock: one command at a time
        self._state = threading.Lock()  # leaf: guards the fields below
        self._pending: dict[int, _Waiter] = {}
        self._ids = itertools.count(1)
        self._buffer = b""
        self._closed = False
        self._watch: int | None = None

    # -- opening ---------------------------------------------------------

    @classmethod
    def open(cls, domain: str, path: str, loop: EventLoop, *, on_event: EventHandler,
             on_eof: Callable[[], None], timeout: float = COMMAND_TIMEOUT) -> Monitor:
        """Connect to QEMU's QMP socket at `path`, read its greeting and
        negotiate capabilities; all within `timeout`."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            sock.settimeout(timeout)
            sock.connect(path)
            greeting = _read_line(sock, time.monotonic() + timeout, domain)
        except TimeoutError as exc:
            sock.close()
            raise MonitorTimeoutError(
                f"monitor of domain '{domain}': no QMP greeting within {timeout:g}s"
            ) from exc
        except OSError as exc:
            sock.close()
            raise MonitorClosedError(
                f"monitor of domain '{domain}' cannot be reached: {exc.strerror or exc}"
            ) from exc
        except NwfilterError:
            sock.close()
            raise
        if "QMP" not in greeting:
            sock.close()
            raise BackendError(f"monitor of domain '{domain}' is not a QMP monitor")
        monitor = cls(domain, sock, loop, on_event=on_event, on_eof=on_eof, timeout=timeout)
        sock.setblocking(False)
        monitor._watch = loop.add_handle(sock.fileno(), EVENT_READABLE, monitor._readable,
                                         free=lambda _opaque: sock.close())
        try:
            monitor.command("qmp_capabilities")
        except BaseException:
            monitor.close()
            raise
        return monitor

    # -- commands --------------------------------------------------------

    def command(self, name: str, arguments: Mapping[str, Any] | None = None, *,
                timeout: float | None = None) -> Any:
        """Run `name` and return its `return` value; `BackendError` if QEMU
        refuses it, `MonitorTimeoutError` without an answer in time."""
        limit = self.timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        if not self._lock.acquire(timeout=limit):
            raise self._timeout(name, limit, "another command of this monitor is still waiting")
        try:
            with self._state:
                if self._closed:
                    raise MonitorClosedError(f"monitor of domain '{self.domain}' is closed")
                ident = next(self._ids)
                waiter = _Waiter()
                self._pending[ident] = waiter
            message: dict[str, Any] = {"execute": name, "id": ident}
            if arguments:
                message["arguments"] = dict(arguments)
            try:
                self._send(json.dumps(message).encode() + b"\n", deadline)
                if not waiter.done.wait(max(0.0, deadline - time.monotonic())):
                    raise self._timeout(name, limit, "QEMU did not answer")
            finally:
                with self._state:
                    self._pending.pop(ident, None)
        finally:
            self._lock.release()
        reply = waiter.reply
        if reply is None:
            raise MonitorClosedError(
                f"monitor of domain '{self.domain}' closed while '{name}' ran (QEMU exited)"
            )
        if "error" in reply:
            error = reply["error"]
            desc = error.get("desc", error) if isinstance(error, dict) else error
            raise BackendError(f"domain '{self.domain}': QEMU refused '{name}': {desc}")
        return reply.get("return")

    def _timeout(self, name: str, limit: float, why: str) -> MonitorTimeoutError:
        return MonitorTimeoutError(
            f"monitor of domain '{self.domain}': command '{name}' timed out after "
            f"{limit:g}s ({why})"
        )

    def _send(self, data: bytes, deadline: float) -> None:
        view = memoryview(data)
        while view:
            try:
                sent = self._sock.send(view)
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise MonitorTimeoutError(
                        f"monitor of domain '{self.domain}': QEMU does not read its monitor"
                    ) from None
                time.sleep(0.01)
                continue
            except OSError as exc:
                raise MonitorClosedError(
                    f"monitor of domain '{self.domain}': {exc.strerror or exc}"
                ) from exc
            view = view[sent:]

    # -- the loop side ---------------------------------------------------

    def _readable(self, _watch: int, _fd: int, events: int, _opaque: object) -> None:
        eof = False
        if events & EVENT_READABLE:
            try:
                data = self._sock.recv(65536)
                eof = not data
            except BlockingIOError:
                data = b""
            except OSError:
                data, eof = b"", True
            self._feed(data)
        if events & (EVENT_ERROR | EVENT_HANGUP) and not events & EVENT_READABLE:
            eof = True
        if eof:
            self._gone()

    def _feed(self, data: bytes) -> None:
        self._buffer += data
        while b"\n" in self._buffer:
            line, self._buffer = self._buffer.split(b"\n", 1)
            if not line.strip():
                continue
            try:
                message = json.loads(line)
            except ValueError:
                log.warning("monitor of domain '%s': unreadable line dropped", self.domain)
                continue
            if not isinstance(message, dict):
                continue
            if "event" in message:
                try:
                    self._on_event(str(message["event"]), message.get("data") or {})
                except Exception:
                    log.exception("monitor of domain '%s': event handler failed", self.domain)
                continue
            with self._state:
                waiter = self._pending.get(message.get("id", -1))
            if waiter is not None:
                waiter.reply = message
                waiter.done.set()
        if len(self._buffer) > _MAX_LINE:
            log.warning("monitor of domain '%s': overlong line dropped", self.domain)
            self._buffer = b""

    def _gone(self) -> None:
        """QEMU closed the monitor: fail the waiting commands, tell the owner once."""
        if self._shut():
            self._on_eof()

    def _shut(self) -> bool:
        """Mark the monitor closed, wake every waiting command and stop
        watching the socket; False when it was closed already."""
        with self._state:
            was_open = not self._closed
            self._closed = True
            watch, self._watch = self._watch, None
            waiters = list(self._pending.values())
        for waiter in waiters:
            waiter.done.set()
        if watch is not None:
            self._loop.remove_handle(watch)
        return was_open

    # -- closing ---------------------------------------------------------

    @property
    def closed(self) -> bool:
        with self._state:
            return self._closed

    def close(self) -> None:
        """Stop watching the socket (it is closed once the loop let go) and
        fail any waiting command; `on_eof` is not called.  Idempotent."""
        self._shut()


def _read_line(sock: socket.socket, deadline: float, domain: str) -> Mapping[str, Any]:
    data = b""
    while b"\n" not in data:
        sock.settimeout(max(0.001, deadline - time.monotonic()))
        chunk = sock.recv(4096)
        if not chunk:
            raise MonitorClosedError(f"monitor of domain '{domain}' closed before its greeting")
        data += chunk
        if len(data) > _MAX_LINE:
            raise BackendError(f"monitor of domain '{domain}': overlong greeting")
    try:
        message = json.loads(data.split(b"\n", 1)[0])
    except ValueError as exc:
        raise BackendError(f"monitor of domain '{domain}': unreadable greeting") from exc
    if not isinstance(message, dict):
        raise BackendError(f"monitor of domain '{domain}': unreadable greeting")
    return message
