"""`nwfilterd`: the engine behind a UNIX socket.

This module wires the parts together: the connection layer
(`nwfilter.connserver`: sockets, limits, workers) serves the API's method
table (`nwfilter.api`) on one engine and its domains.  The socket is
created mode 0600.  One event bus (`nwfilter.events`) is handed to the
engine, the domains and the nft monitor; `events.subscribe` streams it.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from nwfilter import api, hostrecord, protocol
from nwfilter.backends import get_backend
from nwfilter.backends.nft import NftBackend
from nwfilter.backends.nft.monitor import NftMonitor
from nwfilter.commands.context import DEFAULT_ROOT
from nwfilter.connserver import (
    BoundSocket,
    ConnectionServer,
    Limits,
    Peer,
    Streaming,
    bind_unix,
    raise_nofile_limit,
)
from nwfilter.domain.driver import DomainManager
from nwfilter.domain.eventloop import EventLoop
from nwfilter.engine import Engine
from nwfilter.errors import NwfilterError
from nwfilter.events import EventBus, Subscription
from nwfilter.learn.listener import Listener
from nwfilter.network.manager import NetworkManager
from nwfilter.printable import configure_logging

log = logging.getLogger(__name__)

#: how often the dnsmasq of each active network is checked (and restarted)
SUPERVISE_INTERVAL = 1.0


class DaemonContext:
    """What the API's handlers work on in the daemon: its engine and domains."""

    def __init__(self, engine: Engine, manager: DomainManager, bus: EventBus,
                 networks: NetworkManager) -> None:
        self._engine = engine
        self._manager = manager
        self._bus = bus
        self._networks = networks

    def engine(self) -> Engine:
        return self._engine

    def domains(self) -> DomainManager:
        return self._manager

    def networks(self) -> NetworkManager:
        return self._networks

    def events(self) -> EventBus:
        return self._bus


class EventStream:
    """A subscription as the connection layer's `Stream`: one line
    `{"event": {...}}` per event, the last one `overflow` if it fell behind."""

    def __init__(self, subscription: Subscription) -> None:
        self._subscription = subscription
        self._held = b""  # a line that did not fit the last pull

    def attach(self, wake: Callable[[], None]) -> None:
        self._subscription.attach(wake)

    def pull(self, room: int) -> tuple[bytes, bool]:
        out = bytearray(self._held)
        self._held = b""
        while len(out) < room:
            taken, ended = self._subscription.take(1)
            if not taken:
                return bytes(out), ended
            try:
                line = protocol.encode({"event": taken[0].to_json()})
            except (TypeError, ValueError) as exc:
                log.error("event %s cannot be encoded: %s", taken[0].kind.value, exc)
                continue
            if out and len(out) + len(line) > room:
                self._held = line
                break
            out += line
        return bytes(out), False

    def close(self) -> None:
        self._subscription.close()


def answer(
    context: api.ApiContext, line: bytes, *, read_only: bool = False
) -> tuple[bytes | Streaming, str | None]:
    """The reply line to one request line, and why the request was refused
    as malformed (None when it was well-formed, even if the engine said no).
    Never raises: every line gets exactly one reply line."""
    try:
        request = protocol.decode_request(line)
    except protocol.RequestError as exc:
        return protocol.encode(protocol.error_reply(exc.request_id, exc)), exc.message
    try:
        result = api.invoke(context, request.method, request.params, read_only=read_only)
        if isinstance(result, api.Subscribed):
            ack = protocol.encode({"id": request.id, "result": result.result})
            return Streaming(ack, EventStream(result.subscription)), None
        reply = {"id": request.id, "result": result}
    except NwfilterError as exc:
        reply = protocol.error_reply(request.id, exc)
    except Exception as exc:  # a bug must answer, not leave the client waiting
        log.exception("internal error while serving %r", request.method)
        reply = protocol.error_reply(request.id, NwfilterError(f"internal error: {exc}"))
    try:
        return protocol.encode(reply), None
    except (TypeError, ValueError) as exc:
        log.error("reply to %r cannot be encoded: %s", request.method, exc)
        failure = NwfilterError(f"internal error: reply cannot be encoded: {exc}")
        return protocol.encode(protocol.error_reply(request.id, failure)), None


def _answer(
    context: DaemonContext, line: bytes, peer: Peer
) -> tuple[bytes | Streaming, str | None]:
    return answer(context, line)


class Server(ConnectionServer):
    """The connection server of one engine, with what runs beside it."""

    def __init__(
        self,
        bound: BoundSocket,
        engine: Engine,
        manager: DomainManager,
        limits: Limits | None = None,
        networks: NetworkManager | None = None,
    ) -> None:
        super().__init__(limits)
        self.engine = engine
        self.domains = manager
        self.events = engine.events
        if networks is None:
            networks = NetworkManager(engine.root, engine.backend.netns, lambda: engine.owner,
                                      events=engine.events)
        self.networks = networks
        self.context = DaemonContext(engine, manager, engine.events, networks)
        # The domain core's event loop: dnsmasq supervision (and IP learning).
        self.loop = EventLoop()
        self.learner: Listener | None = None
        self.path = bound.path
        self.monitor: NftMonitor | None = None
        self.add_listener(bound, functools.partial(_answer, self.context))


def serve(
    root: Path,
    backend: str | None,
    netns: str | None,
    socket_path: Path | None,
    limits: Limits | None = None,
    bus: EventBus | None = None,
) -> Server:
    """Start the engine and a server for it; the caller runs `serve_forever`.

    `bus` carries the events of the engine, the domains and the nft
    monitor to `events.subscribe` streams (a new one if None).

    `backend`/`netns` None: the ones the root recorded (`nwfilter.hostrecord`).
    The socket is claimed first: a path held by a running daemon (or by
    anything but a stale socket) is refused before the engine touches the
    kernel or starts a domain.
    """
    backend, netns = hostrecord.resolve(root, backend, netns)
    path = socket_path or root / "run" / "nwfilterd.sock"
    bound = bind_unix(path, backlog=(limits or Limits()).backlog)
    try:
        engine = Engine(root, get_backend(backend, netns), owner="nwfilterd",
                        events=bus or EventBus())
        engine.start()
    except BaseException:
        bound.close()
        raise
    # Networks first: autostart domains may attach to them.  Domains that
    # survived a restart are found again (their filters were re-applied by
    # the engine) and the ones marked autostart are started.
    networks = NetworkManager(root, netns, lambda: engine.owner, events=engine.events)
    manager = DomainManager.for_engine(engine, netns=netns, networks=networks.attachment)
    try:
        networks.load()
        networks.supervise()
        networks.autostart()
        manager.start(autostart=True)
        server = Server(bound, engine, manager, limits, networks)
    except BaseException:
        bound.close()
        engine.close()
        raise
    if isinstance(engine.backend, NftBackend):
        # Another program flushing or editing our tables (`nft flush
        # ruleset`, a firewall reload) is repaired from the recorded state.
        server.monitor = NftMonitor.for_backend(engine.backend, events=engine.events)
        server.monitor.start()
    server.loop.start()
    server.learner = Listener(engine, server.loop, netns)
    server.learner.start()

    def supervise(_timer: int, _opaque: object) -> None:
        networks.supervise()

    server.loop.add_timeout(SUPERVISE_INTERVAL, supervise)
    return server


def close(server: Server) -> None:
    """Stop serving and watching; the kernel keeps every binding's rules."""
    if server.monitor is not None:
        server.monitor.stop()
    server.loop.stop()
    if server.learner is not None:
        server.learner.stop()
    server.server_close()
    server.engine.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nwfilterd", description="nwfilter API daemon")
    parser.add_argument("--root", default=os.environ.get("NWFILTER_ROOT", DEFAULT_ROOT))
    # Not given: the root's recorded host (nft in the host's namespace at first use).
    parser.add_argument("--backend", default=os.environ.get("NWFILTER_BACKEND") or None)
    parser.add_argument("--netns", default=os.environ.get("NWFILTER_NETNS") or None)
    parser.add_argument(
        "--socket", default=None, help="socket path (default ROOT/run/nwfilterd.sock)"
    )
    defaults = Limits()
    parser.add_argument(
        "--max-connections", type=int, default=defaults.max_connections, metavar="N",
        help="connections held at once (default %(default)s; kept below RLIMIT_NOFILE)",
    )
    parser.add_argument(
        "--max-buffered", type=int, default=defaults.max_buffered, metavar="BYTES",
        help="bytes of partial requests held over all connections (default %(default)s)",
    )
    parser.add_argument(
        "--workers", type=int, default=defaults.workers, metavar="N",
        help="requests served at once (default %(default)s)",
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    configure_logging(
        logging.INFO - 10 * min(args.verbose, 1), "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        limits = Limits(
            max_connections=args.max_connections,
            max_buffered=args.max_buffered,
            workers=args.workers,
        )
        raise_nofile_limit()
        server = serve(
            Path(args.root),
            args.backend,
            args.netns,
            Path(args.socket) if args.socket else None,
            limits,
        )
    except NwfilterError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_status

    def stop(signum: int, frame: object) -> None:
        server.request_shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("listening on %s", server.path)
    try:
        server.serve_forever()
    finally:
        close(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
