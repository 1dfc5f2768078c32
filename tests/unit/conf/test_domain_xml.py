"""Domain documents: libvirt's schema, the managed values, and everything else kept."""

from __future__ import annotations

import dataclasses
import uuid

import pytest

from nwfilter.conf import DomainDef, IPSpec, format_domain, parse_domain
from nwfilter.conf.domain_xml import ip_network_of
from nwfilter.errors import NwfilterError, ValidationError

UUID = "0a1b2c3d-0000-4000-8000-000000000002"
GOOD = f"""<domain type='ns'>
  <name>web1</name>
  <uuid>{UUID}</uuid>
  <title>Web</title>
  <memory unit='MiB'>64</memory>
  <vcpu>2</vcpu>
  <devices>
    <interface type='bridge'>
      <mac address='52:54:00:00:00:01'/>
      <source bridge='br0'/>
      <target dev='vnet0'/>
      <model type='virtio'/>
      <filterref filter='clean-traffic'>
        <parameter name='IP' value='10.0.0.2'/>
      </filterref>
      <ip address='10.0.0.2' prefix='24'/>
      <ip address='FD00::2' family='ipv6' prefix='64'/>
    </interface>
    <interface type='network'>
      <source network='default'/>
    </interface>
    <interface type='ethernet'>
      <target dev='tap1'/>
    </interface>
  </devices>
</domain>"""


def test_parse_and_fixed_point() -> None:
    d = parse_domain(GOOD)
    assert d.type == "ns" and d.name == "web1" and d.uuid == uuid.UUID(UUID)
    assert d.memory_kib == 64 * 1024 and d.vcpus == 2
    assert d.extra == {"title": "Web"}
    first, second, third = d.interfaces
    assert first.mac == "52:54:00:00:00:01"
    assert first.source_bridge == "br0" and first.target_dev == "vnet0"
    assert first.model == "virtio"
    assert first.filterref is not None and first.filterref.param_dict() == {"IP": ["10.0.0.2"]}
    assert first.ips == (IPSpec("10.0.0.2", 24, "ipv4"), IPSpec("fd00::2", 64, "ipv6"))
    assert str(ip_network_of(first.ips[0])) == "10.0.0.0/24"
    assert second.type == "network" and second.source_network == "default"
    assert second.mac is None
    assert third.type == "ethernet" and third.target_dev == "tap1"
    text = format_domain(d)
    again = parse_domain(text)
    assert again == d
    assert format_domain(again) == text


def test_uuid_generated_and_minimal() -> None:
    d = parse_domain("<domain type='test'><name>a</name></domain>")
    assert isinstance(d.uuid, uuid.UUID)
    assert d.interfaces == () and d.memory_kib is None and d.vcpus is None
    assert isinstance(parse_domain(format_domain(d)), DomainDef)


@pytest.mark.parametrize(
    ("unit", "amount", "kib"),
    [(None, "1024", 1024), ("KiB", "1", 1), ("b", "1", 1), ("GiB", "1", 1024**2), ("MB", "1", 977)],
)
def test_memory_units(unit: str | None, amount: str, kib: int) -> None:
    attr = f" unit='{unit}'" if unit else ""
    d = parse_domain(f"<domain type='qemu'><name>a</name><memory{attr}>{amount}</memory></domain>")
    assert d.memory_kib == kib


@pytest.mark.parametrize(
    ("old", "new", "reason"),
    [
        ("type='ns'", "type='xen'", "domain type"),
        ("<name>web1</name>", "<name>a/b</name>", "domain name"),
        ("<name>web1</name>", "", "needs a <name>"),
        ("<vcpu>2</vcpu>", "<vcpu>0</vcpu>", "vcpu"),
        ("<vcpu>2</vcpu>", "<vcpu>two</vcpu>", "vcpu"),
        ("unit='MiB'", "unit='parsecs'", "unit"),
        ("<vcpu>2</vcpu>", "<vcpu>2</vcpu><os/>", "<os>"),
        ("<devices>", "<devices><disk/>", "<disk>"),
        ("type='bridge'", "type='direct'", "<interface> at /domain/devices/interface[1]"),
        ("52:54:00:00:00:01", "ff:ff:ff:ff:ff:ff", "unicast"),
        ("52:54:00:00:00:01", "52:54:00:00:00", "mac address"),
        ("dev='vnet0'", "dev='averyveryverylongname'", "longer than 15"),
        ("bridge='br0'", "bridge='br 0'", "source bridge"),
        ("<source bridge='br0'/>", "", "needs <source bridge"),
        ("<source network='default'/>", "", "needs <source network"),
        ("<target dev='tap1'/>", "<source bridge='x'/>", "at /domain/devices/interface[3]/source"),
        ("type='virtio'", "type='vir tio'", "model type"),
        ("address='10.0.0.2'", "address='10.0.0.256'", "dotted-quad"),
        ("prefix='24'", "prefix='33'", "0-32"),
        ("family='ipv6'", "family='ipv4'", "not an ipv4"),
        ("<model type='virtio'/>", "<vlan/>", "<vlan>"),
        ("value='10.0.0.2'", "value='10.0.0.2/24'", "parameter value"),
        ("<vcpu>2</vcpu>", "<vcpu>0x2</vcpu>", "vcpu '0x2' must be a decimal number"),
        ("<vcpu>2</vcpu>", "<vcpu n='1'>2</vcpu>", "<vcpu> at /domain/vcpu (line 6)"),
        ("<title>Web</title>", "<title>Web</title>text", "extra content: text"),
        ("<target dev='vnet0'/>", "<target dev='vnet0'/>x", "/domain/devices/interface[1]/target"),
        ("</interface>\n    <interface type='network'>",
         "</interface>x<interface type='network'>", "at /domain/devices/interface[1]"),
        ("<target dev='vnet0'/>", "<target/>", "<target> needs a dev attribute"),
        ("dev='vnet0'", "dev='v\\*'", "must not end with '*'"),
        ("dev='vnet0'", "dev='*'", "catch-all"),
        ("dev='vnet0'", "dev='@v'", "set reference"),
        ("dev='vnet0'", "dev='v&quot;x'", "double quotes"),
        ("dev='vnet0'", "dev='.v'", "must not start with '.'"),
        ("<model type='virtio'/>", "<model type='virtio'><x/></model>",
         "<x> at /domain/devices/interface[1]/model/x"),
    ],
)
def test_refused(old: str, new: str, reason: str) -> None:
    assert old in GOOD
    with pytest.raises(ValidationError) as info:
        parse_domain(GOOD.replace(old, new, 1))
    assert reason in str(info.value)


def test_format_refuses_broken_model() -> None:
    bad = dataclasses.replace(parse_domain(GOOD), name="a/b")
    with pytest.raises(ValidationError, match="domain 'a/b' cannot be printed"):
        format_domain(bad)


def test_wrong_root() -> None:
    with pytest.raises(NwfilterError):
        parse_domain("<filter name='x'/>")
