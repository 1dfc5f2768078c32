"""Parse, validate and format libvirt domain documents.

A document is accepted when libvirt's own domain schema accepts it
(`nwfilter.conf.libvirt_schema`), as `virsh dumpxml` prints it for `kvm`
and `qemu` guests and as virt-install writes it; `ns` documents are checked
as libvirt's `test` type.  What the drivers use is read into `DomainDef`:

    <domain type="test|ns|qemu|kvm">
      <name>, <uuid> (generated when absent), <title>, <description>,
      <memory unit=...>, <vcpu>
      <devices>
        <interface type="...">               (every libvirt interface type)
          <mac address=.../> <source bridge=... | network=.../>
          <ip address=... prefix=... family=.../> <target dev=.../>
          <model type=.../> <filterref filter=...>...</filterref>
        </interface>
      </devices>
    </domain>

Everything else (os, features, cpu, clock, disks, consoles, metadata in
foreign namespaces, an interface's driver, address, mtu, bandwidth, vlan,
...) is kept verbatim in `DomainDef.document` and printed back unchanged;
`format_domain` writes the managed values (UUID, generated MACs) into it.
Which driver uses which element: docs/domains.md.
"""

from __future__ import annotations

import ipaddress
import re
import uuid as uuidlib

from lxml import etree

from nwfilter.conf.binding_xml import parse_mac_address
from nwfilter.conf.filter_xml import filterref_element, parse_filterref_element
from nwfilter.conf.libvirt_schema import validate_domain
from nwfilter.conf.model import DomainDef, FilterRef, InterfaceDef, IPSpec
from nwfilter.conf.safexml import local_name, parse_xml, serialize, serialize_checked
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
    fail,
    join,
    required_attr,
)
from nwfilter.errors import ValidationError

DOMAIN_TYPES = ("test", "ns", "qemu", "kvm")
# Interface types some driver can attach a host port for; the others
# (direct, user, hostdev, vhostuser, ...) are valid documents, refused at start.
ATTACHABLE_TYPES = ("bridge", "network", "ethernet")
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
    """The managed part of an `<interface>` the schema accepted."""
    itype = required_attr(elem, "type", where)
    mac: str | None = None
    target: str | None = None
    bridge: str | None = None
    network: str | None = None
    model: str | None = None
    filterref: FilterRef | None = None
    ips: list[IPSpec] = []
    for child in elem:
        tag = local_name(child)
        if tag == "mac":
            mac = parse_mac_address(required_attr(child, "address", where), where)
        elif tag == "target":
            target = required_attr(child, "dev", where)
            try:
                check_port_name(target, "target dev")
            except ValidationError as exc:
                raise fail(where, exc.message) from None
        elif tag == "source" and itype == "bridge":
            bridge = required_attr(child, "bridge", where)
            try:
                check_ifname(bridge, f"source bridge {bridge!r}")
            except ValidationError as exc:
                raise fail(where, exc.message) from None
        elif tag == "source" and itype == "network":
            network = required_attr(child, "network", where)
            try:
                check_object_name(network, "source network")
            except ValidationError as exc:
                raise fail(where, exc.message) from None
        elif tag == "model":
            model = required_attr(child, "type", where)
            if not _MODEL_RE.match(model):
                raise fail(where, f"model type {model!r} must be letters, digits, '_' and '-'")
        elif tag == "filterref":
            filterref = parse_filterref_element(child, where)
        elif tag == "ip":
            ips.append(_parse_ip(child, where))
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
    text = (elem.text or "").strip()
    unit = (elem.get("unit") or "KiB").lower()
    if unit not in _UNITS:
        raise fail(where, f"<memory unit={elem.get('unit')!r}> is not a known unit")
    amount = _uint(text, "memory", where) * _UNITS[unit]
    kib = -(-amount // 1024)
    if kib <= 0 or kib > 2**53:
        raise fail(where, "memory must be positive and sane")
    return kib


def parse_domain(data: str | bytes, *, source: str = "") -> DomainDef:
    """Parse and validate a domain document (libvirt's schema, then ours)."""
    root = parse_xml(data, source=source)
    where = source
    if local_name(root) != "domain":
        raise fail(where, f"root element must be <domain>, not <{local_name(root)}>")
    dtype = required_attr(root, "type", where)
    if dtype not in DOMAIN_TYPES:
        raise fail(where, f"domain type {dtype!r} is not one of {', '.join(DOMAIN_TYPES)}")
    name: str | None = None
    uuid: uuidlib.UUID | None = None
    memory: int | None = None
    vcpus: int | None = None
    extra: dict[str, str] = {}
    interfaces: list[InterfaceDef] = []
    for child in root:
        tag = local_name(child)
        if tag == "name":
            name = (child.text or "").strip()
            try:
                check_object_name(name, "domain name")
            except ValidationError as exc:
                raise fail(where, exc.message) from None
        elif tag == "uuid":
            try:
                uuid = parse_uuid_text(child.text or "")
            except ValidationError as exc:
                raise fail(where, exc.message) from None
        elif tag in _EXTRA_TEXT:
            extra[tag] = child.text or ""
        elif tag == "memory":
            memory = _parse_memory(child, where)
        elif tag == "vcpu":
            vcpus = _uint((child.text or "").strip(), "vcpu", where)
            if not 1 <= vcpus <= 4096:
                raise fail(where, "vcpu must be 1-4096")
        elif tag == "devices":
            number = 0
            for dev in child:
                if local_name(dev) == "interface":
                    number += 1
                    interfaces.append(_parse_interface(dev, join(where, f"interface {number}")))
    if name is None:
        raise fail(where, "<domain> needs a <name>")
    # After our own checks, which name the managed values more precisely.
    validate_domain(root, where)
    if uuid is None:
        uuid = uuidlib.uuid4()
        _place(root, "uuid", ("name",)).text = str(uuid)
    return DomainDef(
        type=dtype,
        name=name,
        uuid=uuid,
        interfaces=tuple(interfaces),
        memory_kib=memory,
        vcpus=vcpus,
        extra=extra,
        document=serialize(root),
    )


def _child(parent: etree._Element, tag: str) -> etree._Element | None:
    for child in parent:
        if local_name(child) == tag:
            return child
    return None


def _place(parent: etree._Element, tag: str, after: tuple[str, ...]) -> etree._Element:
    """`parent`'s `<tag>`, created after the last of the `after` elements
    present (first if none is), which is where libvirt prints it."""
    found = _child(parent, tag)
    if found is not None:
        return found
    elem = etree.Element(tag)
    position = 0
    for index, child in enumerate(parent):
        if local_name(child) in after:
            position = index + 1
    parent.insert(position, elem)
    return elem


def _merge_interface(elem: etree._Element, iface: InterfaceDef) -> None:
    if iface.mac is not None:
        _place(elem, "mac", ()).set("address", iface.mac)
    if iface.target_dev is not None:
        _place(elem, "target", ("mac", "source", "ip", "route", "script", "backenddomain")).set(
            "dev", iface.target_dev
        )


def _skeleton(domain: DomainDef) -> etree._Element:
    """A document for a definition built without one (tests, tools)."""
    root = etree.Element("domain")
    root.set("type", domain.type)
    etree.SubElement(root, "name").text = domain.name
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
            elem = etree.SubElement(devices, "interface")
            elem.set("type", iface.type)
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
            if iface.model is not None:
                etree.SubElement(elem, "model").set("type", iface.model)
            if iface.filterref is not None:
                elem.append(filterref_element(iface.filterref))
    return root


def domain_element(domain: DomainDef) -> etree._Element:
    """The domain's document with the managed values written into it."""
    root = parse_xml(domain.document) if domain.document else _skeleton(domain)
    root.set("type", domain.type)
    _place(root, "name", ()).text = domain.name
    _place(root, "uuid", ("name",)).text = str(domain.uuid)
    devices = _child(root, "devices")
    elems = [] if devices is None else [c for c in devices if local_name(c) == "interface"]
    if len(elems) != len(domain.interfaces):
        raise ValidationError(
            f"domain {domain.name!r}: its document has {len(elems)} interfaces, "
            f"its definition {len(domain.interfaces)}"
        )
    for elem, iface in zip(elems, domain.interfaces, strict=True):
        _merge_interface(elem, iface)
    return root


def format_domain(domain: DomainDef) -> str:
    """The domain document, every element kept; checked to parse again."""
    return serialize_checked(domain_element(domain), parse_domain, f"domain {domain.name!r}")


def ip_network_of(ip: IPSpec) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """The network an interface address sits in (its own address if no prefix)."""
    prefix = ip.prefix if ip.prefix is not None else (32 if ip.family == "ipv4" else 128)
    return ipaddress.ip_network(f"{ip.address}/{prefix}", strict=False)
