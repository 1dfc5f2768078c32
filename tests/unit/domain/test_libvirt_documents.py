"""Domain documents as libvirt hosts have them: `virsh dumpxml` of a KVM
guest and a virt-install file define, dump back unchanged, and are refused
at start with a clear reason where no driver can run them."""

from __future__ import annotations

import re
import uuid
from pathlib import Path

import pytest

from nwfilter.backends.memory import MemoryBackend
from nwfilter.cli import main
from nwfilter.conf import format_domain, parse_domain
from nwfilter.domain.manager import DomainManager
from nwfilter.engine import Engine
from nwfilter.errors import UnsupportedError, ValidationError

GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "domain"
STOCK = Path(__file__).resolve().parents[3] / "filters"


def test_kvm_guest_prints_back_unchanged() -> None:
    text = (GOLDEN / "kvm-guest.xml").read_text()
    definition = parse_domain(text)
    assert definition.type == "kvm" and definition.name == "web01"
    assert [i.type for i in definition.interfaces] == ["network", "bridge", "direct"]
    assert definition.interfaces[1].target_dev == "vnet7"
    assert definition.memory_kib == 2097152 and definition.vcpus == 2
    assert format_domain(definition) == text
    # Foreign namespaces in <metadata> are kept verbatim.
    assert "xmlns:libosinfo='http://libosinfo.org/xmlns/libvirt/domain/1.0'" in text


@pytest.fixture
def manager(tmp_path: Path) -> DomainManager:
    engine = Engine(tmp_path / "root", MemoryBackend(), stock_dir=STOCK)
    engine.start()
    macs = iter(f"52:54:00:aa:00:{n:02x}" for n in range(1, 100))
    mgr = DomainManager.for_engine(engine, mac_source=lambda: next(macs))
    mgr.start()
    return mgr


def test_virt_install_file_gets_uuid_and_mac_and_keeps_the_rest(manager: DomainManager) -> None:
    definition = manager.define_xml((GOLDEN / "virt-install.in.xml").read_text())
    out = manager.dumpxml("db02", inactive=True)
    expected = (GOLDEN / "virt-install.out.xml").read_text()
    assert out == expected.replace("UUID", str(definition.uuid))
    # Defined again from its own dump: nothing changes.
    again = manager.define_xml(out)
    assert manager.dumpxml("db02", inactive=True) == out and again.uuid == definition.uuid


def test_kvm_guest_defines_and_dumps_and_start_names_what_is_missing(
    manager: DomainManager,
) -> None:
    text = (GOLDEN / "kvm-guest.xml").read_text()
    manager.define_xml(text)
    assert manager.dumpxml("web01", inactive=True) == text
    assert manager.dumpxml("web01") == text
    assert [r.name for r in manager.list_domains(all_domains=True)] == ["web01"]
    # Its first NIC is on network 'default', which nothing manages here.
    with pytest.raises(UnsupportedError, match="network 'default', and no networks are managed"):
        manager.run("start", "web01")
    assert manager.state("web01").state.value == "shut off"
    assert manager.engine.list_bindings() == []  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("itype", "source", "why"),
    [
        ("direct", "<source dev='eth0' mode='vepa'/>", "type 'direct', which no driver"),
        ("user", "", "type 'user', which no driver"),
        ("network", "<source network='default'/>", "no networks are managed here"),
    ],
)
def test_interfaces_no_driver_can_attach_are_refused_at_start(
    manager: DomainManager, itype: str, source: str, why: str
) -> None:
    manager.define_xml(
        f"<domain type='test'><name>vm1</name><devices><interface type='{itype}'>"
        f"{source}<mac address='52:54:00:00:00:01'/>"
        "<filterref filter='clean-traffic'><parameter name='IP' value='10.0.0.1'/>"
        "</filterref></interface></devices></domain>"
    )
    with pytest.raises(UnsupportedError, match=why):
        manager.run("start", "vm1")
    assert manager.state("vm1").state.value == "shut off"
    assert manager.engine.list_bindings() == []  # type: ignore[attr-defined]


def test_a_document_libvirt_refuses_names_the_element() -> None:
    text = (GOLDEN / "kvm-guest.xml").read_text()
    bad = text.replace("<sound model='ich9'/>", "<sound model='nonsense'/>")
    with pytest.raises(ValidationError) as err:
        parse_domain(bad, source="web01.xml")
    message = err.value.message
    assert message.startswith("web01.xml: <sound> at /domain/devices/sound")
    assert "libvirt's domain schema" in message


def test_ns_documents_with_memory_and_os_are_accepted() -> None:
    definition = parse_domain(
        "<domain type='ns'><name>n1</name><memory unit='MiB'>64</memory>"
        "<os><type>hvm</type></os><devices><interface type='bridge'>"
        "<source bridge='br0'/></interface></devices></domain>"
    )
    assert definition.memory_kib == 64 * 1024
    assert "<os>" in format_domain(definition)


def test_cli_define_dumpxml_and_start(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = tmp_path / "root"
    path = GOLDEN / "kvm-guest.xml"
    base = ["--root", str(root), "--backend", "memory"]
    assert main([*base, "define", str(path)]) == 0
    capsys.readouterr()
    assert main([*base, "dumpxml", "web01"]) == 0
    assert capsys.readouterr().out == path.read_text()
    assert main([*base, "start", "web01"]) == 4
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: domain 'web01': interface 1 cannot attach to network 'default':"
                        r" network 'default' is not active.*\n", err)
    assert main([*base, "domuuid", "web01"]) == 0
    assert uuid.UUID(capsys.readouterr().out.strip()) == parse_domain(path.read_text()).uuid
