"""The files of the domains of a state root, and the status file's format.

* `ROOT/domains/<name>.xml` — persistent definitions (atomic writes);
* `ROOT/domains/autostart/<name>` — autostart marks;
* `ROOT/run/domains/<name>.json` — runtime status of an active domain: id,
  state, the live definition and the ports it runs with, so a restarted
  engine finds its running domains again (`nwfilter.domain.reconnect`);
* `ROOT/run/domains/shutoff/<name>` — why a persistent domain last shut off;
* `ROOT/run/hypervisor/<type>/` — private runtime state of each hypervisor.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from nwfilter.conf.model import DomainDef
from nwfilter.domain.hypervisor import PortPlan
from nwfilter.domain.objects import DomainObj, DomainState
from nwfilter.domain.registry import validate_domain_name
from nwfilter.errors import NwfilterError, StorageError
from nwfilter.fileio import DirHandle, SafeDir

log = logging.getLogger(__name__)


class DomainFiles:
    """The domain files of a state root (see the module docstring), each
    directory opened and checked once (`nwfilter.fileio.SafeDir`)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.configs = DirHandle(root / "domains", "domain directory")
        self.marks = DirHandle(root / "domains" / "autostart", "autostart directory")
        self.statuses = DirHandle(root / "run" / "domains", "domain status directory")
        # Why each persistent domain last shut off (libvirt's state reason).
        self.shutoffs = DirHandle(root / "run" / "domains" / "shutoff",
                                  "domain shutoff directory")

    def hypervisor_dir(self, dtype: str) -> Path:
        return self.root / "run" / "hypervisor" / dtype

    def save_config(self, name: str, text: str) -> None:
        self.configs.get().write(f"{validate_domain_name(name)}.xml", text)

    def remove_config(self, name: str) -> None:
        self.configs.get().remove(f"{validate_domain_name(name)}.xml")
        marks = self.marks.existing()
        if marks is not None:
            marks.remove(validate_domain_name(name))

    def set_autostart(self, name: str, enable: bool) -> None:
        if enable:
            self.marks.get().write(validate_domain_name(name), name + "\n")
            return
        marks = self.marks.existing()
        if marks is not None:
            marks.remove(validate_domain_name(name))

    def save_status(self, name: str, text: str) -> None:
        self.statuses.get().write(f"{validate_domain_name(name)}.json", text)

    def remove_status(self, name: str) -> None:
        self.statuses.get().remove(f"{validate_domain_name(name)}.json")

    def save_shutoff(self, name: str, reason: str) -> None:
        self.shutoffs.get().write(validate_domain_name(name), reason + "\n")

    def shutoff_reason(self, name: str) -> str:
        """Why the domain last shut off, '' if unknown."""
        directory = self.shutoffs.existing()
        if directory is None:
            return ""
        try:
            data = directory.read_if_exists(validate_domain_name(name))
        except NwfilterError:
            return ""
        return data.decode("utf-8", "replace").strip() if data else ""

    def remove_shutoff(self, name: str) -> None:
        directory = self.shutoffs.existing()
        if directory is not None:
            directory.remove(validate_domain_name(name))


def read_all(directory: SafeDir | None, suffix: str, what: str) -> list[tuple[Path, bytes]]:
    """(path, content) of each file in `directory` ending in `suffix`; one
    that cannot be read is logged and left out."""
    found: list[tuple[Path, bytes]] = []
    if directory is None:
        return found
    for name in directory.names(suffix):
        try:
            found.append((directory.path / name, directory.read(name)))
        except NwfilterError as exc:
            log.error("skipping %s '%s': %s", what, directory.path / name, exc)
    return found


def parse_xml(xml: str) -> DomainDef:
    from nwfilter.conf import parse_domain

    result: DomainDef = parse_domain(xml)
    return result


def format_xml(definition: DomainDef) -> str:
    from nwfilter.conf import format_domain

    result: str = format_domain(definition)
    return result


@dataclass(frozen=True)
class DomainStatus:
    """The runtime status file of an active domain, read back."""

    live: DomainDef
    ports: tuple[PortPlan, ...]
    id: int | None
    state: DomainState
    reason: str
    persistent: bool


def read_status(name: str, status: Mapping[str, object]) -> DomainStatus:
    """Parse what `status_json` wrote; `StorageError` if it is
    not what it wrote."""
    try:
        live = parse_xml(str(status["xml"]))
        raw_ports = status.get("ports")
        ports = tuple(
            PortPlan(int(p["index"]), str(p["portdev"]), str(p["mac"]),
                     None if p.get("bridge") is None else str(p["bridge"]), bool(p["filtered"]),
                     tuple(str(s) for s in p.get("dhcp_servers", ())))
            for p in (raw_ports if isinstance(raw_ports, list) else [])
        )
        state = DomainState[str(status.get("state", "RUNNING"))]
    except (KeyError, ValueError, TypeError, AttributeError) as exc:
        raise StorageError(f"malformed runtime status of domain '{name}': {exc!r}") from exc
    if live.name != name:
        raise StorageError(f"runtime status of domain '{name}' holds domain '{live.name}'")
    domid = status.get("id")
    return DomainStatus(
        live=live,
        ports=ports,
        id=domid if isinstance(domid, int) and domid > 0 else None,
        state=state,
        reason=str(status.get("reason", "unknown")),
        persistent=bool(status.get("persistent", True)),
    )


def status_json(obj: DomainObj, dtype: str) -> str:
    """The runtime status file of `obj` (locked), as `read_status` reads it."""
    data = {
        "name": obj.name,
        "uuid": str(obj.uuid),
        "type": dtype,
        "id": obj.id,
        "state": obj.state.name,
        "reason": obj.reason,
        "persistent": obj.persistent,
        "ports": [
            {
                "index": p.index,
                "portdev": p.portdev,
                "mac": p.mac,
                "bridge": p.bridge,
                "filtered": p.filtered,
                "dhcp_servers": list(p.dhcp_servers),
            }
            for p in obj.ports
        ],
        "xml": format_xml(obj.definition),
    }
    return json.dumps(data, indent=1, sort_keys=True)
