"""The table of active port bindings and its runtime files.

`BindingTable` owns the bindings currently in force (portdev → `BindingDef`)
and their persistence: one `<portdev>.xml` per binding (`format_binding`
output) in `ROOT/run/bindings/`, written atomically, so that a restart can
re-apply every binding and never leave a port unfiltered.  A file that
cannot be read is reported and skipped, never deleted.

The index: parsing a thousand binding files costs about half a second, a
price every command run without a daemon would pay.  `.index.json` in the
same directory (`INDEX`) holds, per file that parsed, its status (inode,
size, modification and change times in nanoseconds) and the binding it
holds; `load` takes a file's binding from the index when its status is
unchanged and parses it otherwise, so a file edited, replaced or restored
by hand is read again.  The index is rewritten (atomically) with every
change of the table and after a load that parsed anything; one that is
missing, unreadable or of another version is ignored, never trusted in
part.

Locking: `lock` is the table's lock at `Level.BINDING`.  The mutating
methods take it themselves and only ever hold it for the in-memory update
and one file operation; they update the table in place.  Readers do without
the lock: `all()` and `using()` copy the table in one step (atomic under the
GIL) before they look at it.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from nwfilter.conf.binding_xml import format_binding, parse_binding
from nwfilter.conf.model import BindingDef, FilterRef, Parameter
from nwfilter.conf.values import check_port_name
from nwfilter.errors import NwfilterError
from nwfilter.fileio import DirHandle, SafeDir
from nwfilter.locks import Level, LevelledLock

log = logging.getLogger(__name__)

INDEX = ".index.json"
INDEX_VERSION = 1
# What tells a file unchanged: a write through `SafeDir.write` makes a new
# inode; an edit in place changes the size or the times (the change time
# cannot be set back by hand).
StatKey = tuple[int, int, int, int]


class BindingTable:
    """Active bindings by portdev, mirrored in a runtime directory."""

    def __init__(self, run_dir: Path) -> None:
        self.run_dir = Path(run_dir)
        self.lock = LevelledLock("binding-table", Level.BINDING)
        self._bindings: dict[str, BindingDef] = {}
        self._keys: dict[str, StatKey] = {}  # file name -> its status, as indexed
        self.generation = 0  # bumped on every change (see FilterPool.generation)
        self._dir = DirHandle(self.run_dir, "binding directory")

    def load(self) -> list[str]:
        """Read every binding file (through the index); return warnings for
        the ones skipped."""
        directory = self._dir.reopen()
        warnings = directory.remove_temporaries()
        index = _read_index(directory)
        loaded: dict[str, BindingDef] = {}
        keys: dict[str, StatKey] = {}
        parsed = False
        for name, st in directory.entries(".xml").items():
            key = _stat_key(st)
            known = index.get(name)
            if known is not None and known[0] == key:
                loaded[known[1].portdev] = known[1]
                keys[name] = key
                continue
            parsed = True
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
            keys[name] = key
        for text in warnings:
            log.warning("%s", text)
        with self.lock:
            self._bindings = loaded
            self._keys = keys
            self.generation += 1
            if parsed or set(index) != set(keys):
                self._write_index(directory, quiet=True)
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
            self._keep_key(directory, self._file_name(binding.portdev))
        self.generation += 1
        self._write_index(directory)

    def remove(self, portdev: str) -> BindingDef | None:
        """Forget a binding and remove its file; return it (None if absent)."""
        with self.lock:
            return self.remove_locked(portdev)

    def remove_locked(self, portdev: str) -> BindingDef | None:
        """`remove` for a caller holding `lock`."""
        old = self._bindings.get(portdev)
        if old is None:
            return None
        directory = self._dir.get()
        directory.remove(self._file_name(portdev))
        del self._bindings[portdev]
        self._keys.pop(self._file_name(portdev), None)
        self.generation += 1
        self._write_index(directory)
        return old

    def _keep_key(self, directory: SafeDir, name: str) -> None:
        st = directory.stat_if_exists(name)
        if st is None:
            self._keys.pop(name, None)
        else:
            self._keys[name] = _stat_key(st)

    def _write_index(self, directory: SafeDir, *, quiet: bool = False) -> None:
        """Write the index of the table as it is now (the caller holds
        `lock`).  A failure costs the next load its speed, never its
        correctness: it is logged, not raised."""
        files = {}
        for name, key in sorted(self._keys.items()):
            binding = self._bindings.get(name[: -len(".xml")])
            if binding is not None:
                files[name] = {"stat": list(key), "binding": _to_json(binding)}
        text = json.dumps({"version": INDEX_VERSION, "files": files}, separators=(",", ":"))
        try:
            directory.write(INDEX, text)
        except NwfilterError as exc:
            (log.debug if quiet else log.warning)(
                "the binding index is not written: %s", exc.message)

    @staticmethod
    def _file_name(portdev: str) -> str:
        return f"{check_port_name(portdev, 'port device name')}.xml"


def _portdev(binding: BindingDef) -> str:
    return binding.portdev


def _stat_key(st: os.stat_result) -> StatKey:
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def _to_json(binding: BindingDef) -> dict[str, Any]:
    return {
        "owner_name": binding.owner_name, "owner_uuid": str(binding.owner_uuid),
        "portdev": binding.portdev, "mac": binding.mac, "linkdev": binding.linkdev,
        "filter": binding.filterref.filter,
        "params": [[p.name, p.value] for p in binding.filterref.params],
    }


def _from_json(data: Mapping[str, Any]) -> BindingDef:
    params = tuple(Parameter(str(name), str(value)) for name, value in data["params"])
    linkdev = data["linkdev"]
    return BindingDef(
        owner_name=str(data["owner_name"]), owner_uuid=uuid.UUID(str(data["owner_uuid"])),
        portdev=str(data["portdev"]), mac=str(data["mac"]),
        filterref=FilterRef(str(data["filter"]), params),
        linkdev=None if linkdev is None else str(linkdev),
    )


def _read_index(directory: SafeDir) -> dict[str, tuple[StatKey, BindingDef]]:
    """The index (file name -> (status, binding)); empty when there is
    none or it cannot be used as a whole."""
    try:
        raw = directory.read_if_exists(INDEX)
    except NwfilterError as exc:
        log.warning("ignoring the binding index: %s", exc.message)
        return {}
    if raw is None:
        return {}
    out: dict[str, tuple[StatKey, BindingDef]] = {}
    try:
        data = json.loads(raw)
        if data.get("version") != INDEX_VERSION:
            return {}
        for name, entry in data["files"].items():
            ino, size, mtime, ctime = (int(x) for x in entry["stat"])
            binding = _from_json(entry["binding"])
            if name != f"{binding.portdev}.xml":
                return {}
            out[name] = ((ino, size, mtime, ctime), binding)
    except (ValueError, TypeError, KeyError, AttributeError) as exc:
        log.warning("ignoring the binding index '%s': %s", directory.path / INDEX, exc)
        return {}
    return out
