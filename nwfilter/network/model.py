"""libvirt network documents: parse, validate, format.

A document is accepted when libvirt's own `network.rng` accepts it
(`nwfilter.conf.libvirt_schema`).  What the engine uses is read into a
`NetworkDef`:

    <network>
      <name>, <uuid> (generated when absent)
      <forward mode='nat|bridge'/>      (absent: isolated; no mode: nat)
      <bridge name='virbr0'/>           (generated for nat and isolated networks)
      <ip address='192.168.122.1' netmask='255.255.255.0' | prefix='24'>
        <dhcp>
          <range start=... end=...><lease expiry='N' unit='seconds|minutes|hours'/></range>
          <host mac=... ip=... name=.../>
        </dhcp>
      </ip>
    </network>

Everything else (dns, domain, mtu, portgroups, IPv6 `<ip>`, metadata...) is
kept verbatim in `NetworkDef.document` and printed back unchanged.
"""

from __future__ import annotations

import ipaddress
import uuid as uuidlib
from dataclasses import dataclass, field

from lxml import etree

from nwfilter.conf.binding_xml import parse_mac_address
from nwfilter.conf.libvirt_schema import validate_network
from nwfilter.conf.safexml import local_name, parse_xml, serialize, serialize_checked
from nwfilter.conf.values import check_object_name, parse_uuid_text
from nwfilter.conf.xmlcheck import fail
from nwfilter.errors import ValidationError
from nwfilter.netns import check_ifname

#: forward modes a network can be started with here (None: isolated)
STARTABLE_MODES = ("nat", "bridge", None)
_LEASE_UNITS = {"seconds": 1, "minutes": 60, "hours": 3600}
# dnsmasq refuses leases shorter than two minutes; libvirt passes the value on.
MIN_LEASE = 120


@dataclass(frozen=True)
class DhcpRange:
    start: ipaddress.IPv4Address
    end: ipaddress.IPv4Address
    lease: int | None = None  # seconds; None: dnsmasq's default (one hour)


@dataclass(frozen=True)
class DhcpHost:
    mac: str | None
    ip: ipaddress.IPv4Address
    name: str | None = None


@dataclass(frozen=True)
class NetworkDef:
    name: str
    uuid: uuidlib.UUID
    forward: str | None  # 'nat', 'bridge', 'route', ...; None: isolated
    bridge: str | None
    address: ipaddress.IPv4Interface | None = None  # the host's address on the bridge
    ranges: tuple[DhcpRange, ...] = ()
    hosts: tuple[DhcpHost, ...] = ()
    document: str = field(default="", compare=False)

    @property
    def dhcp(self) -> bool:
        return bool(self.ranges or self.hosts)

    @property
    def managed_bridge(self) -> bool:
        """Whether starting the network creates its bridge (not bridge mode)."""
        return self.forward != "bridge"


def _child(parent: etree._Element, tag: str) -> etree._Element | None:
    for child in parent:
        if isinstance(child.tag, str) and local_name(child) == tag:
            return child
    return None


def _v4(text: str | None, what: str, where: str) -> ipaddress.IPv4Address:
    try:
        return ipaddress.IPv4Address(text or "")
    except ValueError:
        raise fail(where, f"{what} {text!r} is not an IPv4 address") from None


def _address(ip: etree._Element, where: str) -> ipaddress.IPv4Interface:
    addr = _v4(ip.get("address"), "<ip address>", where)
    prefix = ip.get("prefix")
    netmask = ip.get("netmask")
    try:
        if prefix is not None:
            return ipaddress.IPv4Interface(f"{addr}/{int(prefix)}")
        if netmask is not None:
            return ipaddress.IPv4Interface(f"{addr}/{netmask}")
    except ValueError:
        raise fail(where, f"<ip> prefix or netmask of {addr} is not valid") from None
    # libvirt's default: the classful netmask of the address
    first = int(addr) >> 24
    bits = 8 if first < 128 else 16 if first < 192 else 24
    return ipaddress.IPv4Interface(f"{addr}/{bits}")


def _lease(rng: etree._Element, where: str) -> int | None:
    lease = _child(rng, "lease")
    if lease is None:
        return None
    expiry = lease.get("expiry", "")
    unit = lease.get("unit", "minutes")
    if not expiry.isdigit() or unit not in _LEASE_UNITS:
        raise fail(where, f"<lease expiry={expiry!r} unit={unit!r}> is not valid")
    seconds = int(expiry) * _LEASE_UNITS[unit]
    if seconds == 0:
        return None  # libvirt: 0 means infinite
    if seconds < MIN_LEASE:
        raise fail(where, f"a DHCP lease of {seconds} s is shorter than dnsmasq's minimum "
                          f"of {MIN_LEASE} s")
    return seconds


def _dhcp(ip: etree._Element, net: ipaddress.IPv4Network, where: str
          ) -> tuple[list[DhcpRange], list[DhcpHost]]:
    ranges: list[DhcpRange] = []
    hosts: list[DhcpHost] = []
    dhcp = _child(ip, "dhcp")
    if dhcp is None:
        return ranges, hosts
    for elem in dhcp:
        if not isinstance(elem.tag, str):
            continue
        tag = local_name(elem)
        if tag == "range":
            start = _v4(elem.get("start"), "<range start>", where)
            end = _v4(elem.get("end"), "<range end>", where)
            if start not in net or end not in net or end < start:
                raise fail(where, f"DHCP range {start}-{end} is not an ordered range in {net}")
            ranges.append(DhcpRange(start, end, _lease(elem, where)))
        elif tag == "host":
            addr = _v4(elem.get("ip"), "<host ip>", where)
            if addr not in net:
                raise fail(where, f"DHCP host address {addr} is not in {net}")
            mac_text = elem.get("mac")
            mac = parse_mac_address(mac_text, where) if mac_text is not None else None
            name = elem.get("name")
            if mac is None and name is None:
                raise fail(where, f"DHCP host {addr} needs a mac or a name")
            if name is not None and not name.replace("-", "").replace(".", "").isalnum():
                raise fail(where, f"DHCP host name {name!r} must be a host name")
            hosts.append(DhcpHost(mac, addr, name))
    return ranges, hosts


def parse_network(data: str | bytes, *, source: str = "") -> NetworkDef:
    """Parse and validate a network document (libvirt's schema, then ours)."""
    root = parse_xml(data, source=source)
    where = source
    if local_name(root) != "network":
        raise fail(where, f"root element must be <network>, not <{local_name(root)}>")
    name_elem = _child(root, "name")
    if name_elem is None:
        raise fail(where, "<network> needs a <name>")
    name = (name_elem.text or "").strip()
    try:
        check_object_name(name, "network name")
    except ValidationError as exc:
        raise fail(where, exc.message) from None
    validate_network(root, where)
    uuid_elem = _child(root, "uuid")
    if uuid_elem is None:
        uuid = uuidlib.uuid4()
        uuid_elem = etree.Element("uuid")
        root.insert(list(root).index(name_elem) + 1, uuid_elem)
        uuid_elem.text = str(uuid)
    else:
        try:
            uuid = parse_uuid_text(uuid_elem.text or "")
        except ValidationError as exc:
            raise fail(where, exc.message) from None
    forward_elem = _child(root, "forward")
    forward = None if forward_elem is None else forward_elem.get("mode", "nat")
    bridge_elem = _child(root, "bridge")
    bridge = None if bridge_elem is None else bridge_elem.get("name")
    if bridge is not None:
        try:
            check_ifname(bridge)
        except ValidationError as exc:
            raise fail(where, f"bridge: {exc.message}") from None
    if forward == "bridge" and bridge is None:
        raise fail(where, "a bridge-mode network needs <bridge name=...>")
    address: ipaddress.IPv4Interface | None = None
    ranges: list[DhcpRange] = []
    hosts: list[DhcpHost] = []
    for ip in root:
        if not isinstance(ip.tag, str) or local_name(ip) != "ip":
            continue
        if ip.get("family", "ipv4") != "ipv4" or ":" in ip.get("address", ""):
            continue  # IPv6 <ip> is kept in the document, not served here
        if address is not None:
            raise fail(where, "only one IPv4 <ip> is supported")
        address = _address(ip, where)
        ranges, hosts = _dhcp(ip, address.network, where)
    if forward == "bridge" and address is not None:
        raise fail(where, "a bridge-mode network takes no <ip>")
    return NetworkDef(name, uuid, forward, bridge, address, tuple(ranges), tuple(hosts),
                      document=serialize(root))


def network_element(net: NetworkDef) -> etree._Element:
    """The network's document with its managed values (bridge name) written in."""
    root = parse_xml(net.document)
    if net.bridge is not None:
        elem = _child(root, "bridge")
        if elem is None:
            elem = etree.Element("bridge")
            anchors = [_child(root, t) for t in ("forward", "uuid", "name")]
            anchor = next((a for a in anchors if a is not None), None)
            position = list(root).index(anchor) + 1 if anchor is not None else 0
            root.insert(position, elem)
        elem.set("name", net.bridge)
    return root


def format_network(net: NetworkDef) -> str:
    """The network document, every element kept; checked to parse again."""
    return serialize_checked(network_element(net), parse_network, f"network {net.name!r}")


#: libvirt's stock network, as its Debian package installs it
DEFAULT_NETWORK = """<network>
  <name>default</name>
  <bridge name='virbr0'/>
  <forward/>
  <ip address='192.168.122.1' netmask='255.255.255.0'>
    <dhcp>
      <range start='192.168.122.2' end='192.168.122.254'/>
    </dhcp>
  </ip>
</network>
"""
