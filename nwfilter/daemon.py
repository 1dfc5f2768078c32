"""`nwfilterd`: the engine behind a UNIX socket.

This module wires the parts together: the connection layer
(`nwfilter.connserver`: sockets, limits, workers) serves the API's method
table (`nwfilter.api`) on one engine and its domains.  The socket is
created mode 0600.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import sys
from collections.abc import Sequence
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
    bind_unix,
    raise_nofile_limit,
)
from nwfilter.domain.driver import DomainManager
from nwfilter.engine import Engine
from nwfilter.errors import NwfilterError
from nwfilter.printable import configure_logging
from nwfilter.sdlisten import inherited_socket

log = logging.getLogger(__name__)


class DaemonContext:
    """What the API's handlers work on in the daemon: its engine and domains."""

    def __init__(self, engine: Engine, manager: DomainManager) -> None:
        self._engine = engine
        self._manager = manager

    def engine(self) -> Engine:
        return self._engine

    def domains(self) -> DomainManager:
        return self._manager


def answer(
    context: api.ApiContext, line: bytes, *, read_only: bool = False
) -> tuple[bytes, str | None]:
    """The reply line to one request line, and why the request was refused
    as malformed (None when it was well-formed, even if the engine said no).
    Never raises: every line gets exactly one reply line."""
    try:
        request = protocol.decode_request(line)
    except protocol.RequestError as exc:
        return protocol.encode(protocol.error_reply(exc.request_id, exc)), exc.message
    try:
        result = api.invoke(context, request.method, request.params, read_only=read_only)
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


def _answer(context: DaemonContext, line: bytes, peer: Peer) -> tuple[bytes, str | None]:
    return answer(context, line)


class Server(ConnectionServer):
    """The connection server of one engine, with what runs beside it."""

    def __init__(
        self,
        bound: BoundSocket,
        engine: Engine,
        manager: DomainManager,
        limits: Limits | None = None,
    ) -> None:
        super().__init__(limits)
        self.engine = engine
        self.domains = manager
        self.context = DaemonContext(engine, manager)
        self.path = bound.path
        self.monitor: NftMonitor | None = None
        self.add_listener(bound, functools.partial(_answer, self.context))


def serve(
    root: Path,
    backend: str | None,
    netns: str | None,
    socket_path: Path | None,
    limits: Limits | None = None,
    *,
    bound: BoundSocket | None = None,
) -> Server:
    """Start the engine and a server for it; the caller runs `serve_forever`.

    `backend`/`netns` None: the ones the root recorded (`nwfilter.hostrecord`).
    The socket is claimed first: a path held by a running daemon (or by
    anything but a stale socket) is refused before the engine touches the
    kernel or starts a domain.  A `bound` socket (passed by systemd) is
    served instead.
    """
    backend, netns = hostrecord.resolve(root, backend, netns)
    if bound is None:
        path = socket_path or root / "run" / "nwfilterd.sock"
        bound = bind_unix(path, backlog=(limits or Limits()).backlog)
    try:
        engine = Engine(root, get_backend(backend, netns), owner="nwfilterd")
        engine.start()
    except BaseException:
        bound.close()
        raise
    # Domains that survived a restart are found again (their filters were
    # re-applied by the engine) and the ones marked autostart are started.
    manager = DomainManager.for_engine(engine, netns=netns)
    try:
        manager.start(autostart=True)
        server = Server(bound, engine, manager, limits)
    except BaseException:
        bound.close()
        engine.close()
        raise
    if isinstance(engine.backend, NftBackend):
        # Another program flushing or editing our tables (`nft flush
        # ruleset`, a firewall reload) is repaired from the recorded state.
        server.monitor = NftMonitor.for_backend(engine.backend)
        server.monitor.start()
    return server


def close(server: Server) -> None:
    """Stop serving and watching; the kernel keeps every binding's rules."""
    if server.monitor is not None:
        server.monitor.stop()
    server.server_close()
    server.engine.close()


def build_parser() -> argparse.ArgumentParser:
    """nwfilterd's options (also read by the man page and completion generators)."""
    parser = argparse.ArgumentParser(prog="nwfilterd", description="nwfilter API daemon")
    parser.add_argument(
        "--root", default=os.environ.get("NWFILTER_ROOT", DEFAULT_ROOT), metavar="DIR",
        help=f"state root directory (default: $NWFILTER_ROOT or {DEFAULT_ROOT})",
    )
    # Not given: the root's recorded host (nft in the host's namespace at first use).
    parser.add_argument(
        "--backend", default=os.environ.get("NWFILTER_BACKEND") or None, metavar="NAME",
        help="firewall backend: nft or memory (default: $NWFILTER_BACKEND, else the "
        "root's recorded one)",
    )
    parser.add_argument(
        "--netns", default=os.environ.get("NWFILTER_NETNS") or None, metavar="NAME",
        help="network namespace whose kernel rules the backend manages (default: "
        "$NWFILTER_NETNS, else the root's recorded one)",
    )
    parser.add_argument(
        "--socket", default=None, metavar="PATH",
        help="socket path (default ROOT/run/nwfilterd.sock)",
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
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
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
            bound=inherited_socket(),
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
