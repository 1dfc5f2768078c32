"""Parse, validate and format libvirt `<filterbinding>` documents.

A binding ties one port (`portdev`, optionally its `linkdev`) of one owner
(a VM: name and uuid) with its MAC address to one filter with parameters::

    <filterbinding>
      <owner><name>vm1</name><uuid>...</uuid></owner>
      <portdev name="vnet0"/>
      <linkdev name="eth0"/>
      <mac address="52:54:00:11:22:33"/>
      <filterref filter="clean-traffic"><parameter name="IP" value="10.0.0.2"/></filterref>
    </filterbinding>
"""

from __future__ import annotations

from lxml import etree

from nwfilter.conf.filter_xml import filterref_element, parse_filterref_element
from nwfilter.conf.model import BindingDef, FilterRef
from nwfilter.conf.safexml import local_name, parse_xml, serialize
from nwfilter.conf.values import (
    MacAddrType,
    check_ifname,
    check_object_name,
    mac_is_multicast,
    parse_uuid_text,
)
from nwfilter.errors import NwfilterError, ValidationError

_MAC = MacAddrType()


def _fail(where: str, message: str) -> ValidationError:
    return ValidationError(f"{where}: {message}" if where else message)


def _only_attrs(elem: etree._Element, allowed: tuple[str, ...], where: str) -> None:
    for name in elem.attrib:
        if name not in allowed:
            raise _fail(where, f"<{local_name(elem)}> has unknown attribute {name!r}")
    if len(elem) or (elem.text is not None and elem.text.strip()):
        raise _fail(where, f"<{local_name(elem)}> must be empty")


def _required_attr(elem: etree._Element, name: str, where: str) -> str:
    value = elem.get(name)
    if value is None:
        raise _fail(where, f"<{local_name(elem)}> needs a {name} attribute")
    return value


def parse_mac_address(text: str, where: str, what: str = "mac address") -> str:
    """A unicast MAC in any case; returned lower-case colon form."""
    try:
        mac = _MAC.parse(text)
    except ValidationError as exc:
        raise _fail(where, f"{what} {text!r}: {exc.message}") from None
    assert isinstance(mac, str)
    if mac_is_multicast(mac):
        raise _fail(where, f"{what} {text!r}: must be a unicast address")
    return mac


def _text_child(elem: etree._Element, where: str) -> str:
    if len(elem) or elem.attrib:
        raise _fail(where, f"<{local_name(elem)}> must hold only text")
    return (elem.text or "").strip()


def parse_binding(data: str | bytes, *, source: str = "") -> BindingDef:
    """Parse and validate a `<filterbinding>` document."""
    root = parse_xml(data, source=source)
    where = source
    if local_name(root) != "filterbinding":
        raise _fail(where, f"root element must be <filterbinding>, not <{local_name(root)}>")
    if root.attrib:
        raise _fail(where, "<filterbinding> takes no attributes")
    if root.text is not None and root.text.strip():
        raise _fail(where, "<filterbinding> must not contain text")
    seen: dict[str, etree._Element] = {}
    for child in root:
        tag = local_name(child)
        if tag not in ("owner", "portdev", "linkdev", "mac", "filterref"):
            raise _fail(where, f"<filterbinding> may not contain <{tag}>")
        if tag in seen:
            raise _fail(where, f"<filterbinding> has more than one <{tag}>")
        if child.tail is not None and child.tail.strip():
            raise _fail(where, "<filterbinding> must not contain text")
        seen[tag] = child
    for tag in ("owner", "portdev", "mac", "filterref"):
        if tag not in seen:
            raise _fail(where, f"<filterbinding> needs <{tag}>")

    owner = seen["owner"]
    if owner.attrib or (owner.text is not None and owner.text.strip()):
        raise _fail(where, "<owner> holds only <name> and <uuid>")
    owner_parts: dict[str, str] = {}
    for child in owner:
        tag = local_name(child)
        if tag not in ("name", "uuid") or tag in owner_parts:
            raise _fail(where, f"<owner> holds one <name> and one <uuid>, not <{tag}>")
        owner_parts[tag] = _text_child(child, where)
    if "name" not in owner_parts or "uuid" not in owner_parts:
        raise _fail(where, "<owner> needs <name> and <uuid>")
    owner_name = owner_parts["name"]
    try:
        check_object_name(owner_name, "owner name")
        owner_uuid = parse_uuid_text(owner_parts["uuid"])
    except ValidationError as exc:
        raise _fail(where, exc.message) from None

    portdev_elem = seen["portdev"]
    _only_attrs(portdev_elem, ("name",), where)
    portdev = _required_attr(portdev_elem, "name", where)
    linkdev: str | None = None
    if "linkdev" in seen:
        _only_attrs(seen["linkdev"], ("name",), where)
        linkdev = _required_attr(seen["linkdev"], "name", where)
    try:
        check_ifname(portdev, f"portdev name {portdev!r}")
        if linkdev is not None:
            check_ifname(linkdev, f"linkdev name {linkdev!r}")
    except ValidationError as exc:
        raise _fail(where, exc.message) from None

    mac_elem = seen["mac"]
    _only_attrs(mac_elem, ("address",), where)
    mac = parse_mac_address(_required_attr(mac_elem, "address", where), where)

    filterref: FilterRef = parse_filterref_element(seen["filterref"], _join(where, "filterref"))
    return BindingDef(
        owner_name=owner_name,
        owner_uuid=owner_uuid,
        portdev=portdev,
        mac=mac,
        filterref=filterref,
        linkdev=linkdev,
    )


def _join(where: str, what: str) -> str:
    return f"{where}: {what}" if where else what


def binding_element(binding: BindingDef) -> etree._Element:
    root = etree.Element("filterbinding")
    owner = etree.SubElement(root, "owner")
    etree.SubElement(owner, "name").text = binding.owner_name
    etree.SubElement(owner, "uuid").text = str(binding.owner_uuid)
    etree.SubElement(root, "portdev").set("name", binding.portdev)
    if binding.linkdev is not None:
        etree.SubElement(root, "linkdev").set("name", binding.linkdev)
    etree.SubElement(root, "mac").set("address", binding.mac)
    root.append(filterref_element(binding.filterref))
    return root


def format_binding(binding: BindingDef) -> str:
    """The canonical `<filterbinding>` document; checked to parse again."""
    text = serialize(binding_element(binding))
    try:
        parse_binding(text)
    except NwfilterError as exc:
        raise ValidationError(
            f"binding of port {binding.portdev!r} cannot be printed: {exc.message}"
        ) from None
    return text
