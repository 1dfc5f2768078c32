"""What a command handler gets: the global options and a lazily built engine."""

from __future__ import annotations

import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nwfilter.engine import Engine

DEFAULT_ROOT = "/var/lib/nwfilter"


@dataclass
class Context:
    root: str
    backend: str | None  # None: not given (the root's recorded one)
    netns: str | None  # None: not given (the root's recorded one)
    _engine: Engine | None = field(default=None, init=False)
    start_warnings: list[str] = field(default_factory=list, init=False)

    @property
    def root_path(self) -> Path:
        return Path(self.root)

    def host(self) -> tuple[str, str | None]:
        """The backend and namespace this root manages, given or recorded;
        `ConflictError` if the given ones differ from the record."""
        from nwfilter import hostrecord

        return hostrecord.resolve(self.root_path, self.backend, self.netns)

    def engine(self, *, read_only: bool = False) -> Engine:
        """The engine for this state root, loaded and with its bindings
        re-applied; with `read_only` (for queries) the kernel is not touched."""
        if self._engine is None:
            from nwfilter.backends import get_backend
            from nwfilter.engine import Engine

            backend, netns = self.host()
            self._engine = Engine(self.root_path, get_backend(backend, netns))
            self.start_warnings = self._engine.start(read_only=read_only)
        return self._engine

    @staticmethod
    def warn(lines: Iterable[str]) -> None:
        for line in lines:
            print(f"warning: {line}", file=sys.stderr)

    def warn_unenforced(self, engine: Engine, portdevs: Sequence[str] | None = None) -> None:
        """One warning per port (of `portdevs`, or all) whose rules are not in
        force now, naming why: for commands that bind or start."""
        self.warn(
            f"port {port} is not enforced: {reason}"
            for port, reason in sorted(engine.enforcement(portdevs).items())
        )

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
