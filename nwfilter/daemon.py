"""`nwfilterd`: the engine behind a UNIX socket.

The server layer is thin: it decodes a request, checks the method and the
types of its parameters, calls the engine and maps `NwfilterError`s to
replies by their code.  One thread per connection; the engine does its own
locking.  The socket is created mode 0600 in the runtime directory.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import socketserver
import sys
import threading
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from nwfilter import hostrecord, protocol
from nwfilter.backends import get_backend
from nwfilter.backends.nft import NftBackend
from nwfilter.backends.nft.monitor import NftMonitor
from nwfilter.commands.context import DEFAULT_ROOT
from nwfilter.conf import format_binding, format_filter, parse_binding
from nwfilter.domain.driver import DomainManager
from nwfilter.engine import Engine
from nwfilter.errors import NwfilterError, ValidationError
from nwfilter.render_text import render_text

log = logging.getLogger(__name__)

Handler = Callable[[Engine, dict[str, Any]], Any]


def _str(params: dict[str, Any], key: str) -> str:
    value = params.get(key)
    if not isinstance(value, str):
        raise ValidationError(f"parameter '{key}' must be a string")
    return value


def _filter_define(engine: Engine, params: dict[str, Any]) -> Any:
    outcome = engine.define_filter(
        _str(params, "xml"), source="<request>", dry_run=bool(params.get("dry_run", False))
    )
    return {"summary": outcome.describe()}


def _filter_undefine(engine: Engine, params: dict[str, Any]) -> Any:
    engine.undefine_filter(_str(params, "name"))
    return None


def _filter_list(engine: Engine, params: dict[str, Any]) -> Any:
    return protocol.filter_rows(engine.pool.list_info())


def _filter_dumpxml(engine: Engine, params: dict[str, Any]) -> Any:
    return format_filter(engine.pool.lookup(_str(params, "name")))


def _binding_create(engine: Engine, params: dict[str, Any]) -> Any:
    xmls = params.get("xml")
    if not isinstance(xmls, list) or not all(isinstance(x, str) for x in xmls):
        raise ValidationError("parameter 'xml' must be a list of strings")
    engine.create_bindings([parse_binding(x, source="<request>") for x in xmls])
    return None


def _binding_delete(engine: Engine, params: dict[str, Any]) -> Any:
    engine.delete_binding(_str(params, "portdev"))
    return None


def _binding_list(engine: Engine, params: dict[str, Any]) -> Any:
    bindings = engine.list_bindings()
    unenforced = engine.enforcement() if bindings else {}
    return [
        {"portdev": b.portdev, "filter": b.filterref.filter,
         **_enforced(unenforced.get(b.portdev))}
        for b in bindings
    ]


def _enforced(reason: str | None) -> dict[str, Any]:
    return {"enforced": True} if reason is None else {"enforced": False, "reason": reason}


def _binding_dumpxml(engine: Engine, params: dict[str, Any]) -> Any:
    portdev = _str(params, "portdev")
    result = {"xml": format_binding(engine.binding(portdev)),
              **_enforced(engine.enforcement([portdev]).get(portdev))}
    if params.get("rules"):
        result["rules"] = render_text(engine.ruleset(portdev))
    return result


METHODS: dict[str, Handler] = {
    "filter.define": _filter_define,
    "filter.undefine": _filter_undefine,
    "filter.list": _filter_list,
    "filter.dumpxml": _filter_dumpxml,
    "binding.create": _binding_create,
    "binding.delete": _binding_delete,
    "binding.list": _binding_list,
    "binding.dumpxml": _binding_dumpxml,
}


def dispatch(engine: Engine, request: dict[str, Any]) -> dict[str, Any]:
    """Answer one decoded request; never raises."""
    request_id = request.get("id")
    try:
        method = request.get("method")
        handler = METHODS.get(method) if isinstance(method, str) else None
        if handler is None:
            raise ValidationError(f"unknown method {method!r}")
        params = request.get("params", {})
        if not isinstance(params, dict):
            raise ValidationError("'params' must be an object")
        return {"id": request_id, "result": handler(engine, params)}
    except NwfilterError as exc:
        return protocol.error_reply(request_id, exc)
    except Exception as exc:  # a bug must not kill the connection thread silently
        log.exception("internal error while serving %r", request.get("method"))
        return protocol.error_reply(request_id, NwfilterError(f"internal error: {exc}"))


class _Connection(socketserver.StreamRequestHandler):
    server: Server

    def handle(self) -> None:
        while True:
            try:
                request = protocol.read_message(self.rfile)
            except protocol.MessageTooLargeError as exc:
                # The rest of the line would be read as requests: answer
                # once and drop the connection.
                self._send(protocol.error_reply(None, exc))
                return
            except NwfilterError as exc:
                self._send(protocol.error_reply(None, exc))
                continue
            if request is None:
                return
            self._send(dispatch(self.server.engine, request))

    def _send(self, reply: dict[str, Any]) -> None:
        self.wfile.write(protocol.encode(reply))
        self.wfile.flush()


class Server(socketserver.ThreadingUnixStreamServer):
    daemon_threads = True

    def __init__(self, path: Path, engine: Engine) -> None:
        self.engine = engine
        self.path = path
        self.monitor: NftMonitor | None = None
        self.domains: DomainManager | None = None
        if path.exists() or path.is_symlink():
            path.unlink()
        old_umask = os.umask(0o177)
        try:
            super().__init__(str(path), _Connection)
        finally:
            os.umask(old_umask)


def serve(
    root: Path, backend: str | None, netns: str | None, socket_path: Path | None
) -> Server:
    """Start the engine and a server for it; the caller runs `serve_forever`.
    `backend`/`netns` None: the ones the root recorded (`nwfilter.hostrecord`)."""
    backend, netns = hostrecord.resolve(root, backend, netns)
    engine = Engine(root, get_backend(backend, netns), owner="nwfilterd")
    engine.start()
    # Domains that survived a restart are found again (their filters were
    # re-applied by the engine) and the ones marked autostart are started.
    manager = DomainManager.for_engine(engine, netns=netns)
    try:
        manager.start(autostart=True)
    except BaseException:
        engine.close()
        raise
    path = socket_path or root / "run" / "nwfilterd.sock"
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    server = Server(path, engine)
    server.domains = manager
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


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="nwfilterd", description="nwfilter API daemon")
    parser.add_argument("--root", default=os.environ.get("NWFILTER_ROOT", DEFAULT_ROOT))
    # Not given: the root's recorded host (nft in the host's namespace at first use).
    parser.add_argument("--backend", default=os.environ.get("NWFILTER_BACKEND") or None)
    parser.add_argument("--netns", default=os.environ.get("NWFILTER_NETNS") or None)
    parser.add_argument(
        "--socket", default=None, help="socket path (default ROOT/run/nwfilterd.sock)"
    )
    parser.add_argument("-v", "--verbose", action="count", default=0)
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO - 10 * min(args.verbose, 1),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    try:
        server = serve(
            Path(args.root), args.backend, args.netns, Path(args.socket) if args.socket else None
        )
    except NwfilterError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_status

    def stop(signum: int, frame: object) -> None:
        threading.Thread(target=server.shutdown, daemon=True).start()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("listening on %s", server.path)
    try:
        server.serve_forever()
    finally:
        close(server)
        server.path.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
