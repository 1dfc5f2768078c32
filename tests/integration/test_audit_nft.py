"""`nwfilter audit` against the kernel: drift made by hand in a test
namespace (rules deleted, altered, added; a chain deleted) is found with
the port and the rule of the XML, `--fail-on` gates on it, and `--fix`
repairs it in place."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nwfilter.cli import main
from nwfilter.netlab import NetLab
from tests.integration.conftest import BridgeLab, build_bridge_lab

pytestmark = [pytest.mark.root, pytest.mark.netns]

GUEST = """<filter name='guest' chain='root'>
  <filterref filter='clean-traffic'/>
  <rule action='drop' direction='out' priority='-900'>
    <udp srcportstart='67' dstportstart='68'/></rule>
  <rule action='accept' direction='in'><tcp dstportstart='22'/></rule>
</filter>"""


@pytest.fixture
def alab() -> Iterator[BridgeLab]:
    with NetLab() as netlab:
        yield build_bridge_lab(netlab)


def cli(root: Path, lab: BridgeLab, *args: str, capsys: Any) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["--root", str(root), "--backend", "nft", "--netns", lab.host, "-q", *args])
    return rc, capsys.readouterr().out


def audit(root: Path, lab: BridgeLab, capsys: Any, *extra: str) -> tuple[int, list[Any]]:
    rc, out = cli(root, lab, "audit", "--json", *extra, capsys=capsys)
    return rc, json.loads(out)["findings"]


def nft(lab: BridgeLab, *args: str) -> str:
    return lab.run(lab.host, ["nft", *args]).stdout


def handles(lab: BridgeLab, family: str, chain: str) -> list[tuple[int, str]]:
    text = nft(lab, "-a", "list", "chain", family, "nwfilter", chain)
    return [(int(m.group(2)), m.group(1)) for m in
            re.finditer(r"^\s+(.*) # handle (\d+)$", text, re.M) if "comment" in m.group(1)]


def test_drift_is_found_and_fixed(alab: BridgeLab, tmp_path: Path, capsys: Any) -> None:
    root = tmp_path / "root"
    (tmp_path / "guest.xml").write_text(GUEST)
    assert cli(root, alab, "nwfilter-define", str(tmp_path / "guest.xml"), capsys=capsys)[0] == 0
    for i, g in enumerate(alab.guests):
        doc = tmp_path / f"b{i}.xml"
        doc.write_text(
            f"<filterbinding><owner><name>vm{i}</name>"
            f"<uuid>00000000-0000-0000-0000-00000000000{i + 1}</uuid></owner>"
            f"<portdev name='{g.portdev}'/><mac address='{g.mac}'/>"
            f"<filterref filter='guest'><parameter name='IP' value='{g.ip}'/></filterref>"
            f"</filterbinding>")
        assert cli(root, alab, "nwfilter-binding-create", str(doc), capsys=capsys)[0] == 0
    rc, findings = audit(root, alab, capsys, "--fail-on", "low")
    assert (rc, findings) == (0, [])

    # By hand: delete a rule of vnet0's mac chain, alter one of its ipv4-ip
    # chain, add one to vnet1's inet chain, delete vnet1's arp-mac chain.
    (mac_rule, _), *_ = handles(alab, "bridge", "vnet0/from/mac")
    nft(alab, "delete", "rule", "bridge", "nwfilter", "vnet0/from/mac", "handle", str(mac_rule))
    ip_rules = handles(alab, "bridge", "vnet0/from/ipv4-ip")
    nft(alab, "replace", "rule", "bridge", "nwfilter", "vnet0/from/ipv4-ip", "handle",
        str(ip_rules[1][0]), "ether", "type", "ip", "return")
    nft(alab, "add", "rule", "inet", "nwfilter", "vnet1/to", "accept")
    for handle, text in handles(alab, "bridge", "vnet1/from/root"):
        if "arp-mac" in text:
            nft(alab, "delete", "rule", "bridge", "nwfilter", "vnet1/from/root", "handle",
                str(handle))
    nft(alab, "delete", "chain", "bridge", "nwfilter", "vnet1/from/arp-mac")

    rc, findings = audit(root, alab, capsys, "--fail-on", "high")
    assert rc == 1
    got = {(f["kind"], f["port"], f["filter"]) for f in findings}
    assert ("drift.missing-rule", "vnet0", "no-mac-spoofing") in got
    assert ("drift.altered-rule", "vnet0", "no-ip-spoofing") in got
    assert ("drift.extra-rule", "vnet1", "") in got
    assert ("drift.missing-chain", "vnet1", "") in got
    assert all(f["kind"].startswith("drift.") for f in findings), findings

    rc, findings = audit(root, alab, capsys, "--fix", "--fail-on", "low")
    assert (rc, findings) == (0, [])
    assert handles(alab, "bridge", "vnet1/from/arp-mac")
    listed = nft(alab, "list", "chain", "inet", "nwfilter", "vnet1/to").splitlines()
    assert "accept" not in [line.strip() for line in listed]


def test_unbound_bridge_port_and_preconditions(alab: BridgeLab, tmp_path: Path,
                                               capsys: Any) -> None:
    root = tmp_path / "root"
    g = alab.guests[0]
    doc = tmp_path / "b.xml"
    doc.write_text(
        f"<filterbinding><owner><name>vm0</name>"
        f"<uuid>00000000-0000-0000-0000-000000000001</uuid></owner>"
        f"<portdev name='{g.portdev}'/><mac address='{g.mac}'/>"
        f"<filterref filter='clean-traffic'><parameter name='IP' value='{g.ip}'/>"
        f"</filterref></filterbinding>")
    assert cli(root, alab, "nwfilter-binding-create", str(doc), capsys=capsys)[0] == 0
    alab.lab.sysctl(alab.host, "net.bridge.bridge-nf-call-iptables", "0")
    _rc, findings = audit(root, alab, capsys)
    kinds = {(f["kind"], f["port"]) for f in findings}
    assert ("precondition.unbound-bridge-port", "vnet1") in kinds
    # clean-traffic has no layer-3 rules: a missing bridge-nf hook is reported
    # for the namespace, not for the port.
    assert any(f["kind"] == "precondition" and "bridge-nf-call-iptables" in f["message"]
               for f in findings)
    _rc, findings = audit(root, alab, capsys, "--fix")
    assert not any(f["kind"] == "precondition" for f in findings)
