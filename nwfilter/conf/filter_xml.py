"""Parse, validate and format libvirt `<filter>` documents.

`parse_filter` turns a document into a `FilterDef` whose every literal is
typed and checked, in libvirt's canonical form (defaults filled in,
attributes in canonical order, parameters sorted by name), so that
`format_filter` prints libvirt's canonical document and
`parse_filter(format_filter(f)) == f`.  One rejected document gives one line
naming where (rule position, element, attribute, value) and why.

`<filterref>` elements are shared with bindings and domains, so their parser
and formatter live here too.
"""

from __future__ import annotations

import uuid as uuidlib

from lxml import etree

from nwfilter.conf import schema
from nwfilter.conf.model import (
    Action,
    AttrValue,
    Direction,
    Entry,
    FilterDef,
    FilterRef,
    Parameter,
    ProtocolMatch,
    Rule,
    VarRef,
)
from nwfilter.conf.safexml import local_name, parse_xml, serialize_checked
from nwfilter.conf.values import (
    check_object_name,
    check_variable_name,
    check_variable_value,
    is_variable_text,
    parse_int_text,
    parse_uuid_text,
    parse_varref,
)
from nwfilter.conf.xmlcheck import (
    check_attrs,
    check_empty,
    check_no_text,
    fail,
    join,
    required_attr,
    text_only,
)
from nwfilter.errors import ValidationError

_ACTIONS = {a.value: a for a in Action}
_DIRECTIONS = {d.value: d for d in Direction}
_RULE_ATTRS = frozenset({"action", "direction", "priority", "statematch"})
_FILTER_ATTRS = frozenset({"name", "chain", "priority"})


def _quote(value: str) -> str:
    return "'" + value.replace("'", "&apos;") + "'"


# --- filterref -----------------------------------------------------------------


def parse_filterref_element(elem: etree._Element, where: str) -> FilterRef:
    """A `<filterref filter='x'><parameter name value/>...</filterref>`."""
    check_attrs(elem, ("filter",), where)
    check_no_text(elem, where)
    name = required_attr(elem, "filter", where)
    try:
        check_object_name(name, "filter name")
    except ValidationError as exc:
        raise fail(where, f"<filterref filter={_quote(name)}>: {exc.message}") from None
    params: list[Parameter] = []
    for child in elem:
        if local_name(child) != "parameter":
            raise fail(where, f"<filterref> may hold only <parameter>, not <{local_name(child)}>")
        check_attrs(child, ("name", "value"), where)
        check_empty(child, where)
        pname = child.get("name")
        pvalue = child.get("value")
        if pname is None or pvalue is None:
            raise fail(where, "<parameter> needs name and value attributes")
        try:
            check_variable_name(pname)
            check_variable_value(pvalue)
        except ValidationError as exc:
            raise fail(
                where, f"<parameter name={_quote(pname)} value={_quote(pvalue)}>: {exc.message}"
            ) from None
        params.append(Parameter(pname, pvalue))
    # libvirt keeps parameters in a hash and prints them sorted by name;
    # values of one name keep their order (they form a list)
    params.sort(key=lambda p: p.name)
    return FilterRef(name, tuple(params))


def filterref_element(ref: FilterRef) -> etree._Element:
    elem = etree.Element("filterref")
    elem.set("filter", ref.filter)
    for param in sorted(ref.params, key=lambda p: p.name):
        sub = etree.SubElement(elem, "parameter")
        sub.set("name", param.name)
        sub.set("value", param.value)
    return elem


# --- rules ---------------------------------------------------------------------


def _describe(protocol: str, name: str, text: str) -> str:
    shown = text if len(text) <= 60 else text[:57] + "..."
    return f"<{protocol} {name}={_quote(shown)}>"


def _parse_attr(
    spec: schema.AttrSpec, protocol: str, text: str, where: str, negate: bool
) -> AttrValue:
    if spec.variable_ok and is_variable_text(text):
        try:
            ref = parse_varref(text)
        except ValidationError as exc:
            raise fail(where + " " + _describe(protocol, spec.name, text), exc.message) from None
        return AttrValue(spec.name, ref, str(ref), negate)
    try:
        value, canonical = spec.type.parse_literal(text)
    except ValidationError as exc:
        raise fail(where + " " + _describe(protocol, spec.name, text), exc.message) from None
    return AttrValue(spec.name, value, canonical, negate)


def _orderable(value: object) -> bool:
    import ipaddress

    return (isinstance(value, int) and not isinstance(value, bool)) or isinstance(
        value, ipaddress.IPv4Address | ipaddress.IPv6Address
    )


def _is_range_end(name: str) -> bool:
    return name.endswith(("end", "-hi", "ipto"))


def _parse_element(
    elem: etree._Element,
    where: str,
    values: dict[str, AttrValue],
    raw: dict[str, str],
) -> None:
    """Add the attributes of one protocol element to `values` (and their
    texts to `raw`); an attribute already given by an earlier element of the
    rule is refused, as its meaning would depend on the order."""
    protocol = local_name(elem)
    specs = schema.PROTOCOLS[protocol]
    check_empty(elem, where)
    index = schema.ATTR_ORDER[protocol]
    match_text = elem.get("match")
    if match_text is not None and match_text not in ("yes", "no"):
        raise fail(where + " " + _describe(protocol, "match", match_text),
                   "match must be yes or no")
    negate = match_text == "no"
    for raw_name, raw_text in elem.attrib.items():
        name, text = str(raw_name), str(raw_text)
        if name == "match":
            continue
        if name not in index:
            raise fail(where, f"<{protocol}> has no attribute {name!r}")
        if name in values:
            raise fail(
                where + " " + _describe(protocol, name, text),
                f"{name} is also given in an earlier <{protocol}> element of this rule",
            )
        values[name] = _parse_attr(specs[index[name]], protocol, text, where, negate)
        raw[name] = text


def _parse_match(elems: list[etree._Element], where: str, action: Action) -> ProtocolMatch:
    """The protocol elements of one rule: one protocol, any number of
    elements (libvirt prints one per run of attributes with equal `match`)."""
    protocols = list(dict.fromkeys(local_name(e) for e in elems))
    for protocol in protocols:
        if protocol not in schema.PROTOCOLS:
            raise fail(where, f"unknown protocol element <{protocol}>")
    if len(protocols) > 1:
        raise fail(
            where,
            "a rule's protocol elements must all be of one protocol, found "
            + ", ".join(f"<{p}>" for p in protocols),
        )
    protocol = protocols[0]
    specs = schema.PROTOCOLS[protocol]
    index = schema.ATTR_ORDER[protocol]
    values: dict[str, AttrValue] = {}
    raw: dict[str, str] = {}
    for elem in elems:
        _parse_element(elem, where, values, raw)

    for spec in specs:
        attr = values.get(spec.name)
        if attr is None or spec.requires is None:
            continue
        base = values.get(spec.requires)
        if base is None:
            raise fail(
                where + " " + _describe(protocol, spec.name, raw[spec.name]),
                f"{spec.name} needs {spec.requires}",
            )
        if attr.negate != base.negate:
            # libvirt copies the base's sign to its partner; a document with
            # two different signs says two things at once.
            raise fail(
                where + " " + _describe(protocol, spec.name, raw[spec.name]),
                f"{spec.name} must have the same match as {spec.requires}"
                " (write them in one element)",
            )
        if (
            _is_range_end(spec.name)
            and _orderable(attr.value)
            and _orderable(base.value)
            and type(attr.value) is type(base.value)
            and attr.value < base.value  # type: ignore[operator]
        ):
            raise fail(
                where + " " + _describe(protocol, spec.name, raw[spec.name]),
                f"{spec.name} must not be below {spec.requires} ({raw[spec.requires]})",
            )

    if protocol in ("ip", "ipv6") and any(p in values for p in (s.name for s in schema._PORTS)):
        proto = values.get("protocol")
        if proto is None or proto.is_variable or proto.value not in schema.PORT_PROTOCOLS:
            raise fail(
                where + f" <{protocol}>",
                "a port match needs protocol tcp(6), udp(17), dccp(33) or sctp(132)"
                " given as a literal",
            )

    if (
        protocol in schema.IPSET_DEFAULT_FLAGS_PROTOCOLS
        and "ipset" in values
        and "ipsetflags" not in values
    ):
        # libvirt completes a lone ipset with ipsetflags='src' and prints it
        values["ipsetflags"] = AttrValue("ipsetflags", ("src",), "src", values["ipset"].negate)

    if action is Action.CONTINUE and not schema.is_ethernet_protocol(protocol):
        raise fail(
            where + f" <{protocol}>",
            "action 'continue' is only meaningful for layer-2 protocols"
            " (mac, vlan, stp, arp, rarp, ip, ipv6); libvirt cannot apply it on"
            " iptables-level rules",
        )

    attrs = tuple(sorted(values.values(), key=lambda a: index[a.name]))
    return ProtocolMatch(protocol, attrs)


def _parse_priority(text: str, label: str, where: str) -> int:
    """A rule's or a filter's priority: a decimal integer in libvirt's range."""
    try:
        priority = parse_int_text(text)
    except ValidationError:
        raise fail(where, f"{label} must be a decimal integer") from None
    if not schema.MIN_PRIORITY <= priority <= schema.MAX_PRIORITY:
        raise fail(where, f"{label} must be {schema.MIN_PRIORITY}..{schema.MAX_PRIORITY}")
    return priority


def _parse_rule(elem: etree._Element, where: str) -> Rule:
    check_attrs(elem, _RULE_ATTRS, where)
    check_no_text(elem, where)
    action_text = required_attr(elem, "action", where)
    action = _ACTIONS.get(action_text)
    if action is None:
        raise fail(
            where, f"unknown action {_quote(action_text)} (drop, accept, reject, return, continue)"
        )
    direction_text = required_attr(elem, "direction", where)
    direction = _DIRECTIONS.get(direction_text)
    if direction is None:
        raise fail(where, f"unknown direction {_quote(direction_text)} (in, out, inout)")
    prio_text = elem.get("priority")
    priority = (
        schema.DEFAULT_RULE_PRIORITY
        if prio_text is None
        else _parse_priority(prio_text, f"priority {_quote(prio_text)}", where)
    )
    statematch = True
    sm_text = elem.get("statematch")
    if sm_text is not None:
        # libvirt takes '0' and any case of 'false' as false and anything
        # else as true; we refuse the forms whose meaning is a surprise.
        if sm_text == "0" or sm_text.lower() == "false":
            statematch = False
        elif sm_text == "1" or sm_text.lower() == "true":
            statematch = True
        else:
            raise fail(where, f"statematch {_quote(sm_text)} must be true, false, 1 or 0")
    children = list(elem)
    match = _parse_match(children, where, action) if children else None
    return Rule(action, direction, priority, statematch, match)


def _rule_element(rule: Rule) -> etree._Element:
    elem = etree.Element("rule")
    elem.set("action", rule.action.value)
    elem.set("direction", rule.direction.value)
    elem.set("priority", str(rule.priority))
    if not rule.statematch:
        elem.set("statematch", "false")
    if rule.match is not None:
        protocol = rule.match.protocol
        order = schema.ATTR_ORDER.get(protocol)
        if order is None:
            raise ValidationError(f"unknown protocol element <{protocol}>")
        # libvirt's virNWFilterRuleDefDetailsFormat: attributes in canonical
        # order, a new element wherever the negation changes.
        sub: etree._Element | None = None
        negate = False
        for attr in sorted(rule.match.attrs, key=lambda a: order.get(a.name, len(order))):
            if sub is None or attr.negate != negate:
                sub = etree.SubElement(elem, protocol)
                negate = attr.negate
                if negate:
                    sub.set("match", "no")
            text = str(attr.value) if isinstance(attr.value, VarRef) else attr.text
            sub.set(attr.name, text)
        if sub is None:
            etree.SubElement(elem, protocol)
    return elem


# --- filters -------------------------------------------------------------------


def _parse_filter_root(root: etree._Element, where0: str) -> FilterDef:
    if local_name(root) != "filter":
        raise fail(where0, f"root element must be <filter>, not <{local_name(root)}>")
    check_attrs(root, _FILTER_ATTRS, where0)
    check_no_text(root, where0)
    name = required_attr(root, "name", where0)
    try:
        check_object_name(name, "filter name")
    except ValidationError as exc:
        raise fail(where0, f"<filter name={_quote(name)}>: {exc.message}") from None

    chain_text = root.get("chain")
    chain = chain_text or "root"
    try:
        kind = schema.chain_kind(chain)
    except ValidationError as exc:
        raise fail(where0, f"<filter chain={_quote(chain)}>: {exc.message}") from None

    prio_text = root.get("priority")
    priority = (
        None
        if prio_text is None
        else _parse_priority(prio_text, f"<filter priority={_quote(prio_text)}>:", where0)
    )
    if priority is None or chain_text is None:
        # libvirt checks a priority given without a chain, then drops it: the
        # filter's rules go to the root chain, where a priority means nothing.
        priority = schema.CHAIN_DEFAULT_PRIORITIES[kind]

    uuid: uuidlib.UUID | None = None
    entries: list[Entry] = []
    rule_no = 0
    ref_no = 0
    for child in root:
        tag = local_name(child)
        if tag == "uuid":
            if uuid is not None:
                raise fail(where0, "<filter> has more than one <uuid>")
            text = text_only(child, where0)
            try:
                uuid = parse_uuid_text(text)
            except ValidationError as exc:
                raise fail(where0, exc.message) from None
        elif tag == "rule":
            rule_no += 1
            entries.append(_parse_rule(child, join(where0, f"rule {rule_no}")))
        elif tag == "filterref":
            ref_no += 1
            entries.append(parse_filterref_element(child, join(where0, f"filterref {ref_no}")))
        else:
            raise fail(where0, f"<filter> may not contain <{tag}>")
    return FilterDef(
        name=name,
        uuid=uuid if uuid is not None else uuidlib.uuid4(),
        chain=chain,
        priority=priority,
        entries=tuple(entries),
    )


def parse_filter(data: str | bytes, *, source: str = "") -> FilterDef:
    """Parse and validate a `<filter>` document.

    Raises XMLError (not well-formed, hostile) or ValidationError (wrong
    value or structure), with `source` naming the document in the message.
    """
    root = parse_xml(data, source=source)
    return _parse_filter_root(root, source)


def filter_element(fdef: FilterDef) -> etree._Element:
    root = etree.Element("filter")
    root.set("name", fdef.name)
    root.set("chain", fdef.chain or "root")
    priority = schema.chain_priority(fdef)
    default = schema.CHAIN_DEFAULT_PRIORITIES[schema.chain_kind(fdef.chain or "root")]
    # libvirt prints the priority only when it is not 0, so an explicit 0 on
    # a chain whose default is not 0 comes back as the default; print it.
    if priority != 0 or default != 0:
        root.set("priority", str(priority))
    etree.SubElement(root, "uuid").text = str(fdef.uuid)
    for entry in fdef.entries:
        if isinstance(entry, Rule):
            root.append(_rule_element(entry))
        else:
            root.append(filterref_element(entry))
    return root


def format_filter(fdef: FilterDef) -> str:
    """libvirt's canonical document for a filter.

    The output is checked to parse again, so a hand-built `FilterDef` with a
    bad value raises ValidationError here instead of printing garbage.
    """
    return serialize_checked(filter_element(fdef), parse_filter, f"filter {fdef.name!r}")
