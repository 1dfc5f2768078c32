"""Learnt addresses and where they are kept.

A port's learnt values live in `ROOT/run/learnt/<portdev>.json` (through
`SafeDir`), one list of `LearntAddress` per variable, so that a restarted
engine keeps them until their leases end.
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
    """The learnt-address files of one state root."""

    def __init__(self, root: Path) -> None:
        self.dir = DirHandle(Path(root) / "run" / "learnt", "learnt address directory")

    def load(self, ports: Sequence[str], now: float | None = None, *, prune: bool = True
             ) -> tuple[dict[str, dict[str, tuple[LearntAddress, ...]]], list[str]]:
        """The unexpired learnt addresses of `ports`; with `prune` the files
        of other ports are removed.  Returns them and warnings."""
        now = time.time() if now is None else now
        out: dict[str, dict[str, tuple[LearntAddress, ...]]] = {}
        warnings: list[str] = []
        directory = self.dir.existing()
        if directory is None:
            return out, warnings
        wanted = set(ports)
        for file in directory.names(".json"):
            port = file[:-5]
            try:
                if port not in wanted:
                    if prune:
                        directory.remove(file)
                    continue
                data = json.loads(directory.read(file))
                kept: dict[str, tuple[LearntAddress, ...]] = {}
                for var, items in dict(data).items():
                    addrs = tuple(LearntAddress.from_json(i) for i in items)
                    addrs = tuple(a for a in addrs if not a.expired(now))
                    if addrs:
                        kept[str(var)] = addrs
                if kept:
                    out[port] = kept
            except (NwfilterError, ValueError, TypeError) as exc:
                warnings.append(f"learnt addresses of port '{port}' are dropped: {exc}")
        return out, warnings

    def save(self, portdev: str, learnt: Learnt) -> None:
        check_port_name(portdev, "port")
        if not any(learnt.values()):
            self.remove(portdev)
            return
        data = {var: [a.to_json() for a in addrs] for var, addrs in sorted(learnt.items())
                if addrs}
        self.dir.get().write(f"{portdev}.json", json.dumps(data, indent=1, sort_keys=True))

    def remove(self, portdev: str) -> None:
        directory = self.dir.existing()
        if directory is not None:
            directory.remove(f"{portdev}.json")
