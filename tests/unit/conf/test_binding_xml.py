"""`<filterbinding>` documents."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from nwfilter.conf import BindingDef, FilterRef, Parameter, format_binding, parse_binding
from nwfilter.errors import NwfilterError, ValidationError

UUID = "0a1b2c3d-0000-4000-8000-000000000001"
GOOD = f"""<filterbinding>
  <owner><name>vm1</name><uuid>{UUID}</uuid></owner>
  <portdev name='vnet0'/>
  <linkdev name='eth0'/>
  <mac address='52:54:00:AA:bb:01'/>
  <filterref filter='clean-traffic'>
    <parameter name='IP' value='10.0.0.2'/>
    <parameter name='CTRL_IP_LEARNING' value='none'/>
  </filterref>
</filterbinding>"""

CANONICAL = f"""<filterbinding>
  <owner>
    <name>vm1</name>
    <uuid>{UUID}</uuid>
  </owner>
  <portdev name='vnet0'/>
  <linkdev name='eth0'/>
  <mac address='52:54:00:aa:bb:01'/>
  <filterref filter='clean-traffic'>
    <parameter name='CTRL_IP_LEARNING' value='none'/>
    <parameter name='IP' value='10.0.0.2'/>
  </filterref>
</filterbinding>
"""


def test_parse_and_format() -> None:
    b = parse_binding(GOOD)
    assert b == BindingDef(
        owner_name="vm1",
        owner_uuid=uuid.UUID(UUID),
        portdev="vnet0",
        mac="52:54:00:aa:bb:01",
        filterref=FilterRef(
            "clean-traffic", (Parameter("CTRL_IP_LEARNING", "none"), Parameter("IP", "10.0.0.2"))
        ),
        linkdev="eth0",
    )
    assert format_binding(b) == CANONICAL
    assert parse_binding(CANONICAL) == b


def test_linkdev_optional() -> None:
    b = parse_binding(GOOD.replace("<linkdev name='eth0'/>", ""))
    assert b.linkdev is None
    assert "linkdev" not in format_binding(b)


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("<portdev name='vnet0'/>", "", "needs <portdev>"),
        ("<portdev name='vnet0'/>", "<portdev name='vnet0123456789012'/>", "longer than 15"),
        ("<portdev name='vnet0'/>", "<portdev name='../x'/>", "portdev"),
        ("<linkdev name='eth0'/>", "<linkdev name='a b'/>", "linkdev"),
        ("52:54:00:AA:bb:01", "01:00:5e:00:00:01", "unicast"),
        ("52:54:00:AA:bb:01", "52:54:00:aa:bb", "mac address"),
        (f"<uuid>{UUID}</uuid>", "<uuid>x</uuid>", "uuid"),
        ("<name>vm1</name>", "<name>a/b</name>", "owner name"),
        ("<name>vm1</name>", "", "needs <name>"),
        ("filter='clean-traffic'", "filter=''", "filter name"),
        ("value='10.0.0.2'", "value='10.0.0.0/8'", "parameter value"),
        ("<filterbinding>", "<filterbinding x='1'>", "attributes"),
        ("<mac address", "<target dev='x'/><mac address", "<target>"),
        ("<portdev name='vnet0'/>", "<portdev name='vnet0'/><portdev name='vnet1'/>", "more than"),
        ("<portdev name='vnet0'/>", "<portdev name='vnet0'/>text", "must not contain text"),
        ("</name><uuid>", "</name>text<uuid>", "<owner> holds only"),
        ("<mac address='52:54:00:AA:bb:01'/>", "<mac/>", "needs an address attribute"),
        ("<portdev name='vnet0'/>", "<portdev name='vnet0'>x</portdev>", "must be empty"),
    ],
)
def test_refused(old: str, new: str, reason: str) -> None:
    assert old in GOOD
    with pytest.raises(ValidationError) as info:
        parse_binding(GOOD.replace(old, new))
    assert reason in str(info.value)


def test_format_refuses_broken_model() -> None:
    bad = dataclasses.replace(parse_binding(GOOD), portdev="a/b")
    with pytest.raises(ValidationError, match="binding of port 'a/b' cannot be printed"):
        format_binding(bad)


def test_wrong_root() -> None:
    with pytest.raises(NwfilterError):
        parse_binding("<filter name='x'/>")
