"""Record the rules libvirt 9.0's ebiptables driver puts in the kernel.

For every case of tests/golden/libvirt/verdicts.json (filters, a binding of
vnet0 and its parameters) and the extra cases below, a private libvirtd
(`tools/libvirtref.py`) runs inside a lab's host namespace
(`tests.integration.conftest.build_bridge_lab`), the case's filters are
defined, vnet0 is bound, and `ebtables-save -t nat`, `iptables-save -t
filter` and `ip6tables-save -t filter` are read inside that namespace.  The
text goes to tests/golden/libvirt/ebiptables.json, which
tests/integration/test_ebiptables_golden.py compares with what the
ebiptables backend puts there.  libvirt is needed only here.

Run as root on Debian 12 from the repository root::

    .venv/bin/python tools/record_libvirt_ebiptables.py
"""

from __future__ import annotations

import json
import sys
import uuid
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from libvirtref import ReferenceDaemon

from nwfilter.netlab import NetLab
from tests.integration.conftest import build_bridge_lab

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "golden" / "libvirt"
OUTPUT = GOLDEN / "ebiptables.json"
G0_MAC = "52:54:00:00:00:00"

#: Cases beyond the verdict recording: (id, filters, filter bound, parameters).
EXTRA: list[tuple[str, list[str], str, list[list[str]]]] = [
    ("clean-traffic-2ip", [], "clean-traffic", [["IP", "10.77.0.10"], ["IP", "10.77.0.12"]]),
    ("no-ip-spoofing", [], "no-ip-spoofing", [["IP", "10.77.0.10"]]),
    ("allow-dhcp", [], "allow-dhcp", []),
    ("tcp-state", [
        "<filter name='d-tcpst' chain='root'>"
        "<rule action='accept' direction='in' priority='100'><tcp dstportstart='22'/></rule>"
        "<rule action='accept' direction='out' priority='110'><tcp state='NEW,ESTABLISHED'"
        " dstportstart='80' dstportend='90'/></rule>"
        "<rule action='reject' direction='inout' priority='120'><udp srcipaddr='10.77.0.0'"
        " srcipmask='24' dscp='10'/></rule>"
        "<rule action='drop' direction='inout' priority='130'><all/></rule></filter>"], "d-tcpst",
     []),
    ("ipv6-tcp-state", [
        "<filter name='d-tcp6st' chain='root'>"
        "<rule action='accept' direction='out'><tcp-ipv6 dstportstart='443'/></rule>"
        "<rule action='drop' direction='in'><icmpv6 type='128'/></rule></filter>"], "d-tcp6st",
     []),
    ("udp-state-in", [
        "<filter name='d-udpst' chain='root'>"
        "<rule action='accept' direction='in'><udp state='NEW' dstportstart='53'/></rule>"
        "<rule action='drop' direction='out'><icmp/></rule></filter>"], "d-udpst", []),
    ("l2-reject", [
        "<filter name='d-l2rej' chain='root'>"
        "<rule action='reject' direction='out'><mac protocolid='ipv6'/></rule></filter>"],
     "d-l2rej", []),
]


def binding_xml(filter_name: str, params: list[list[str]]) -> str:
    parameters = "".join(f"<parameter name='{k}' value='{v}'/>" for k, v in params)
    return (f"<filterbinding><owner><name>vm0</name><uuid>{uuid.UUID(int=1)}</uuid></owner>"
            f"<portdev name='vnet0'/><mac address='{G0_MAC}'/>"
            f"<filterref filter='{filter_name}'>{parameters}</filterref></filterbinding>")


def lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line and not line.startswith("#")]


def record() -> None:
    verdicts = json.loads((GOLDEN / "verdicts.json").read_text())["cases"]
    cases = [(c["id"], c["filters"], c["bind"], c["params"]) for c in verdicts]
    cases.extend(EXTRA)
    results: list[dict[str, Any]] = []
    with NetLab() as netlab:
        lab = build_bridge_lab(netlab)
        daemon = ReferenceDaemon(lab.host, existing=True)
        daemon.start()
        try:
            version = daemon.run("libvirtd", "--version").stdout.strip()
            for case_id, filters, bind, params in cases:
                names = []
                for doc in filters:
                    error = daemon.define(doc)
                    if error is not None:
                        raise SystemExit(f"{case_id}: libvirt refused a filter: {error}")
                    names.append(doc.split("name='", 1)[1].split("'", 1)[0])
                path = daemon.work / "binding.xml"
                path.write_text(binding_xml(bind, params))
                daemon.virsh("nwfilter-binding-create", str(path))
                entry = {
                    "id": case_id, "filters": filters, "bind": bind, "params": params,
                    "ebtables_nat": lines(daemon.run("ebtables-save", "-t", "nat").stdout),
                    "iptables": lines(daemon.run("iptables-save", "-t", "filter").stdout),
                    "ip6tables": lines(daemon.run("ip6tables-save", "-t", "filter").stdout),
                }
                daemon.virsh("nwfilter-binding-delete", "vnet0")
                for name in reversed(names):
                    daemon.virsh("nwfilter-undefine", name)
                print(f"{case_id}: {len(entry['ebtables_nat'])} ebtables, "
                      f"{len(entry['iptables'])} iptables, {len(entry['ip6tables'])} ip6tables")
                results.append(entry)
        finally:
            daemon.stop()
    OUTPUT.write_text(json.dumps({"libvirt": version, "how": "tools/record_libvirt_ebiptables.py",
                                  "cases": results}, indent=1) + "\n")


if __name__ == "__main__":
    record()
