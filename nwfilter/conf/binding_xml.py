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
from nwfilter.conf.safexml import local_name, parse_xml, serialize_checked
from nwfilter.conf.values import (
    check_ifname,
    check_object_name,
    check_port_name,
    parse_unicast_mac,
    parse_uuid_text,
)
from nwfilter.conf.xmlcheck import check_no_text, fail, has_text, join, lone_attr, text_only
from nwfilter.errors import ValidationError


def parse_mac_address(text: str, where: str, what: str = "mac address") -> str:
    """A unicast MAC in any case; returned lower-case colon form."""
    try:
        return parse_unicast_mac(text)
    except ValidationError as exc:
        raise fail(where, f"{what} {text!r}: {exc.message}") from None


def parse_binding(data: str | bytes, *, source: str = "") -> BindingDef:
    """Parse and validate a `<filterbinding>` document."""
    root = parse_xml(data, source=source)
    where = source
    if local_name(root) != "filterbinding":
        raise fail(where, f"root element must be <filterbinding>, not <{local_name(root)}>")
    if root.attrib:
        raise fail(where, "<filterbinding> takes no attributes")
    check_no_text(root, where)
    seen: dict[str, etree._Element] = {}
    for child in root:
        tag = local_name(child)
        if tag not in ("owner", "portdev", "linkdev", "mac", "filterref"):
            raise fail(where, f"<filterbinding> may not contain <{tag}>")
        if tag in seen:
            raise fail(where, f"<filterbinding> has more than one <{tag}>")
        seen[tag] = child
    for tag in ("owner", "portdev", "mac", "filterref"):
        if tag not in seen:
            raise fail(where, f"<filterbinding> needs <{tag}>")

    owner = seen["owner"]
    if owner.attrib or has_text(owner):
        raise fail(where, "<owner> holds only <name> and <uuid>")
    owner_parts: dict[str, str] = {}
    for child in owner:
        tag = local_name(child)
        if tag not in ("name", "uuid") or tag in owner_parts:
            raise fail(where, f"<owner> holds one <name> and one <uuid>, not <{tag}>")
        owner_parts[tag] = text_only(child, where)
    if "name" not in owner_parts or "uuid" not in owner_parts:
        raise fail(where, "<owner> needs <name> and <uuid>")
    owner_name = owner_parts["name"]
    try:
        check_object_name(owner_name, "owner name")
        owner_uuid = parse_uuid_text(owner_parts["uuid"])
    except ValidationError as exc:
        raise fail(where, exc.message) from None

    portdev = lone_attr(seen["portdev"], "name", where)
    linkdev = lone_attr(seen["linkdev"], "name", where) if "linkdev" in seen else None
    try:
        check_port_name(portdev, "portdev name")
        if linkdev is not None:
            check_ifname(linkdev, f"linkdev name {linkdev!r}")
    except ValidationError as exc:
        raise fail(where, exc.message) from None

    mac = parse_mac_address(lone_attr(seen["mac"], "address", where), where)

    filterref: FilterRef = parse_filterref_element(seen["filterref"], join(where, "filterref"))
    return BindingDef(
        owner_name=owner_name,
        owner_uuid=owner_uuid,
        portdev=portdev,
        mac=mac,
        filterref=filterref,
        linkdev=linkdev,
    )


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
    return serialize_checked(
        binding_element(binding), parse_binding, f"binding of port {binding.portdev!r}"
    )
