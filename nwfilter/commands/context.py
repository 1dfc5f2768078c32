"""What a command handler gets: the global options and one control path.

`Context.call` sends an API call (`nwfilter.api`) either to the nwfilterd
that serves the state root (named with `--connect`, or found at
ROOT/run/nwfilterd.sock) or, when no daemon answers there, to an engine
embedded in this process.  Both give the same results and errors.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from nwfilter.errors import UnavailableError
from nwfilter.printable import printable

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
    backend: str
    netns: str | None
    connect: str | None = None
    quiet: bool = False
    _caller: Caller | None = field(default=None, init=False)
    _engine: Engine | None = field(default=None, init=False)

    @property
    def root_path(self) -> Path:
        return Path(self.root)

    def caller(self) -> Caller:
        """The daemon serving this root, or an embedded engine."""
        if self._caller is None:
            self._caller = self._remote() or self._embedded()
        return self._caller

    def info(self, text: str) -> None:
        """An informational message (what was done); `-q` silences it."""
        if not self.quiet:
            body = text.rstrip("\n")
            print(printable(body) + text[len(body):])

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        return self.caller().call(method, params)

    @property
    def remote(self) -> bool:
        from nwfilter.client import Client

        return isinstance(self.caller(), Client)

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

        return EmbeddedCaller(EmbeddedContext(self._start_engine, self.netns))

    def _start_engine(self, read_only: bool) -> Engine:
        from nwfilter.backends import get_backend
        from nwfilter.engine import Engine

        engine = Engine(self.root_path, get_backend(self.backend, self.netns))
        engine.start(read_only=read_only)
        return engine

    def engine(self, *, backend: str | None = None, read_only: bool = False) -> Engine:
        """An embedded engine for commands that need one in process (the
        sandbox); every other command goes through `call`."""
        if self._engine is None:
            from nwfilter.backends import get_backend
            from nwfilter.engine import Engine

            self._engine = Engine(
                self.root_path, get_backend(backend or self.backend, self.netns)
            )
            self._engine.start(read_only=read_only)
        return self._engine

    def close(self) -> None:
        if self._caller is not None:
            self._caller.close()
            self._caller = None
        if self._engine is not None:
            self._engine.close()
            self._engine = None
