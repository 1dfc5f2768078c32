"""Parse, validate and format the subset of libvirt domain XML we manage.

Accepted::

    <domain type="test|ns|qemu">
      <name>vm1</name>
      <uuid>...</uuid>                      (generated when absent)
      <title>...</title> <description>...</description>   (kept as text)
      <memory unit="MiB">256</memory>       (kept, in KiB)
      <vcpu>2</vcpu>                        (kept)
      <devices>
        <interface type="bridge|network|ethernet">
          <mac address="52:54:00:..."/>
          <source bridge="br0"/>  or  <source network="default"/>
          <ip address="10.0.0.2" prefix="24" family="ipv4"/>   (any number)
          <target dev="vnet0"/>
          <model type="virtio"/>
          <filterref filter="clean-traffic"><parameter .../></filterref>
        </interface>
      </devices>
    </domain>

Anything else is refused with an error naming it rather than dropped.
"""

from __future__ import annotations

import ipaddress
import re
import uuid as uuidlib

from lxml import etree

from nwfilter.conf.binding_xml import parse_mac_address
from nwfilter.conf.filter_xml import filterref_element, parse_filterref_element
from nwfilter.conf.model import DomainDef, FilterRef, InterfaceDef, IPSpec
from nwfilter.conf.safexml import local_name, parse_xml, serialize_checked
from nwfilter.conf.values import (
    check_ifname,
    check_object_name,
    check_port_name,
    format_ipv6,
    parse_ipv4,
    parse_ipv6,
    parse_uint_text,
    parse_uuid_text,
)
from nwfilter.conf.xmlcheck import (
    check_attrs,
    check_empty,
    check_no_text,
    fail,
    join,
    lone_attr,
    required_attr,
    text_only,
)
from nwfilter.errors import ValidationError

DOMAIN_TYPES = ("test", "ns", "qemu")
INTERFACE_TYPES = ("bridge", "network", "ethernet")
_MODEL_RE = re.compile(r"[A-Za-z0-9_-]+\Z")
_EXTRA_TEXT = ("title", "description")
# libvirt's virScaleInteger units; bare number means KiB
_UNITS = {
    "b": 1,
    "bytes": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
    "t": 1024**4,
    "tib": 1024**4,
    "tb": 1000**4,
}


def _uint(text: str, what: str, where: str) -> int:
    try:
        return parse_uint_text(text, allow_hex=False)[0]
    except ValidationError as exc:
        raise fail(where, f"{what} {text!r} {exc.message}") from None


def _parse_ip(elem: etree._Element, where: str) -> IPSpec:
    check_attrs(elem, ("address", "prefix", "family"), where)
    check_empty(elem, where)
    text = required_attr(elem, "address", where)
    family = elem.get("family")
    if family is not None and family not in ("ipv4", "ipv6"):
        raise fail(where, f"<ip family={family!r}> must be ipv4 or ipv6")
    try:
        if ":" in text:
            address = format_ipv6(parse_ipv6(text))
            actual = "ipv6"
        else:
            address = str(parse_ipv4(text))
            actual = "ipv4"
    except ValidationError as exc:
        raise fail(where, f"<ip address={text!r}>: {exc.message}") from None
    if family is not None and family != actual:
        raise fail(where, f"<ip address={text!r}> is not an {family} address")
    prefix: int | None = None
    prefix_text = elem.get("prefix")
    if prefix_text is not None:
        prefix = _uint(prefix_text, "ip prefix", where)
        width = 32 if actual == "ipv4" else 128
        if prefix > width:
            raise fail(where, f"<ip prefix={prefix_text!r}> must be 0-{width}")
    return IPSpec(address=address, prefix=prefix, family=actual)


def _parse_interface(elem: etree._Element, where: str) -> InterfaceDef:
    check_attrs(elem, ("type",), where)
    itype = required_attr(elem, "type", where)
    if itype not in INTERFACE_TYPES:
        raise fail(where, f"interface type {itype!r} is not one of {', '.join(INTERFACE_TYPES)}")
    check_no_text(elem, where)
    mac: str | None = None
    target: str | None = None
    bridge: str | None = None
    network: str | None = None
    model: str | None = None
    filterref: FilterRef | None = None
    ips: list[IPSpec] = []
    seen: set[str] = set()
    for child in elem:
        tag = local_name(child)
        if tag != "ip" and tag in seen:
            raise fail(where, f"<interface> has more than one <{tag}>")
        seen.add(tag)
        if tag == "mac":
            mac = parse_mac_address(lone_attr(child, "address", where), where)
        elif tag == "target":
            target = lone_attr(child, "dev", where)
            try:
                check_port_name(target, "target dev")
            except ValidationError as exc:
                raise fail(where, exc.message) from None
        elif tag == "source":
            if itype == "bridge":
                bridge = lone_attr(child, "bridge", where)
                try:
                    check_ifname(bridge, f"source bridge {bridge!r}")
                except ValidationError as exc:
                    raise fail(where, exc.message) from None
            elif itype == "network":
                network = lone_attr(child, "network", where)
                try:
                    check_object_name(network, "source network")
                except ValidationError as exc:
                    raise fail(where, exc.message) from None
            else:
                raise fail(where, "an ethernet interface takes no <source>")
        elif tag == "model":
            model = lone_attr(child, "type", where)
            if not _MODEL_RE.match(model):
                raise fail(where, f"model type {model!r} must be letters, digits, '_' and '-'")
        elif tag == "filterref":
            filterref = parse_filterref_element(child, where)
        elif tag == "ip":
            ips.append(_parse_ip(child, where))
        else:
            raise fail(where, f"<interface> element <{tag}> is not supported")
    if itype == "bridge" and bridge is None:
        raise fail(where, "a bridge interface needs <source bridge=...>")
    if itype == "network" and network is None:
        raise fail(where, "a network interface needs <source network=...>")
    return InterfaceDef(
        type=itype,
        mac=mac,
        target_dev=target,
        source_bridge=bridge,
        source_network=network,
        filterref=filterref,
        ips=tuple(ips),
        model=model,
    )


def _parse_memory(elem: etree._Element, where: str) -> int:
    text = text_only(elem, where, ("unit",))
    unit = (elem.get("unit") or "KiB").lower()
    if unit not in _UNITS:
        raise fail(where, f"<memory unit={elem.get('unit')!r}> is not a known unit")
    amount = _uint(text, "memory", where) * _UNITS[unit]
    kib = -(-amount // 1024)
    if kib <= 0 or kib > 2**53:
        raise fail(where, "memory must be positive and sane")
    return kib


def parse_domain(data: str | bytes, *, source: str = "") -> DomainDef:
    """Parse and validate a domain document (the subset we manage)."""
    root = parse_xml(data, source=source)
    where = source
    if local_name(root) != "domain":
        raise fail(where, f"root element must be <domain>, not <{local_name(root)}>")
    check_attrs(root, ("type",), where)
    dtype = required_attr(root, "type", where)
    if dtype not in DOMAIN_TYPES:
        raise fail(where, f"domain type {dtype!r} is not one of {', '.join(DOMAIN_TYPES)}")
    check_no_text(root, where)
    name: str | None = None
    uuid: uuidlib.UUID | None = None
    memory: int | None = None
    vcpus: int | None = None
    extra: dict[str, str] = {}
    interfaces: list[InterfaceDef] = []
    seen: set[str] = set()
    for child in root:
        tag = local_name(child)
        if tag in seen:
            raise fail(where, f"<domain> has more than one <{tag}>")
        seen.add(tag)
        if tag == "name":
            name = text_only(child, where)
            try:
                check_object_name(name, "domain name")
            except ValidationError as exc:
                raise fail(where, exc.message) from None
        elif tag == "uuid":
            text = text_only(child, where)
            try:
                uuid = parse_uuid_text(text)
            except ValidationError as exc:
                raise fail(where, exc.message) from None
        elif tag in _EXTRA_TEXT:
            extra[tag] = text_only(child, where)
        elif tag == "memory":
            memory = _parse_memory(child, where)
        elif tag == "vcpu":
            vcpus = _uint(text_only(child, where), "vcpu", where)
            if not 1 <= vcpus <= 4096:
                raise fail(where, "vcpu must be 1-4096")
        elif tag == "devices":
            check_attrs(child, (), where)
            check_no_text(child, where)
            for number, dev in enumerate(child, start=1):
                dtag = local_name(dev)
                if dtag != "interface":
                    raise fail(where, f"device <{dtag}> is not supported")
                interfaces.append(_parse_interface(dev, join(where, f"interface {number}")))
        else:
            raise fail(where, f"<domain> element <{tag}> is not supported")
    if name is None:
        raise fail(where, "<domain> needs a <name>")
    return DomainDef(
        type=dtype,
        name=name,
        uuid=uuid if uuid is not None else uuidlib.uuid4(),
        interfaces=tuple(interfaces),
        memory_kib=memory,
        vcpus=vcpus,
        extra=extra,
    )


def _interface_element(iface: InterfaceDef) -> etree._Element:
    elem = etree.Element("interface")
    elem.set("type", iface.type)
    if iface.mac is not None:
        etree.SubElement(elem, "mac").set("address", iface.mac)
    if iface.source_bridge is not None:
        etree.SubElement(elem, "source").set("bridge", iface.source_bridge)
    elif iface.source_network is not None:
        etree.SubElement(elem, "source").set("network", iface.source_network)
    for ip in iface.ips:
        sub = etree.SubElement(elem, "ip")
        sub.set("address", ip.address)
        sub.set("family", ip.family)
        if ip.prefix is not None:
            sub.set("prefix", str(ip.prefix))
    if iface.target_dev is not None:
        etree.SubElement(elem, "target").set("dev", iface.target_dev)
    if iface.model is not None:
        etree.SubElement(elem, "model").set("type", iface.model)
    if iface.filterref is not None:
        elem.append(filterref_element(iface.filterref))
    return elem


def domain_element(domain: DomainDef) -> etree._Element:
    root = etree.Element("domain")
    root.set("type", domain.type)
    etree.SubElement(root, "name").text = domain.name
    etree.SubElement(root, "uuid").text = str(domain.uuid)
    for tag in _EXTRA_TEXT:
        if tag in domain.extra:
            etree.SubElement(root, tag).text = domain.extra[tag]
    if domain.memory_kib is not None:
        mem = etree.SubElement(root, "memory")
        mem.set("unit", "KiB")
        mem.text = str(domain.memory_kib)
    if domain.vcpus is not None:
        etree.SubElement(root, "vcpu").text = str(domain.vcpus)
    if domain.interfaces:
        devices = etree.SubElement(root, "devices")
        for iface in domain.interfaces:
            devices.append(_interface_element(iface))
    return root


def format_domain(domain: DomainDef) -> str:
    """The canonical domain document; checked to parse again."""
    return serialize_checked(domain_element(domain), parse_domain, f"domain {domain.name!r}")


def ip_network_of(ip: IPSpec) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The network an interface address sits in (its own address if no prefix)."""
    prefix = ip.prefix if ip.prefix is not None else (32 if ip.family == "ipv4" else 128)
    return ipaddress.ip_network(f"{ip.address}/{prefix}", strict=False)
