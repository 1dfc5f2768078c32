"""The host a state root manages: its backend, its network namespace, its id.

A root records them at first use in ROOT/host.json; from then on every
command and `nwfilterd` use the recorded values when none are given, and
refuse values that differ (`ConflictError`), so a forgotten or mistyped
`--netns` can never write a root's rules into another namespace.  Moving a
root is an explicit step (`nwfilter host-move`, see docs/cli.md), which
rewrites the record and keeps the root's id.

The id is random and names the root in the kernel objects it owns
(`nwfilter.backends.base.Owner`), together with the root's path.
"""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass
from pathlib import Path

from nwfilter.backends.base import Owner
from nwfilter.errors import ConflictError, StorageError
from nwfilter.fileio import SafeDir

HOST_FILE = "host.json"
DEFAULT_BACKEND = "nft"
_MAX_BYTES = 4096


@dataclass(frozen=True)
class HostRecord:
    backend: str
    netns: str | None  # None: the host's own namespace
    root_id: str

    def where(self) -> str:
        return describe(self.backend, self.netns)

    def owner(self, root: Path) -> Owner:
        return Owner(str(Path(root).absolute()), self.root_id)


def describe(backend: str, netns: str | None) -> str:
    space = f"namespace '{netns}'" if netns else "the host's own namespace"
    return f"backend '{backend}' in {space}"


def record_path(root: Path) -> Path:
    return Path(root) / HOST_FILE


def load(root: Path) -> HostRecord | None:
    """The recorded host of `root`, or None before its first use."""
    path = record_path(root)
    directory = SafeDir.open_existing(root, what="state root")
    if directory is None:
        return None
    with directory:
        raw = directory.read_if_exists(HOST_FILE)
    if raw is None:
        return None
    try:
        data = json.loads(raw) if len(raw) <= _MAX_BYTES else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        data = None
    if (
        not isinstance(data, dict)
        or not isinstance(data.get("backend"), str)
        or not isinstance(data.get("root_id"), str)
        or not isinstance(data.get("netns"), str | None)
    ):
        raise StorageError(
            f"'{path}' is not a host record (backend, netns, root_id); "
            "restore it or move the root with 'nwfilter host-move'"
        )
    return HostRecord(data["backend"], data["netns"] or None, data["root_id"])


def save(root: Path, record: HostRecord) -> None:
    text = json.dumps(
        {"backend": record.backend, "netns": record.netns, "root_id": record.root_id},
        sort_keys=True,
    )
    with SafeDir.open(root, what="state root") as directory:
        directory.write(HOST_FILE, text + "\n", mode=0o644)


def _refuse(root: Path, record: HostRecord, backend: str | None, netns: str | None) -> None:
    want_backend = backend if backend is not None else record.backend
    want_netns = netns if netns is not None else record.netns
    if (want_backend, want_netns) == (record.backend, record.netns):
        return
    move = [f"nwfilter --root {root} host-move"]
    if want_backend != record.backend:
        move.append(f"--backend {want_backend}")
    if want_netns != record.netns:
        move.append(f"--netns {want_netns}" if want_netns else "--host-netns")
    raise ConflictError(
        f"state root '{root}' manages {record.where()} (recorded in "
        f"'{record_path(root)}'), not {describe(want_backend, want_netns)}; "
        f"nothing was changed. To move the root on purpose: {' '.join(move)}"
    )


def resolve(root: Path, backend: str | None, netns: str | None) -> tuple[str, str | None]:
    """The backend and namespace to use on `root`: the given ones (None: not
    given), else the recorded ones, else the defaults (nft, the host's
    namespace).  Given values that differ from the record are refused."""
    record = load(root)
    if record is None:
        return backend or DEFAULT_BACKEND, netns
    _refuse(root, record, backend, netns)
    return record.backend, record.netns


def claim(root: Path, backend: str, netns: str | None, *, write: bool = True) -> HostRecord:
    """Check `backend`/`netns` against the record of `root`, recording them
    (with a new root id) at first use when `write`.  The caller holds the
    root's lock, so two first uses cannot both record."""
    record = load(root)
    if record is None:
        record = HostRecord(backend, netns, secrets.token_hex(16))
        if write:
            save(root, record)
        return record
    _refuse(root, record, backend, netns)
    return record


def move(root: Path, backend: str, netns: str | None) -> HostRecord:
    """Record a new host for `root`, keeping its id (the caller holds the
    root's lock and has released the old host's objects)."""
    old = load(root)
    record = HostRecord(backend, netns, old.root_id if old else secrets.token_hex(16))
    save(root, record)
    return record
