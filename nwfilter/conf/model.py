"""The data model of libvirt's filter language, filter bindings and the
domain-interface subset we manage.  Immutable; built by the parsers in
`nwfilter.conf.filter_xml` / `binding_xml` / `domain_xml` and printed back by
their formatters.
"""

from __future__ import annotations

import uuid as uuidlib
from dataclasses import dataclass, field
from enum import Enum


class Action(Enum):
    DROP = "drop"
    REJECT = "reject"
    ACCEPT = "accept"
    RETURN = "return"
    CONTINUE = "continue"


class Direction(Enum):
    IN = "in"  # to the guest
    OUT = "out"  # from the guest
    INOUT = "inout"


@dataclass(frozen=True)
class VarRef:
    """A variable used as an attribute value: `$NAME`, `$NAME[2]`, `$NAME[@1]`."""

    name: str
    index: int | None = None  # $NAME[2]: that element of the list
    iterator: int | None = None  # $NAME[@1]: iterate with iterator id 1

    def __str__(self) -> str:
        if self.index is not None:
            return f"${self.name}[{self.index}]"
        if self.iterator is not None:
            return f"${self.name}[@{self.iterator}]"
        return f"${self.name}"


@dataclass(frozen=True)
class AttrValue:
    """One attribute of a protocol element.

    `value` is either a `VarRef` or the typed literal the attribute's type
    parses to (see `nwfilter.conf.schema`).  `text` is the canonical string
    libvirt prints back for it.
    """

    name: str
    value: object
    text: str

    @property
    def is_variable(self) -> bool:
        return isinstance(self.value, VarRef)


@dataclass(frozen=True)
class ProtocolMatch:
    """A protocol element of a rule, e.g. `<tcp dstportstart='22'/>`.

    `negate` is `match='no'`: in libvirt it negates each attribute on its own
    (the rule matches when none of the attributes match).
    """

    protocol: str  # element name: 'mac', 'tcp', 'icmpv6', 'all-ipv6', ...
    attrs: tuple[AttrValue, ...] = ()  # in libvirt's canonical order
    negate: bool = False

    def get(self, name: str) -> AttrValue | None:
        for attr in self.attrs:
            if attr.name == name:
                return attr
        return None


@dataclass(frozen=True)
class Rule:
    action: Action
    direction: Direction
    priority: int = 500
    statematch: bool = True
    match: ProtocolMatch | None = None  # None: a rule with no protocol element


@dataclass(frozen=True)
class Parameter:
    name: str
    value: str


@dataclass(frozen=True)
class FilterRef:
    """`<filterref filter='x'>` with its `<parameter>`s in document order.

    A name given several times forms a list, as in libvirt.
    """

    filter: str
    params: tuple[Parameter, ...] = ()

    def param_dict(self) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for param in self.params:
            out.setdefault(param.name, []).append(param.value)
        return out


Entry = Rule | FilterRef


@dataclass(frozen=True)
class FilterDef:
    name: str
    uuid: uuidlib.UUID
    chain: str | None = None  # None: libvirt's default ('root')
    priority: int | None = None  # None: the chain's default priority
    entries: tuple[Entry, ...] = ()

    @property
    def rules(self) -> tuple[Rule, ...]:
        return tuple(e for e in self.entries if isinstance(e, Rule))

    @property
    def refs(self) -> tuple[FilterRef, ...]:
        return tuple(e for e in self.entries if isinstance(e, FilterRef))

    def referenced_names(self) -> frozenset[str]:
        return frozenset(ref.filter for ref in self.refs)


@dataclass(frozen=True)
class BindingDef:
    """libvirt's `<filterbinding>`: one port bound to one filter."""

    owner_name: str
    owner_uuid: uuidlib.UUID
    portdev: str
    mac: str  # lower-case colon form
    filterref: FilterRef
    linkdev: str | None = None


@dataclass(frozen=True)
class IPSpec:
    """`<ip address='...' prefix='...'/>` of a domain interface."""

    address: str
    prefix: int | None = None
    family: str = "ipv4"


@dataclass(frozen=True)
class InterfaceDef:
    """The part of a domain's `<interface>` we manage."""

    type: str = "bridge"  # any libvirt type; drivers attach bridge, network, ethernet
    mac: str | None = None  # None: generated when the domain is defined
    target_dev: str | None = None
    source_bridge: str | None = None
    source_network: str | None = None  # `<source network=...>` of type 'network'
    filterref: FilterRef | None = None
    ips: tuple[IPSpec, ...] = ()
    model: str | None = None


@dataclass(frozen=True)
class DomainDef:
    """The subset of libvirt domain XML we manage."""

    type: str  # driver: 'test', 'ns', 'qemu'
    name: str
    uuid: uuidlib.UUID
    interfaces: tuple[InterfaceDef, ...] = ()
    memory_kib: int | None = None
    vcpus: int | None = None
    extra: dict[str, str] = field(default_factory=dict, compare=False, hash=False)
    # The whole document as read (libvirt's elements the drivers do not
    # use included), printed back with the managed values written in; ''
    # for a definition built in code.
    document: str = field(default="", hash=False)
