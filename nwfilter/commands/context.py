"""What a command handler gets: the global options and a lazily built engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nwfilter.engine import Engine

DEFAULT_ROOT = "/var/lib/nwfilter"


@dataclass
class Context:
    root: str
    backend: str
    netns: str | None
    _engine: Engine | None = field(default=None, init=False)

    @property
    def root_path(self) -> Path:
        return Path(self.root)

    def engine(self, *, backend: str | None = None, read_only: bool = False) -> Engine:
        """The engine for this state root, loaded and with its bindings
        re-applied; with `read_only` (for queries) the kernel is not touched."""
        if self._engine is None:
            from nwfilter.backends import get_backend
            from nwfilter.engine import Engine

            self._engine = Engine(
                self.root_path, get_backend(backend or self.backend, self.netns)
            )
            self._engine.start(read_only=read_only)
        return self._engine

    def close(self) -> None:
        if self._engine is not None:
            self._engine.close()
            self._engine = None
