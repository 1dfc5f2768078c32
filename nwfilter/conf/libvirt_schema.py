"""libvirt's own RELAX NG schemas, for the documents we take from libvirt hosts.

A domain document is valid here when libvirt's `domain.rng` says it is,
a network document when its `network.rng` does:
the schemas come from the Debian package `libvirt0` (the client library,
which starts no daemon), read from `/usr/share/libvirt/schemas` and compiled
once per process on first use.  The directory can be named with
`$NWFILTER_LIBVIRT_SCHEMAS` (tests, other layouts).

libvirt does not know our `ns` driver: such a document is validated as the
same document of libvirt's `test` type.
"""

from __future__ import annotations

import copy
import os
import threading
from pathlib import Path

from lxml import etree

from nwfilter.errors import UnavailableError, ValidationError

DEFAULT_DIR = Path("/usr/share/libvirt/schemas")
PACKAGE = "libvirt0"
# Our driver types libvirt's schema does not list, and the type they are
# checked as.
CHECKED_AS = {"ns": "test"}

_lock = threading.Lock()
_cache: dict[tuple[Path, str], etree.RelaxNG] = {}


def schema_dir() -> Path:
    return Path(os.environ.get("NWFILTER_LIBVIRT_SCHEMAS") or DEFAULT_DIR)


def _schema(name: str) -> etree.RelaxNG:
    directory = schema_dir()
    key = (directory, name)
    with _lock:
        found = _cache.get(key)
        if found is not None:
            return found
        path = directory / name
        if not path.is_file():
            raise UnavailableError(
                f"libvirt's schema '{path}' is missing: install the Debian package "
                f"'{PACKAGE}' (or name the schema directory in $NWFILTER_LIBVIRT_SCHEMAS)"
            )
        try:
            schema = etree.RelaxNG(etree.parse(str(path)))
        except (etree.XMLSyntaxError, etree.RelaxNGParseError, OSError) as exc:
            raise UnavailableError(f"libvirt's schema '{path}' cannot be read: {exc}") from exc
        _cache[key] = schema
        return schema


def validate_domain(root: etree._Element, where: str) -> None:
    """Raise ValidationError naming the element libvirt's domain schema
    refuses: its path, its line and libxml2's complaint."""
    checked = copy.deepcopy(root)
    dtype = checked.get("type", "")
    if dtype in CHECKED_AS:
        checked.set("type", CHECKED_AS[dtype])
    _validate(checked, where, "domain")


def validate_network(root: etree._Element, where: str) -> None:
    """As `validate_domain`, with libvirt's network schema."""
    _validate(copy.deepcopy(root), where, "network")


def _validate(checked: etree._Element, where: str, kind: str) -> None:
    schema = _schema(f"{kind}.rng")
    if schema.validate(checked):
        return
    errors = [(e.path or "", e.message) for e in schema.error_log]
    culprit = _culprit(schema, checked)
    path = checked.getroottree().getpath(culprit)
    tag = etree.QName(culprit).localname
    # libxml2's words for that element if it has any, else its first.
    fitting = [m for p, m in errors if p == path] or [m for _p, m in errors if tag in m]
    message = (fitting or [m for _p, m in errors] or [""])[0]
    line = f" (line {culprit.sourceline})" if culprit.sourceline else ""
    detail = f": {message}" if message else ""
    raise ValidationError(
        f"{where + ': ' if where else ''}<{tag}> at {path}{line} "
        f"is not valid by libvirt's {kind} schema{detail}"
    )


def _culprit(schema: etree.RelaxNG, root: etree._Element) -> etree._Element:
    """The deepest element whose removal makes `root` valid (libxml2 names
    only the enclosing element of an interleave); `root` if none does.
    Runs on the error path only: one validation per child tried."""
    current = root
    while True:
        for index, child in enumerate(list(current)):
            if not isinstance(child.tag, str):
                continue
            current.remove(child)
            fixed = schema.validate(root)
            current.insert(index, child)
            if fixed:
                current = child
                break
        else:
            return current
