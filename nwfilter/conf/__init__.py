"""The filter language: parse, validate and format libvirt nwfilter XML,
filter bindings and the domain-interface subset we manage.

Public API: `parse_filter`/`format_filter`, `parse_binding`/`format_binding`,
`parse_domain`/`format_domain`, the data model (`nwfilter.conf.model`), the
schema (`nwfilter.conf.schema`) and the typed values (`nwfilter.conf.values`).
"""

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
