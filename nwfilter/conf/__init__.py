"""The filter language: parse, validate and format libvirt nwfilter XML,
filter bindings and the domain-interface subset we manage.

Public API: `parse_filter`/`format_filter`, `parse_binding`/`format_binding`,
`parse_domain`/`format_domain`, the data model (`nwfilter.conf.model`), the
schema (`nwfilter.conf.schema`) and the typed values (`nwfilter.conf.values`).

The names below are loaded at their first use (PEP 562), not when the
package is imported: importing a light module of the package, such as
`nwfilter.conf.limits`, must not load lxml and the schema tables (the
command line reads its inputs without them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from nwfilter.conf.binding_xml import format_binding, parse_binding
    from nwfilter.conf.domain_xml import format_domain, parse_domain
    from nwfilter.conf.filter_xml import format_filter, parse_filter
    from nwfilter.conf.model import (
        Action,
        AttrValue,
        BindingDef,
        Direction,
        DomainDef,
        Entry,
        FilterDef,
        FilterRef,
        InterfaceDef,
        IPSpec,
        Parameter,
        ProtocolMatch,
        Rule,
        VarRef,
    )
    from nwfilter.conf.values import TcpFlagsValue

__all__ = [
    "Action",
    "AttrValue",
    "BindingDef",
    "Direction",
    "DomainDef",
    "Entry",
    "FilterDef",
    "FilterRef",
    "IPSpec",
    "InterfaceDef",
    "Parameter",
    "ProtocolMatch",
    "Rule",
    "TcpFlagsValue",
    "VarRef",
    "format_binding",
    "format_domain",
    "format_filter",
    "parse_binding",
    "parse_domain",
    "parse_filter",
]

#: the module of the package that defines each public name
_HOMES = {
    **dict.fromkeys(("format_binding", "parse_binding"), "binding_xml"),
    **dict.fromkeys(("format_domain", "parse_domain"), "domain_xml"),
    **dict.fromkeys(("format_filter", "parse_filter"), "filter_xml"),
    **dict.fromkeys(
        ("Action", "AttrValue", "BindingDef", "Direction", "DomainDef", "Entry", "FilterDef",
         "FilterRef", "IPSpec", "InterfaceDef", "Parameter", "ProtocolMatch", "Rule", "VarRef"),
        "model",
    ),
    "TcpFlagsValue": "values",
}


def __getattr__(name: str) -> object:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value: object = getattr(importlib.import_module(f"{__name__}.{home}"), name)
    globals()[name] = value  # found directly from now on
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
