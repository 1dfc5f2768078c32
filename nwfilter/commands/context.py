"""What a command handler gets: the global options and one control path.

`Context.call` sends an API call (`nwfilter.api`) either to the nwfilterd
that serves the state root (named with `--connect`, or found at
ROOT/run/nwfilterd.sock) or, when no daemon answers there, to an engine
embedded in this process.  Both give the same results and errors.  The
embedded engine manages the backend and namespace the root recorded at its
first use (`nwfilter.hostrecord`); a `--backend`/`--netns` that differs is
refused.
"""

from __future__ import annotations

import sys
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nwfilter.errors import UnavailableError
from nwfilter.printable import printable
from nwfilter.progress import TerminalProgress

if TYPE_CHECKING:
    from nwfilter.api import Caller
    from nwfilter.engine import Engine

DEFAULT_ROOT = "/var/lib/nwfilter"
SOCKET_NAME = "nwfilterd.sock"


def default_socket(root: Path) -> Path:
    """Where nwfilterd listens for a state root unless told otherwise."""
    return root / "run" / SOCKET_NAME


@dataclass
class Context:
    root: str
    backend: str | None  # None: not given (the root's recorded one)
    netns: str | None  # None: not given (the root's recorded one)
    connect: str | None = None
    quiet: bool = False
    lock_timeout: float = 30.0  # how long an embedded engine waits for the root's lock
    _caller: Caller | None = field(default=None, init=False)
    _engine: Engine | None = field(default=None, init=False)
    start_warnings: list[str] = field(default_factory=list, init=False)
    # Long work of an embedded engine shows on a terminal (not with -q).
    progress: TerminalProgress = field(init=False)

    def __post_init__(self) -> None:
        self.progress = TerminalProgress(sys.stderr, enabled=False if self.quiet else None)

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

    def _remote(self) -> Caller | None:
        from nwfilter.client import Client

        if self.connect is not None:
            return Client(Path(self.connect))
        path = default_socket(self.root_path)
        if not path.is_socket():
            return None
        try:
            return Client(path)
        except UnavailableError:
            return None  # a stale socket: nothing serves the root

    def _embedded(self) -> Caller:
        from nwfilter.api import EmbeddedCaller, EmbeddedContext

        backend, netns = self.host()
        return EmbeddedCaller(
            EmbeddedContext(lambda read_only: self._start_engine(backend, netns, read_only),
                            netns)
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
