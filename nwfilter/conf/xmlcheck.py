"""Structure checks shared by the document parsers (filters, bindings, domains).

Each check raises `ValidationError` with the document position first
(`where`, e.g. "my.xml: rule 3") and the reason after it, so every parser
words the same mistake the same way.
"""

from __future__ import annotations

from collections.abc import Iterable

from lxml import etree

from nwfilter.conf.safexml import local_name
from nwfilter.errors import ValidationError


def fail(where: str, message: str) -> ValidationError:
    """The error for `message` at position `where` (which may be empty)."""
    return ValidationError(f"{where}: {message}" if where else message)


def join(where: str, what: str) -> str:
    """A position inside `where`: 'doc.xml' and 'rule 2' → 'doc.xml: rule 2'."""
    return f"{where}: {what}" if where else what


def has_text(elem: etree._Element) -> bool:
    """Whether `elem` holds text other than white space, before or between children."""
    if elem.text is not None and elem.text.strip():
        return True
    return any(child.tail is not None and child.tail.strip() for child in elem)


def check_no_text(elem: etree._Element, where: str) -> None:
    """Refuse text directly inside `elem` (children may hold their own)."""
    if has_text(elem):
        raise fail(where, f"<{local_name(elem)}> must not contain text")


def check_attrs(elem: etree._Element, allowed: Iterable[str], where: str) -> None:
    """Refuse attributes not in `allowed`."""
    allowed_set = frozenset(allowed)
    for name in elem.attrib:
        if name not in allowed_set:
            raise fail(where, f"<{local_name(elem)}> has unknown attribute {name!r}")


def check_empty(elem: etree._Element, where: str) -> None:
    """Refuse children and text inside `elem`."""
    if len(elem) or has_text(elem):
        raise fail(where, f"<{local_name(elem)}> must be empty")


def required_attr(elem: etree._Element, name: str, where: str) -> str:
    """The value of attribute `name`, which must be present."""
    value = elem.get(name)
    if value is None:
        article = "an" if name[:1] in ("a", "e", "i", "o", "u") else "a"
        raise fail(where, f"<{local_name(elem)}> needs {article} {name} attribute")
    return value


def lone_attr(elem: etree._Element, name: str, where: str) -> str:
    """The value of attribute `name` of an empty element that has no other."""
    check_attrs(elem, (name,), where)
    check_empty(elem, where)
    return required_attr(elem, name, where)


def text_only(elem: etree._Element, where: str, attrs: Iterable[str] = ()) -> str:
    """The stripped text of an element that holds only text (and `attrs`)."""
    check_attrs(elem, attrs, where)
    if len(elem):
        raise fail(where, f"<{local_name(elem)}> must hold only text")
    return (elem.text or "").strip()
