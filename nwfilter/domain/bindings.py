"""Filters follow the domains: what a running domain's ports bind, and what
the drivers need of the filter engine and of the networks.

A start plans its ports first (`plan_ports`: each interface's host port
name reserved, its bridge or network found), then turns every interface
that has a `<filterref>` into a filter binding (`binding_for`: owner = the
domain, portdev = its host port, the interface's MAC, filterref and
parameters, plus the DHCP servers of the network it attaches to); the live
definition names each host port as its `<target dev>` (`with_ports`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Protocol

from nwfilter.conf.domain_xml import ATTACHABLE_TYPES
from nwfilter.conf.model import BindingDef, DomainDef, InterfaceDef, Parameter
from nwfilter.domain.hypervisor import PortPlan
from nwfilter.domain.registry import BindingLookup, SharedNames, check_target_devs
from nwfilter.errors import NwfilterError, UnsupportedError, ValidationError


class FilterEngine(Protocol):
    """What the driver needs of the filter engine."""

    def create_bindings(self, defs: Sequence[BindingDef]) -> object: ...

    def delete_binding(self, portdev: str) -> object: ...


class NetworkAttachment(Protocol):
    @property
    def bridge(self) -> str: ...

    @property
    def dhcp_servers(self) -> tuple[str, ...]: ...


#: the bridge (and DHCP servers) of an active network; StateError if it is not
NetworkLookup = Callable[[str], NetworkAttachment]


def binding_for(dom: DomainDef, port: PortPlan) -> BindingDef:
    iface = dom.interfaces[port.index]
    if iface.filterref is None:
        raise ValueError(f"interface {port.index} of '{dom.name}' has no filter")
    filterref = iface.filterref
    if port.dhcp_servers and "DHCPSERVER" not in filterref.param_dict():
        # The network's own DHCP server is the one the guest's address is
        # learnt from (and the one filters using $DHCPSERVER let through).
        extra = tuple(Parameter("DHCPSERVER", s) for s in port.dhcp_servers)
        filterref = replace(filterref, params=filterref.params + extra)
    return BindingDef(
        owner_name=dom.name,
        owner_uuid=dom.uuid,
        portdev=port.portdev,
        mac=port.mac,
        filterref=filterref,
        linkdev=None,
    )


def with_ports(dom: DomainDef, ports: Sequence[PortPlan]) -> DomainDef:
    """The live definition of a started domain: each interface's
    `<target dev>` names its host port, as libvirt shows a running guest."""
    ifaces = list(dom.interfaces)
    for port in ports:
        if ifaces[port.index].target_dev != port.portdev:
            ifaces[port.index] = replace(ifaces[port.index], target_dev=port.portdev)
    return replace(dom, interfaces=tuple(ifaces)) if ifaces != list(dom.interfaces) else dom


def plan_ports(
    dom: DomainDef,
    names: SharedNames,
    bound: BindingLookup | None,
    networks: NetworkLookup | None,
) -> list[PortPlan]:
    """The ports of a start; reserves their names (checks come first,
    so a refused start reserves nothing)."""
    macs: list[str] = []
    attached: dict[int, NetworkAttachment] = {}
    for index, iface in enumerate(dom.interfaces):
        if iface.type not in ATTACHABLE_TYPES:
            raise UnsupportedError(
                f"domain '{dom.name}': interface {index + 1} has type '{iface.type}', "
                f"which no driver here can attach ({', '.join(ATTACHABLE_TYPES)})"
            )
        if iface.type == "network":
            attached[index] = _network(networks, dom, index, iface)
        if iface.mac is None:
            raise ValidationError(f"interface {index} of domain '{dom.name}' has no MAC")
        macs.append(iface.mac)
    check_target_devs(dom)  # a definition stored before the check existed
    portdevs = names.reserve_ports(dom.name, [i.target_dev for i in dom.interfaces], bound)
    plans = []
    for index, (iface, portdev, mac) in enumerate(
        zip(dom.interfaces, portdevs, macs, strict=True)
    ):
        net = attached.get(index)
        plans.append(PortPlan(
            index, portdev, mac, net.bridge if net is not None else iface.source_bridge,
            iface.filterref is not None, net.dhcp_servers if net is not None else (),
        ))
    return plans


def _network(
    networks: NetworkLookup | None, dom: DomainDef, index: int, iface: InterfaceDef
) -> NetworkAttachment:
    """The active network an interface attaches to; refused if none is."""
    name = iface.source_network
    if networks is None:
        raise UnsupportedError(
            f"domain '{dom.name}': interface {index + 1} uses network '{name}', "
            "and no networks are managed here"
        )
    assert name is not None
    try:
        return networks(name)
    except NwfilterError as exc:
        raise type(exc)(
            f"domain '{dom.name}': interface {index + 1} cannot attach to network "
            f"'{name}': {exc.message}", exc.code
        ) from exc
