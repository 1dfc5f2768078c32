"""Network documents (libvirt's schema, every element kept), dnsmasq's
configuration and the network definitions of a root (no kernel)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nwfilter.backends.base import Owner
from nwfilter.errors import ConflictError, NotFoundError, StateError, ValidationError
from nwfilter.fileio import SafeDir
from nwfilter.network.dnsmasq import DnsmasqFiles, argv_for, config_text, hosts_text
from nwfilter.network.manager import NetworkManager
from nwfilter.network.model import DEFAULT_NETWORK, format_network, parse_network
from nwfilter.network.nat import table_batch, table_name

NAT = """<network>
  <name>lab</name>
  <!-- kept -->
  <forward mode='nat'><nat><port start='1024' end='65535'/></nat></forward>
  <bridge name='nwbr1' stp='on' delay='0'/>
  <mtu size='9000'/>
  <domain name='example.test'/>
  <ip address='10.99.0.1' prefix='24'>
    <dhcp>
      <range start='10.99.0.10' end='10.99.0.20'><lease expiry='5' unit='minutes'/></range>
      <host mac='52:54:00:00:00:07' name='seven' ip='10.99.0.7'/>
    </dhcp>
  </ip>
  <ip family='ipv6' address='fd00:99::1' prefix='64'/>
</network>
"""


def test_the_stock_default_network_is_libvirts() -> None:
    net = parse_network(DEFAULT_NETWORK)
    assert net.name == "default" and net.forward == "nat" and net.bridge == "virbr0"
    assert str(net.address) == "192.168.122.1/24"
    assert [(str(r.start), str(r.end)) for r in net.ranges] == [
        ("192.168.122.2", "192.168.122.254")]


def test_every_element_is_printed_back() -> None:
    net = parse_network(NAT)
    text = format_network(net)
    assert "<uuid>" not in NAT and f"<uuid>{net.uuid}</uuid>" in text
    for kept in ("<mtu size='9000'/>", "stp='on'", "fd00:99::1",
                 "<port start='1024' end='65535'/>", "example.test"):
        assert kept in text
    again = parse_network(text)
    assert again == net and format_network(again) == text
    assert net.ranges[0].lease == 300
    assert net.hosts[0].name == "seven" and str(net.hosts[0].ip) == "10.99.0.7"


@pytest.mark.parametrize(("doc", "words"), [
    ("<network><name>x</name><bogus/></network>", "libvirt's network schema"),
    ("<network><name>x</name><forward mode='bridge'/></network>", "needs <bridge"),
    ("<network><name>x</name><ip address='10.0.0.1' prefix='24'><dhcp>"
     "<range start='10.0.1.2' end='10.0.1.9'/></dhcp></ip></network>", "not an ordered range"),
    ("<network><name>x</name><ip address='10.0.0.1' prefix='24'><dhcp>"
     "<range start='10.0.0.2' end='10.0.0.9'><lease expiry='30' unit='seconds'/></range>"
     "</dhcp></ip></network>", "minimum"),
    ("<domain><name>x</name></domain>", "must be <network>"),
])
def test_bad_documents_are_refused_by_name(doc: str, words: str) -> None:
    with pytest.raises(ValidationError, match=words):
        parse_network(doc)


def test_dnsmasq_listens_on_the_bridge_only(tmp_path: Path) -> None:
    net = parse_network(NAT)
    files = DnsmasqFiles(tmp_path, "lab")
    conf = config_text(net, files).splitlines()
    assert "interface=nwbr1" in conf and "bind-dynamic" in conf
    assert "except-interface=lo" in conf
    assert f"pid-file={tmp_path}/lab.pid" in conf
    assert "dhcp-range=10.99.0.10,10.99.0.20,255.255.255.0,300" in conf
    assert hosts_text(net) == "52:54:00:00:00:07,10.99.0.7,seven\n"
    assert argv_for("ns1", tmp_path / "lab.conf")[:4] == ["ip", "netns", "exec", "ns1"]
    with pytest.raises(ValidationError):
        argv_for("-x", tmp_path / "lab.conf")


def test_the_nat_table_masquerades_the_network_and_names_its_owner() -> None:
    net = parse_network(NAT)
    owner = Owner("/r", "abc")
    batch = table_batch(net, owner)
    assert table_name("lab") == "nwnet_lab" and table_name("a.b") != "nwnet_a.b"
    text = repr(batch)
    assert "masquerade" in text and owner.label() in text and "'nwbr1'" in text
    tables = {c["add"]["table"]["name"] for c in batch if "table" in c.get("add", {})}
    assert tables == {"nwnet_lab"}


def _manager(tmp_path: Path) -> NetworkManager:
    manager = NetworkManager(tmp_path / "root", None, lambda: Owner("/r", "abc"))
    manager.load()
    return manager


def test_definitions_persist_and_the_stock_network_comes_once(tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    assert [i.name for i in manager.list_networks()] == ["default"]
    assert not manager.info("default").autostart and not manager.info("default").active
    manager.define(NAT)
    manager.set_autostart("lab", True)
    manager.undefine("default")
    again = _manager(tmp_path)
    assert [(i.name, i.autostart) for i in again.list_networks()] == [("lab", True)]
    text = again.dumpxml("lab")
    assert "<mtu size='9000'/>" in text and parse_network(text) == again._defs["lab"]
    with pytest.raises(NotFoundError):
        again.info("default")
    with pytest.raises(StateError, match="not active"):
        again.attachment("lab")


def test_a_network_without_bridge_gets_a_free_one_and_names_are_checked(
        tmp_path: Path) -> None:
    manager = _manager(tmp_path)
    net = manager.define("<network><name>iso</name><ip address='10.5.0.1' prefix='24'/>"
                         "</network>")
    assert net.bridge == "virbr1"  # virbr0 is the default network's
    assert "<bridge name='virbr1'/>" in manager.dumpxml("iso")
    with pytest.raises(ConflictError, match="bridge 'virbr0'"):
        manager.define("<network><name>other</name><bridge name='virbr0'/></network>")
    with pytest.raises(ValidationError):
        manager.info("../x")


def test_a_query_only_manager_changes_nothing(tmp_path: Path) -> None:
    manager = NetworkManager(tmp_path / "root", None, lambda: None)
    manager.load(write=False)
    assert manager.list_networks() == []
    with pytest.raises(StateError):
        manager.define(NAT)
    assert SafeDir.open_existing(tmp_path / "root" / "networks") is None
