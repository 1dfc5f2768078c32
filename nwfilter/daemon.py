"""`nwfilterd`: the engine behind a UNIX socket.

This module wires the parts together: the connection layer
(`nwfilter.connserver`: sockets, limits, workers) serves the API's method
table (`nwfilter.api`) on one engine and its domains, on two sockets: the
admin socket (every method; root and the admin group, `nwfilter.access`)
and the read-only socket (methods that change nothing; every local user).
The configuration comes from the command line and `nwfilter.daemonconf`.
One event bus (`nwfilter.events`) is handed to the engine, the domains and
the nft monitor; `events.subscribe` streams it.
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from nwfilter import api, daemonconf, hostrecord, protocol
from nwfilter.access import AdminAccess, Group
from nwfilter.audit.periodic import PeriodicAudit
from nwfilter.audit.run import Auditor
from nwfilter.backends import get_backend
from nwfilter.backends.nft import NftBackend
from nwfilter.backends.nft.monitor import NftMonitor
from nwfilter.cluster.config import (
    DEFAULT_PREFIX,
    DEFAULT_TTL,
    ClusterConfig,
    parse_endpoints,
)
from nwfilter.commands.context import DEFAULT_ROOT, default_ro_socket, default_socket
from nwfilter.connserver import (
    Answer,
    BoundSocket,
    ConnectionServer,
    Limits,
    Peer,
    Streaming,
    bind_unix,
    raise_nofile_limit,
)
from nwfilter.domain.eventloop import EventLoop
from nwfilter.domain.manager import DomainManager
from nwfilter.engine import Engine
from nwfilter.errors import NwfilterError, PermissionDeniedError, StorageError
from nwfilter.events import EventBus, Subscription
from nwfilter.fileio import SafeDir
from nwfilter.learn.listener import Listener
from nwfilter.network.manager import NetworkManager
from nwfilter.printable import configure_logging
from nwfilter.sdlisten import check_inherited, inherited_sockets

if TYPE_CHECKING:
    from nwfilter.backends.ebiptables.watch import DriftWatch
    from nwfilter.cluster.member import ClusterMember

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
        self.member: ClusterMember | None = None
        # One for `audit.run` and the periodic audit: what the per-port
        # checks found for unchanged rulesets is not computed again.
        self._auditor = Auditor()

    def engine(self) -> Engine:
        return self._engine

    def domains(self) -> DomainManager:
        return self._manager

    def networks(self) -> NetworkManager:
        return self._networks

    def events(self) -> EventBus:
        return self._bus

    def cluster(self) -> ClusterMember | None:
        return self.member

    def auditor(self) -> Auditor:
        return self._auditor


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
    context: api.ApiContext, line: bytes, *, read_only: bool = False,
    channel: str = "this connection",
    denied: Callable[[str, PermissionDeniedError], None] | None = None,
) -> tuple[bytes | Streaming, str | None]:
    """The reply line to one request line, and why the request was refused
    as malformed (None when it was well-formed, even if the engine said no).
    With `read_only`, a method that changes state is refused (naming
    `channel`) and reported to `denied`.
    Never raises: every line gets exactly one reply line."""
    try:
        request = protocol.decode_request(line)
    except protocol.RequestError as exc:
        return protocol.encode(protocol.error_reply(exc.request_id, exc)), exc.message
    try:
        result = api.invoke(
            context, request.method, request.params, read_only=read_only, channel=channel
        )
        if isinstance(result, api.Subscribed):
            ack = protocol.encode({"id": request.id, "result": result.result})
            return Streaming(ack, EventStream(result.subscription)), None
        reply = {"id": request.id, "result": result}
    except PermissionDeniedError as exc:
        if denied is not None:
            denied(str(request.method), exc)
        reply = protocol.error_reply(request.id, exc)
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


def _refuse(error: PermissionDeniedError, line: bytes, peer: Peer) -> tuple[bytes, str | None]:
    """Every request of a refused connection gets `error`."""
    try:
        request_id = protocol.decode_request(line).id
    except protocol.RequestError as exc:
        request_id = exc.request_id
    return protocol.encode(protocol.error_reply(request_id, error)), None


def _admit_admin(context: DaemonContext, access: AdminAccess, peer: Peer) -> Answer:
    refusal = access.refusal(peer)
    if refusal is None:
        return functools.partial(_answer, context)
    log.warning("refused the connection of %s on the admin socket '%s': only %s may use it",
                peer, access.socket, access.allowed)
    return functools.partial(_refuse, refusal)


def _admit_read_only(context: DaemonContext, path: Path, peer: Peer) -> Answer:
    channel = f"the read-only socket '{path}'"
    logged = False

    def denied(method: str, exc: PermissionDeniedError) -> None:
        nonlocal logged
        # Once per connection at warning level: a client cannot flood the log.
        level = logging.DEBUG if logged else logging.WARNING
        logged = True
        log.log(level, "refused method %r of %s on the read-only socket '%s': it changes state",
                method[:64], peer, path)

    def read_only(line: bytes, peer: Peer) -> tuple[bytes | Streaming, str | None]:
        return answer(context, line, read_only=True, channel=channel, denied=denied)

    return read_only


class Server(ConnectionServer):
    """The connection server of one engine, with what runs beside it."""

    def __init__(
        self,
        bound: BoundSocket,
        engine: Engine,
        manager: DomainManager,
        limits: Limits | None = None,
        networks: NetworkManager | None = None,
        *,
        ro_bound: BoundSocket | None = None,
        admin_group: Group | None = None,
        loop: EventLoop | None = None,
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
        # The domain core's event loop: dnsmasq supervision, IP learning and
        # the QEMU monitors.
        self.loop = loop if loop is not None else EventLoop()
        self.learner: Listener | None = None
        self.path = bound.path
        self.ro_path = ro_bound.path if ro_bound is not None else None
        self.monitor: NftMonitor | None = None
        self.watch: DriftWatch | None = None  # the ebiptables backend's repairs
        self.audit: PeriodicAudit | None = None
        access = AdminAccess(bound.path, admin_group)
        self.add_listener(bound, functools.partial(_answer, self.context),
                          admit=functools.partial(_admit_admin, self.context, access))
        if ro_bound is not None:
            self.add_listener(
                ro_bound, functools.partial(_answer, self.context),
                admit=functools.partial(_admit_read_only, self.context, ro_bound.path),
            )


def _make_reachable(root: Path, socket_path: Path) -> None:
    """Let other users reach `socket_path`: search permission (never read
    or write) on the directories between the root and it, or on its
    directory outside the root if that is created here."""
    root = Path(os.path.abspath(root))
    socket_path = Path(os.path.abspath(socket_path))
    try:
        relative = socket_path.parent.relative_to(root)
    except ValueError:
        if not socket_path.parent.exists():
            try:
                socket_path.parent.mkdir(parents=True, mode=0o711)
            except OSError as exc:
                raise StorageError(f"cannot create directory '{socket_path.parent}' for "
                                   f"socket: {exc.strerror or exc}") from exc
            os.chmod(socket_path.parent, 0o711)  # not narrowed by the umask
        return
    directories = [SafeDir.open(root, what="state root")]
    try:
        for name in relative.parts:
            directories.append(directories[-1].subdir(name))
        for directory in directories:
            mode = os.fstat(directory.fileno()).st_mode & 0o7777
            if mode & 0o011 != 0o011:
                os.fchmod(directory.fileno(), mode | 0o011)
                log.info("made '%s' traversable (mode %04o) for socket '%s'",
                         directory.path, mode | 0o011, socket_path)
    finally:
        for directory in directories:
            directory.close()


def _bind_admin(path: Path, group: Group | None, backlog: int) -> BoundSocket:
    bound = bind_unix(path, mode=0o600, backlog=backlog)
    if group is not None:
        try:
            os.chown(path, -1, group.gid, follow_symlinks=False)
            os.chmod(path, 0o660)
        except OSError as exc:
            bound.close()
            raise StorageError(f"cannot give socket '{path}' to group '{group.name}': "
                               f"{exc.strerror or exc}") from exc
    return bound


def serve(
    root: Path,
    backend: str | None,
    netns: str | None,
    socket_path: Path | None,
    limits: Limits | None = None,
    bus: EventBus | None = None,
    *,
    ro_socket: Path | None = None,
    admin_group: Group | None = None,
    inherited: Sequence[BoundSocket] = (),
    cluster: ClusterConfig | None = None,
    audit_interval: int = 0,
) -> Server:
    """Start the engine and a server for it; the caller runs `serve_forever`.

    `bus` carries the events of the engine, the domains and the nft
    monitor to `events.subscribe` streams (a new one if None).

    `backend`/`netns` None: the ones the root recorded (`nwfilter.hostrecord`).
    `socket_path` None: `ROOT/run/nwfilterd.sock`; `ro_socket` None: no
    read-only socket.  The sockets are claimed first: a path held by a
    running daemon (or by anything but a stale socket) is refused before
    the engine touches the kernel or starts a domain.  An `inherited`
    socket (passed by systemd) bound to one of the two paths is served
    instead of binding it.

    With `cluster`, the filter pool is the cluster's (`nwfilter.cluster`):
    the daemon catches up with it before it serves (for a few seconds at
    most: without etcd it serves its own copy) and follows it after.

    With `audit_interval` (seconds; 0: none) the whole audit runs that
    often in the background and publishes each new and each resolved
    finding as an `audit` event (`nwfilter.audit.periodic`).
    """
    path = socket_path or default_socket(root)
    passed = check_inherited(inherited, (path, ro_socket))
    backend, netns = hostrecord.resolve(root, backend, netns)
    backlog = (limits or Limits()).backlog
    # The root is checked (and created, 0700) before a socket goes in it.
    with SafeDir.open(root, what="state root") as checked:
        checked.subdir("run").close()
    for shared, wanted in ((path, admin_group is not None), (ro_socket, True)):
        if shared is not None and wanted:
            _make_reachable(root, shared)
    bound = passed.get(path) or _bind_admin(path, admin_group, backlog)
    bounds = [bound]
    try:
        ro_bound = None
        if ro_socket is not None:
            ro_bound = passed.get(ro_socket) or bind_unix(ro_socket, mode=0o666, backlog=backlog)
            bounds.append(ro_bound)
        engine = Engine(root, get_backend(backend, netns), owner="nwfilterd",
                        events=bus or EventBus())
        engine.start()
    except BaseException:
        for each in bounds:
            each.close()
        raise
    # Networks first: autostart domains may attach to them.  Domains that
    # survived a restart are found again (their filters were re-applied by
    # the engine) and the ones marked autostart are started.
    networks = NetworkManager(root, netns, lambda: engine.owner, events=engine.events)
    # Started before the domains: running QEMU guests are watched from it.
    loop = EventLoop()
    loop.start()
    manager = DomainManager.for_engine(engine, netns=netns, networks=networks.attachment,
                                       loop=loop)
    try:
        networks.load()
        networks.supervise()
        networks.autostart()
        manager.start(autostart=True)
        server = Server(bound, engine, manager, limits, networks, ro_bound=ro_bound,
                        admin_group=admin_group, loop=loop)
    except BaseException:
        for each in bounds:
            each.close()
        loop.stop()
        engine.close()
        raise
    if cluster is not None:
        from nwfilter.cluster.member import ClusterMember

        member = ClusterMember(engine, cluster)
        member.start()
        server.context.member = member
    if isinstance(engine.backend, NftBackend):
        # Another program flushing or editing our tables (`nft flush
        # ruleset`, a firewall reload) is repaired from the recorded state.
        server.monitor = NftMonitor.for_backend(engine.backend, events=engine.events)
        server.monitor.start()
    else:
        from nwfilter.backends.ebiptables.backend import EbiptablesBackend

        if isinstance(engine.backend, EbiptablesBackend):
            # The restore tools report no foreign edit: look, now and then.
            from nwfilter.backends.ebiptables.watch import DriftWatch

            server.watch = DriftWatch(engine.backend, events=engine.events)
            server.watch.start()
    server.learner = Listener(engine, server.loop, netns)
    server.learner.start()
    if audit_interval > 0:
        server.audit = PeriodicAudit(engine, server.context.domains, audit_interval,
                                     auditor=server.context.auditor(), events=engine.events)
        server.audit.start()

    def supervise(_timer: int, _opaque: object) -> None:
        networks.supervise()

    server.loop.add_timeout(SUPERVISE_INTERVAL, supervise)
    return server


def close(server: Server) -> None:
    """Stop serving and watching; the kernel keeps every binding's rules."""
    if server.context.member is not None:
        server.context.member.stop()
    if server.audit is not None:
        server.audit.stop()
    if server.monitor is not None:
        server.monitor.stop()
    if server.watch is not None:
        server.watch.stop()
    server.loop.stop()
    if server.learner is not None:
        server.learner.stop()
    server.server_close()
    server.engine.close()


def _seconds(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 9:
        raise argparse.ArgumentTypeError(f"must be a number of seconds (0: off), not {text!r}")
    return int(text)


def build_parser() -> argparse.ArgumentParser:
    """nwfilterd's options (also read by the man page and completion generators)."""
    parser = argparse.ArgumentParser(prog="nwfilterd", description="nwfilter API daemon")
    parser.add_argument(
        "--config", type=Path, default=None, metavar="FILE",
        help=f"configuration file (default: {daemonconf.DEFAULT_CONFIG}, if it exists)",
    )
    parser.add_argument(
        "--root", default=os.environ.get("NWFILTER_ROOT") or None,
        help=f"state root (default: $NWFILTER_ROOT, else the file's 'root', else {DEFAULT_ROOT})",
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
        "--socket", type=Path, default=None, metavar="PATH",
        help="admin socket (default ROOT/run/nwfilterd.sock)",
    )
    ro = parser.add_mutually_exclusive_group()
    ro.add_argument(
        "--ro-socket", type=Path, default=None, metavar="PATH",
        help="read-only socket (default ROOT/run/nwfilterd-ro.sock)",
    )
    ro.add_argument("--no-ro-socket", action="store_true", help="serve no read-only socket")
    parser.add_argument(
        "--admin-group", default=None, metavar="NAME",
        help="group whose members may use the admin socket (default: root only)",
    )
    defaults = Limits()
    parser.add_argument(
        "--max-connections", type=int, default=None, metavar="N",
        help=f"connections held at once (default {defaults.max_connections}; "
        "kept below RLIMIT_NOFILE)",
    )
    parser.add_argument(
        "--max-buffered", type=int, default=None, metavar="BYTES",
        help=f"bytes of partial requests held over all connections "
        f"(default {defaults.max_buffered})",
    )
    parser.add_argument(
        "--workers", type=int, default=None, metavar="N",
        help=f"requests served at once (default {defaults.workers})",
    )
    parser.add_argument(
        "--audit-interval", type=_seconds, default=None, metavar="SECONDS",
        help="run the whole audit this often and publish each new and each resolved "
        "finding as an 'audit' event (default: the file's 'audit_interval', else 0: off)",
    )
    cluster = parser.add_argument_group("cluster (see docs/cluster.md)")
    cluster.add_argument(
        "--cluster", default=None, metavar="URL[,URL...]",
        help="share the filter pool through the etcd cluster at these client URLs",
    )
    cluster.add_argument("--cluster-host", default=None, metavar="NAME",
                         help="this host's name in the cluster (default: the host name)")
    cluster.add_argument("--cluster-prefix", default=DEFAULT_PREFIX, metavar="PREFIX",
                         help=f"etcd key prefix of the cluster (default {DEFAULT_PREFIX})")
    cluster.add_argument("--cluster-ttl", type=int, default=DEFAULT_TTL, metavar="SECONDS",
                         help="seconds after which a dead host is shown gone "
                         f"(default {DEFAULT_TTL})")
    cluster.add_argument("--cluster-ca", type=Path, default=None, metavar="FILE",
                         help="CA certificate of the etcd members (https URLs)")
    cluster.add_argument("--cluster-cert", type=Path, default=None, metavar="FILE",
                         help="this host's TLS client certificate for etcd")
    cluster.add_argument("--cluster-key", type=Path, default=None, metavar="FILE",
                         help="the key of --cluster-cert")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    return parser


def cluster_config(args: argparse.Namespace) -> ClusterConfig | None:
    """The cluster the options name, or None."""
    if args.cluster is None:
        return None
    return ClusterConfig(
        parse_endpoints(args.cluster), host=args.cluster_host or socket.gethostname(),
        prefix=args.cluster_prefix, ttl=args.cluster_ttl,
        ca_cert=args.cluster_ca, cert=args.cluster_cert, key=args.cluster_key,
    )


def audit_interval(args: argparse.Namespace, config: daemonconf.DaemonConfig) -> int:
    """Seconds between periodic audits (0: none): the option, else the
    file's `audit_interval`, else none."""
    if args.audit_interval is not None:
        return int(args.audit_interval)
    return config.integers.get("audit_interval", 0)


def _start(args: argparse.Namespace) -> Server:
    """The server the options and the configuration file ask for."""
    config = daemonconf.load(args.config)
    root = Path(args.root or config.paths.get("root") or DEFAULT_ROOT)
    sizes = {
        key: value if value is not None else config.integers.get(key)
        for key, value in (("max_connections", args.max_connections),
                           ("max_buffered", args.max_buffered), ("workers", args.workers))
    }
    limits = Limits(**{key: value for key, value in sizes.items() if value is not None})
    ro_socket: Path | None
    if args.no_ro_socket:
        ro_socket = None
    elif args.ro_socket is not None:
        ro_socket = args.ro_socket
    elif "ro_socket" in config.paths:
        ro_socket = config.paths["ro_socket"]
    else:
        ro_socket = default_ro_socket(root)
    group = Group.named(args.admin_group) if args.admin_group else config.admin_group
    raise_nofile_limit()
    return serve(
        root,
        args.backend,
        args.netns,
        args.socket or config.paths.get("socket"),
        limits,
        ro_socket=ro_socket,
        admin_group=group,
        inherited=inherited_sockets(),
        cluster=cluster_config(args),
        audit_interval=audit_interval(args, config),
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    configure_logging(
        logging.INFO - 10 * min(args.verbose, 1), "%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        server = _start(args)
    except NwfilterError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_status

    def stop(signum: int, frame: object) -> None:
        server.request_shutdown()

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    log.info("listening on %s (admin)%s", server.path,
             f" and {server.ro_path} (read-only)" if server.ro_path else "")
    try:
        server.serve_forever()
    finally:
        close(server)
    return 0


if __name__ == "__main__":
    sys.exit(main())
