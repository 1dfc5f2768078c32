"""What the query calls answer: a domain's summary and its interface rows."""

from __future__ import annotations

from dataclasses import dataclass
from uuid import UUID

from nwfilter.conf.model import InterfaceDef
from nwfilter.domain.hypervisor import PortPlan
from nwfilter.domain.objects import DomainState


@dataclass(frozen=True)
class DomainSummary:
    id: int  # -1 when inactive
    name: str
    uuid: UUID
    type: str
    state: DomainState
    reason: str
    persistent: bool
    autostart: bool


@dataclass(frozen=True)
class InterfaceRow:
    """One line of `domiflist`."""

    interface: str  # the host port, '-' when inactive and not given
    type: str
    source: str
    model: str
    mac: str
    filter: str | None


def interface_row(iface: InterfaceDef, port: PortPlan | None) -> InterfaceRow:
    name = port.portdev if port is not None else (iface.target_dev or "-")
    return InterfaceRow(
        interface=name,
        type=iface.type,
        source=iface.source_bridge or iface.source_network or "-",
        model=iface.model or "-",
        mac=iface.mac or "-",
        filter=iface.filterref.filter if iface.filterref is not None else None,
    )
