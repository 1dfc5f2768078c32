"""Hardened XML parsing for every document the engine reads.

No DTDs, no entities (neither expansion nor declarations), no network, no
huge-tree mode, UTF-8 only, and hard limits on size, depth, attribute count
and attribute length.  Hostile input fails fast with `XMLError`.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass

from lxml import etree

from nwfilter.conf.limits import MAX_DOCUMENT_BYTES
from nwfilter.errors import NwfilterError, ValidationError, XMLError


@dataclass(frozen=True)
class Limits:
    max_bytes: int = MAX_DOCUMENT_BYTES
    max_depth: int = 32
    max_elements: int = 50_000
    max_attributes: int = 64
    max_attribute_length: int = 4096
    max_text_length: int = 4096


DEFAULT_LIMITS = Limits()

_DECL_ENCODING = re.compile(rb"""\A<\?xml[^>]*?encoding\s*=\s*["']([A-Za-z0-9._-]+)["']""")


def _where(source: str) -> str:
    return f"{source}: " if source else ""


def parse_xml(
    data: str | bytes, *, source: str = "", limits: Limits = DEFAULT_LIMITS
) -> etree._Element:
    """Parse a document and return its root element, or raise XMLError."""
    where = _where(source)
    if isinstance(data, str):
        try:
            raw = data.encode("utf-8")
        except UnicodeEncodeError:
            raise XMLError(f"{where}document is not valid Unicode") from None
    elif isinstance(data, bytes | bytearray | memoryview):
        raw = bytes(data)
    else:
        raise XMLError(f"{where}document must be text or bytes")
    if len(raw) > limits.max_bytes:
        raise XMLError(f"{where}document is larger than {limits.max_bytes} bytes")
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError:
        raise XMLError(f"{where}document is not valid UTF-8") from None
    declared = _DECL_ENCODING.match(raw)
    if declared and declared.group(1).lower() not in (b"utf-8", b"utf8", b"us-ascii", b"ascii"):
        raise XMLError(f"{where}only UTF-8 documents are accepted")
    # Refuse DTDs and entity declarations before libxml2 sees them: nothing
    # we read needs them, and they are the vehicle of every entity attack.
    if b"<!DOCTYPE" in raw or b"<!ENTITY" in raw:
        raise XMLError(f"{where}DOCTYPE and ENTITY declarations are not allowed")
    parser = etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        load_dtd=False,
        dtd_validation=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
        strip_cdata=True,
        collect_ids=False,
    )
    try:
        root = etree.fromstring(raw, parser)
    except etree.XMLSyntaxError as exc:
        raise XMLError(f"{where}not well-formed XML: {exc}") from None
    except (ValueError, etree.LxmlError) as exc:
        raise XMLError(f"{where}cannot parse XML: {exc}") from None
    if root is None:
        raise XMLError(f"{where}empty document")
    _check_limits(root, where, limits)
    return root


def _check_limits(root: etree._Element, where: str, limits: Limits) -> None:
    count = 0
    stack: list[tuple[etree._Element, int]] = [(root, 1)]
    while stack:
        elem, depth = stack.pop()
        count += 1
        if count > limits.max_elements:
            raise XMLError(f"{where}document has more than {limits.max_elements} elements")
        if depth > limits.max_depth:
            raise XMLError(f"{where}document is nested deeper than {limits.max_depth} levels")
        if not isinstance(elem.tag, str):
            # entity references survive as nodes when not resolved
            raise XMLError(f"{where}entity references are not allowed")
        attrib = elem.attrib
        if len(attrib) > limits.max_attributes:
            raise XMLError(f"{where}<{elem.tag}> has more than {limits.max_attributes} attributes")
        for name, value in attrib.items():
            if len(value) > limits.max_attribute_length:
                raise XMLError(
                    f"{where}<{elem.tag}> attribute {name!r} is longer than "
                    f"{limits.max_attribute_length} characters"
                )
        for text in (elem.text, elem.tail):
            if text is not None and len(text) > limits.max_text_length:
                raise XMLError(
                    f"{where}<{elem.tag}> holds text longer than {limits.max_text_length}"
                )
        stack.extend((child, depth + 1) for child in elem)


def local_name(elem: etree._Element) -> str:
    """The element name; namespaced elements keep their '{ns}' so they never match."""
    tag = elem.tag
    return tag if isinstance(tag, str) else ""


_ESCAPES = {
    "&": "&amp;",
    "<": "&lt;",
    ">": "&gt;",
    "'": "&apos;",
    '"': "&quot;",
    "\t": "&#9;",
    "\n": "&#10;",
    "\r": "&#13;",
}


def _escape(text: str) -> str:
    return "".join(_ESCAPES.get(ch, ch) for ch in text)


def serialize(root: etree._Element) -> str:
    """Pretty-printed text of an element tree the way libvirt prints it:
    two-space indentation and single-quoted attributes (lxml can only write
    double quotes, and `virsh nwfilter-dumpxml` users diff against libvirt's
    form).  Every character that could end a value is escaped, so the output
    always parses back to the same tree."""
    out: list[str] = []
    _serialize(root, 0, out)
    return "".join(out)


def serialize_checked(elem: etree._Element, parse: Callable[[str], object], what: str) -> str:
    """`serialize(elem)`, checked to parse again with `parse`, so a hand-built
    model with a bad value raises ValidationError naming `what` instead of
    printing a document the engine would refuse to read back."""
    text = serialize(elem)
    try:
        parse(text)
    except NwfilterError as exc:
        raise ValidationError(f"{what} cannot be printed: {exc.message}") from None
    return text


def _qname(name: str, nsmap: dict[str | None, str], *, attribute: bool) -> str:
    """`{uri}local` written with the prefix `nsmap` binds to `uri`."""
    if not name.startswith("{"):
        return name
    uri, local = name[1:].split("}", 1)
    for prefix, bound in nsmap.items():
        if bound == uri and (prefix is not None or not attribute):
            return f"{prefix}:{local}" if prefix else local
    raise ValidationError(f"no prefix is bound to namespace {uri!r}")


def _serialize(
    elem: etree._Element, depth: int, out: list[str], parent_ns: dict[str | None, str] | None = None
) -> None:
    pad = "  " * depth
    nsmap: dict[str | None, str] = dict(elem.nsmap)
    inherited = parent_ns or {}
    # Namespace declarations (foreign metadata) are written where they
    # first appear, so such elements print back as they were read.
    decls = "".join(
        f" xmlns:{prefix}='{_escape(uri)}'" if prefix else f" xmlns='{_escape(uri)}'"
        for prefix, uri in sorted(nsmap.items(), key=lambda item: item[0] or "")
        if inherited.get(prefix) != uri
    )
    tag = _qname(str(elem.tag), nsmap, attribute=False)
    attrs = "".join(
        f" {_qname(str(name), nsmap, attribute=True)}='{_escape(str(value))}'"
        for name, value in elem.attrib.items()
    )
    children = [child for child in elem if isinstance(child.tag, str)]
    text = elem.text if elem.text and elem.text.strip() else None
    if children:
        out.append(f"{pad}<{tag}{decls}{attrs}>\n")
        for child in children:
            _serialize(child, depth + 1, out, nsmap)
        out.append(f"{pad}</{tag}>\n")
    elif text is not None:
        out.append(f"{pad}<{tag}{decls}{attrs}>{_escape(text)}</{tag}>\n")
    else:
        out.append(f"{pad}<{tag}{decls}{attrs}/>\n")
