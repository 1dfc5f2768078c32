"""Learnt addresses and where they are kept.

The learnt values of every port live in `ROOT/run/learnt/ports.json`
(through `SafeDir`), one list of `LearntAddress` per port and variable, so
that a restarted engine keeps them until their leases end.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from nwfilter.conf.values import check_port_name
from nwfilter.errors import NwfilterError
from nwfilter.fileio import DirHandle

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LearntAddress:
    """One learnt address: where it was seen and how long it holds."""

    address: str
    source: str  # 'dhcp', 'arp', 'ip', 'dhcpv6', 'ndp'
    learnt_at: float  # wall-clock time
    expires: float | None = None  # wall-clock end of the lease; None: no lease
    server: str | None = None  # the DHCP server that granted it

    def to_json(self) -> dict[str, object]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: object) -> LearntAddress:
        if not isinstance(data, dict) or not isinstance(data.get("address"), str):
            raise ValueError("not a learnt address")
        expires = data.get("expires")
        server = data.get("server")
        return cls(str(data["address"]), str(data.get("source", "")),
                   float(data.get("learnt_at", 0.0)),
                   None if expires is None else float(expires),
                   None if server is None else str(server))

    def expired(self, now: float) -> bool:
        return self.expires is not None and self.expires <= now


Learnt = Mapping[str, Sequence[LearntAddress]]


class LearntStore:
    """The learnt-address file of one state root.

    One file, `ports.json` (port -> variable -> addresses), written
    atomically once per change of any number of ports: a round of the
    listener that learnt 100 addresses costs one write and one fsync, not
    100.  Files `<port>.json` of earlier versions are read too and removed
    by the next write."""

    FILE = "ports.json"

    def __init__(self, root: Path) -> None:
        self.dir = DirHandle(Path(root) / "run" / "learnt", "learnt address directory")

    def load(self, ports: Sequence[str], now: float | None = None, *, prune: bool = True
             ) -> tuple[dict[str, dict[str, tuple[LearntAddress, ...]]], list[str]]:
        """The unexpired learnt addresses of `ports`; with `prune` the
        addresses of other ports are forgotten on disk.  Returns them and
        warnings."""
        now = time.time() if now is None else now
        out: dict[str, dict[str, tuple[LearntAddress, ...]]] = {}
        warnings: list[str] = []
        directory = self.dir.existing()
        if directory is None:
            return out, warnings
        wanted = set(ports)
        found: dict[str, object] = {}
        stale = False
        for file in directory.names(".json"):
            try:
                data = json.loads(directory.read(file))
            except (NwfilterError, ValueError) as exc:
                warnings.append(f"learnt addresses in '{file}' are dropped: {exc}")
                continue
            if file == self.FILE:
                if isinstance(data, dict):
                    found.update({str(k): v for k, v in data.items() if str(k) not in found})
                else:
                    warnings.append(f"learnt addresses in '{file}' are dropped: not an object")
            else:
                found[file[:-5]] = data  # an earlier version's file of one port
        for port, data in sorted(found.items()):
            if port not in wanted:
                stale = True
                continue
            try:
                kept: dict[str, tuple[LearntAddress, ...]] = {}
                for var, items in dict(data).items():  # type: ignore[call-overload]
                    addrs = tuple(LearntAddress.from_json(i) for i in items)
                    addrs = tuple(a for a in addrs if not a.expired(now))
                    if addrs:
                        kept[str(var)] = addrs
                if kept:
                    out[port] = kept
            except (ValueError, TypeError) as exc:
                warnings.append(f"learnt addresses of port '{port}' are dropped: {exc}")
        if prune and stale:
            try:
                self.save_all(out)
            except NwfilterError as exc:
                warnings.append(f"learnt addresses of unbound ports stay on disk: {exc}")
        return out, warnings

    def save_all(self, learnt: Mapping[str, Learnt]) -> None:
        """Keep `learnt` (every port's learnt addresses) in one atomic write."""
        data = {}
        for portdev, byvar in sorted(learnt.items()):
            check_port_name(portdev, "port")
            kept = {var: [a.to_json() for a in addrs] for var, addrs in sorted(byvar.items())
                    if addrs}
            if kept:
                data[portdev] = kept
        directory = self.dir.get()
        directory.write(self.FILE, json.dumps(data, sort_keys=True))
        for file in directory.names(".json"):
            if file != self.FILE:
                directory.remove(file)
