"""What a command handler gets: the global options and one control path.

`Context.call` sends an API call (`nwfilter.api`) either to the nwfilterd
that serves the state root (named with `--connect`, or found at
ROOT/run/nwfilterd.sock, the admin socket, falling back to
ROOT/run/nwfilterd-ro.sock, the read-only socket, for the queries of a user
the admin socket refuses) or, when no daemon answers there, to an engine
embedded in this process.  Both give the same results and errors.  The
embedded engine manages the backend and namespace the root recorded at its
first use (`nwfilter.hostrecord`); a `--backend`/`--netns` that differs is
refused.
"""

from __future__ import annotations

import os
import stat
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nwfilter.errors import PermissionDeniedError, UnavailableError
from nwfilter.printable import printable
from nwfilter.progress import TerminalProgress

if TYPE_CHECKING:
    from nwfilter.api import Caller
    from nwfilter.client import Client
    from nwfilter.engine import Engine

DEFAULT_ROOT = "/var/lib/nwfilter"
SOCKET_NAME = "nwfilterd.sock"
RO_SOCKET_NAME = "nwfilterd-ro.sock"


def default_socket(root: Path) -> Path:
    """Where nwfilterd listens for a state root unless told otherwise."""
    return root / "run" / SOCKET_NAME


def default_ro_socket(root: Path) -> Path:
    """Where nwfilterd serves queries to every user unless told otherwise."""
    return root / "run" / RO_SOCKET_NAME


def _is_socket(path: Path) -> bool:
    """Whether `path` is a socket; False also when this user cannot tell."""
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


class SocketCaller:
    """The daemon through its admin socket, and through its read-only
    socket for the queries of a user the admin socket refuses (at connect
    time, by the socket's file mode, or by the daemon's reply)."""

    def __init__(
        self, admin: Client | None, ro_path: Path | None,
        refusal: PermissionDeniedError | None = None,
    ) -> None:
        self._admin = admin
        self._ro_path = ro_path
        self._ro: Client | None = None
        self._refusal = refusal

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        if self._admin is not None:
            try:
                return self._admin.call(method, params)
            except PermissionDeniedError as exc:
                # Here only: the table of methods loads the filter language.
                from nwfilter.api import method as lookup

                if self._ro_path is None or lookup(method).writes:
                    raise
                self._admin.close()
                self._admin, self._refusal = None, exc
        return self._read_only().call(method, params)

    def _read_only(self) -> Client:
        from nwfilter.client import Client

        if self._ro is None:
            refusal = self._refusal or PermissionDeniedError("the admin socket refused this user")
            if self._ro_path is None:
                raise refusal
            try:
                self._ro = Client(self._ro_path)
            except (UnavailableError, PermissionDeniedError):
                raise refusal from None
        return self._ro

    def attach(self) -> SocketCaller:
        """Connect to the read-only socket now; its error if it cannot."""
        if self._ro is None and self._ro_path is not None:
            from nwfilter.client import Client

            self._ro = Client(self._ro_path)
        return self

    def close(self) -> None:
        for client in (self._admin, self._ro):
            if client is not None:
                client.close()
        self._admin = self._ro = None


class Context:
    """The global options of a command and its control path.

    A plain class rather than a dataclass: every command builds one, and
    loading the dataclasses module takes longer than a call through
    nwfilterd."""

    def __init__(
        self, root: str, backend: str | None, netns: str | None, connect: str | None = None,
        quiet: bool = False, lock_timeout: float = 30.0,
    ) -> None:
        self.root = root
        self.backend = backend  # None: not given (the root's recorded one)
        self.netns = netns  # None: not given (the root's recorded one)
        self.connect = connect
        self.quiet = quiet
        self.lock_timeout = lock_timeout  # how long an embedded engine waits for the root's lock
        self._caller: Caller | None = None
        self._engine: Engine | None = None
        self.start_warnings: list[str] = []
        # Long work of an embedded engine shows on a terminal (not with -q).
        self.progress = TerminalProgress(sys.stderr, enabled=False if quiet else None)

    @property
    def root_path(self) -> Path:
        return Path(self.root)

    def host(self) -> tuple[str, str | None]:
        """The backend and namespace this root manages, given or recorded;
        `ConflictError` if the given ones differ from the record."""
        from nwfilter import hostrecord

        return hostrecord.resolve(self.root_path, self.backend, self.netns)

    # -- the control path ------------------------------------------------------

    def caller(self) -> Caller:
        """The daemon serving this root, or an embedded engine."""
        if self._caller is None:
            self._caller = self._remote() or self._embedded()
        return self._caller

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        try:
            return self.caller().call(method, params)
        finally:
            self.progress.clear()

    def daemon(self, *, purpose: str) -> Client:
        """A connection of its own to the nwfilterd serving this root, for
        queries (`purpose` says what needs it): the admin socket, or the
        read-only one for a user the admin socket refuses; `UnavailableError`
        when none answers."""
        from nwfilter.client import Client

        if self.connect is not None:
            return Client(Path(self.connect))
        refusal: PermissionDeniedError | None = None
        for path in (default_socket(self.root_path), default_ro_socket(self.root_path)):
            if not _is_socket(path):
                continue
            try:
                return Client(path)
            except PermissionDeniedError as exc:
                refusal = exc
            except UnavailableError:
                continue  # a stale socket
        if refusal is not None:
            raise refusal
        raise UnavailableError(
            f"{purpose} need nwfilterd serving the root '{self.root}', and none "
            f"answers at '{default_socket(self.root_path)}' (start nwfilterd, or "
            "name its socket with -c)"
        )

    def _remote(self) -> Caller | None:
        from nwfilter.client import Client

        if self.connect is not None:
            return Client(Path(self.connect))
        admin_path = default_socket(self.root_path)
        ro_path = default_ro_socket(self.root_path)
        ro = ro_path if _is_socket(ro_path) else None
        if _is_socket(admin_path):
            try:
                return SocketCaller(Client(admin_path), ro)
            except PermissionDeniedError as exc:
                return SocketCaller(None, ro, exc)
            except UnavailableError:
                pass  # a stale socket
        if ro is None:
            return None
        try:
            return SocketCaller(None, ro, PermissionDeniedError(
                f"no admin socket answers at '{admin_path}'")).attach()
        except (UnavailableError, PermissionDeniedError):
            return None  # stale sockets: nothing serves the root

    def _embedded(self) -> Caller:
        from nwfilter.api import EmbeddedCaller, EmbeddedContext

        self._check_reachable()
        backend, netns = self.host()
        return EmbeddedCaller(
            EmbeddedContext(lambda read_only: self._start_engine(backend, netns, read_only),
                            netns)
        )

    def _check_reachable(self) -> None:
        """A user who may not enter the root (root's own, mode 0700 or
        0711) gets one clear error rather than the storage error of the
        first file the engine would open."""
        euid = os.geteuid()
        if euid == 0:
            return
        try:
            os.stat(self.root_path)
        except FileNotFoundError:
            return
        except PermissionError:
            pass
        else:
            if os.access(self.root_path, os.R_OK | os.X_OK):
                return
        raise PermissionDeniedError(
            f"state root '{self.root}' is not accessible to uid {euid}, and no nwfilterd "
            "serves it: run the command as root, or start nwfilterd (its read-only socket "
            "serves queries to every user)"
        )

    def _start_engine(self, backend: str, netns: str | None, read_only: bool) -> Engine:
        from nwfilter.backends import get_backend
        from nwfilter.engine import Engine

        engine = Engine(
            self.root_path, get_backend(backend, netns), lock_timeout=self.lock_timeout
        )
        engine.progress = self.progress.update
        engine.start(read_only=read_only)  # its warnings are logged
        return engine

    def engine(self, *, read_only: bool = False) -> Engine:
        """An engine in this process, for the commands that must run one
        here (moving a root); every other command goes through `call`."""
        if self._engine is None:
            from nwfilter.backends import get_backend
            from nwfilter.engine import Engine

            backend, netns = self.host()
            self._engine = Engine(self.root_path, get_backend(backend, netns))
            self._engine.progress = self.progress.update
            try:
                self.start_warnings = self._engine.start(read_only=read_only)
            finally:
                self.progress.clear()
        return self._engine

    # -- output ------------------------------------------------------------------

    def info(self, text: str) -> None:
        """An informational message (what was done); `-q` silences it."""
        self.progress.clear()
        if not self.quiet:
            body = text.rstrip("\n")
            print(printable(body) + text[len(body):])

    def warn(self, lines: Iterable[str]) -> None:
        self.progress.clear()
        for line in lines:
            print(f"warning: {printable(line)}", file=sys.stderr)

    def close(self) -> None:
        self.progress.clear()
        if self._caller is not None:
            self._caller.close()
            self._caller = None
        if self._engine is not None:
            self._engine.close()
            self._engine = None
