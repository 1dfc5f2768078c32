"""The table of active port bindings and its runtime files.

`BindingTable` owns the bindings currently in force (portdev → `BindingDef`)
and their persistence: one `<portdev>.xml` per binding (`format_binding`
output) in `ROOT/run/bindings/`, written atomically, so that a restart can
re-apply every binding and never leave a port unfiltered.  A file that
cannot be read is reported and skipped, never deleted.

Locking: `lock` is the table's lock at `Level.BINDING`.  The mutating
methods take it themselves and only ever hold it for the in-memory update
and one file operation; they update the table in place.  Readers do without
the lock: `all()` and `using()` copy the table in one step (atomic under the
GIL) before they look at it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from pathlib import Path

from nwfilter.conf.binding_xml import format_binding, parse_binding
from nwfilter.conf.model import BindingDef
from nwfilter.conf.values import check_port_name
from nwfilter.errors import NwfilterError
from nwfilter.fileio import DirHandle
from nwfilter.locks import Level, LevelledLock

log = logging.getLogger(__name__)


class BindingTable:
    """Active bindings by portdev, mirrored in a runtime directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.lock = LevelledLock("binding-table", Level.BINDING)
        self._bindings: dict[str, BindingDef] = {}
        self.generation = 0  # bumped on every change (see FilterPool.generation)
        self._dir = DirHandle(self.run_dir, "binding directory")

    def load(self) -> list[str]:
        """Read every binding file; return warnings for the ones skipped."""
        directory = self._dir.reopen()
        warnings = directory.remove_temporaries()
        loaded: dict[str, BindingDef] = {}
        for name in directory.names(".xml"):
            path = directory.path / name
            try:
                binding = parse_binding(directory.read(name), source=str(path))
                check_port_name(binding.portdev, "port device name")
            except NwfilterError as exc:
                warnings.append(f"skipping binding file '{path}': {exc.message}")
                continue
            if path.name != f"{binding.portdev}.xml":
                warnings.append(
                    f"skipping binding file '{path}': it holds port '{binding.portdev}'"
                )
                continue
            loaded[binding.portdev] = binding
        for text in warnings:
            log.warning("%s", text)
        with self.lock:
            self._bindings = loaded
            self.generation += 1
        return warnings

    # ------------------------------------------------------------- queries

    def get(self, portdev: str) -> BindingDef | None:
        return self._bindings.get(portdev)

    def __contains__(self, portdev: object) -> bool:
        return portdev in self._bindings

    def __len__(self) -> int:
        return len(self._bindings)

    def all(self) -> list[BindingDef]:
        """Every binding, sorted by portdev."""
        return sorted(self._snapshot(), key=_portdev)

    def using(self, filter_names: Iterable[str]) -> list[BindingDef]:
        """Bindings whose root filter is one of `filter_names`, sorted by portdev."""
        names = frozenset(filter_names)
        return sorted((b for b in self._snapshot() if b.filterref.filter in names), key=_portdev)

    def _snapshot(self) -> list[BindingDef]:
        # One C-level copy: a put or remove in another thread cannot change
        # the dict while it is being walked.
        return list(self._bindings.values())

    # ------------------------------------------------------------- changes

    def put_many(self, bindings: Iterable[BindingDef]) -> None:
        """Record bindings and write their files; a failed write undoes them all."""
        with self.lock:
            self.put_many_locked(bindings)

    def put_many_locked(self, bindings: Iterable[BindingDef]) -> None:
        """`put_many` for a caller holding `lock`."""
        items = list(bindings)
        directory = self._dir.get()
        written: list[BindingDef] = []
        try:
            for binding in items:
                directory.write(self._file_name(binding.portdev), format_binding(binding))
                written.append(binding)
        except NwfilterError:
            for binding in written:
                old = self._bindings.get(binding.portdev)
                try:
                    if old is None:
                        directory.remove(self._file_name(binding.portdev))
                    else:
                        directory.write(self._file_name(binding.portdev), format_binding(old))
                except NwfilterError as exc:
                    log.error("cannot restore binding file of '%s': %s", binding.portdev, exc)
            raise
        for binding in items:
            self._bindings[binding.portdev] = binding
        self.generation += 1

    def remove(self, portdev: str) -> BindingDef | None:
        """Forget a binding and remove its file; return it (None if absent)."""
        with self.lock:
            return self.remove_locked(portdev)

    def remove_locked(self, portdev: str) -> BindingDef | None:
        """`remove` for a caller holding `lock`."""
        old = self._bindings.get(portdev)
        if old is None:
            return None
        self._dir.get().remove(self._file_name(portdev))
        del self._bindings[portdev]
        self.generation += 1
        return old

    @staticmethod
    def _file_name(portdev: str) -> str:
        return f"{check_port_name(portdev, 'port device name')}.xml"


def _portdev(binding: BindingDef) -> str:
    return binding.portdev
