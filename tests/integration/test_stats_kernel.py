"""`nwfilter stats` against the kernel, on both backends: real UDP packets
sent from one guest namespace to another through the bridge raise the
counters of exactly the rule they hit, and the port's accepted and dropped
totals, by exactly what was sent; a restart keeps them; nwfilterd answers
the same as the embedded engine.

The namespaces are kept quiet so that nothing else moves the numbers: no
IPv6 (no router solicitations, no MLD), static neighbours (no ARP), and the
receiving guest drops UDP itself (no ICMP errors going back)."""

from __future__ import annotations

import json
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nwfilter.backends import get_backend
from nwfilter.backends.nft import NftBackend, readback, render
from nwfilter.cli import main
from nwfilter.commands.context import default_socket
from nwfilter.daemon import close, serve
from nwfilter.engine import Engine
from nwfilter.ir import Chain, Changes, Family, Field, Hook, Match, Origin, Rule, Ruleset, Verdict
from nwfilter.netlab import NetLab
from tests.integration.conftest import BridgeLab, Guest, build_bridge_lab
from tests.nft_rulesets import clean_traffic

pytestmark = [pytest.mark.root, pytest.mark.netns]

STOCK = Path(__file__).resolve().parents[2] / "filters"
FILTER = """<filter name='stats-guest' chain='root'>
  <filterref filter='clean-traffic'/>
  <rule action='drop' direction='out' priority='100'><udp dstportstart='4444'/></rule>
  <rule action='accept' direction='out' priority='100' statematch='false'>
    <udp dstportstart='5555'/></rule>
  <rule action='drop' direction='in' priority='100'><udp dstportstart='6666'/></rule>
</filter>"""
UDP_HEADERS = 20 + 8  # what the counters count of a UDP packet besides its payload

SEND = """
import socket, sys
ip, port, size, count = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
for _ in range(count):
    s.sendto(b"x" * size, (ip, port))
"""


@pytest.fixture
def qlab() -> Iterator[BridgeLab]:
    with NetLab() as netlab:
        lab = build_bridge_lab(netlab)
        for ns in (lab.host, *(g.ns for g in lab.guests)):
            for key in ("all", "default"):
                lab.run(ns, ["sysctl", "-q", "-w", f"net.ipv6.conf.{key}.disable_ipv6=1"])
            # IGMP membership reports follow an interface's start for a while.
            lab.run(ns, ["iptables", "-A", "OUTPUT", "-p", "igmp", "-j", "DROP"])
        g0, g1 = lab.guests
        for me, peer in ((g0, g1), (g1, g0)):
            lab.run(me.ns, ["ip", "neigh", "replace", peer.ip, "lladdr", peer.mac, "dev",
                            me.ifname, "nud", "permanent"])
            lab.run(me.ns, ["iptables", "-A", "INPUT", "-p", "udp", "-j", "DROP"])
        yield lab


def send(lab: BridgeLab, src: Guest, dst: Guest, port: int, size: int, count: int) -> None:
    lab.run(src.ns, [sys.executable, "-c", SEND, dst.ip, str(port), str(size), str(count)])


def cli(root: Path, backend: str, lab: BridgeLab, capsys: Any, *args: str) -> tuple[int, str]:
    capsys.readouterr()
    rc = main(["--root", str(root), "--backend", backend, "--netns", lab.host, "-q", *args])
    return rc, capsys.readouterr().out


def stats(root: Path, backend: str, lab: BridgeLab, capsys: Any) -> dict[str, Any]:
    rc, out = cli(root, backend, lab, capsys, "stats", "--json", "vnet0")
    assert rc == 0
    port: dict[str, Any] = json.loads(out)["ports"]["vnet0"]
    return port


def rule(port: dict[str, Any], direction: str, index: int, verdict: str) -> dict[str, Any]:
    """The one layer-3 row of the stats-guest rule `index` in `direction`."""
    rows = [r for r in port["rules"] if r["filter"] == "stats-guest" and r["rule"] == index
            and r["direction"] == direction and r["verdict"] == verdict]
    tables = {r["table"] for r in rows}
    # ebiptables repeats the from-the-VM rules in HI-PORT (to the host): the
    # packets here are bridged, so they are counted in FI-PORT.
    rows = [r for r in rows if not r["chain"].startswith("HI-")]
    assert len(rows) == 1, (rows, tables)
    return rows[0]


def settled(read: Any, enough: Any, timeout: float = 5.0) -> Any:
    """`read()` once `enough(value)` holds and a second read agrees: the
    tables are read one after the other, so a frame in flight may be in
    one count and not yet in another (this waits out a slow scheduler,
    it never asserts timing)."""
    deadline = time.monotonic() + timeout
    value = read()
    while time.monotonic() < deadline:
        time.sleep(0.1)
        again = read()
        if again == value and enough(value):
            break
        value = again
    return value


def delta(after: dict[str, Any] | None, before: dict[str, Any] | None) -> tuple[int, int]:
    assert after is not None and before is not None
    return after["packets"] - before["packets"], after["bytes"] - before["bytes"]


@pytest.mark.parametrize("backend", ["nft", "ebiptables"])
def test_counters_rise_by_what_was_sent_and_survive_a_restart(
        qlab: BridgeLab, tmp_path: Path, capsys: Any, backend: str) -> None:
    root = tmp_path / "root"
    (tmp_path / "f.xml").write_text(FILTER)
    assert cli(root, backend, qlab, capsys, "nwfilter-define", str(tmp_path / "f.xml"))[0] == 0
    g0, g1 = qlab.guests
    for g in (g0, g1):
        doc = tmp_path / f"{g.portdev}.xml"
        doc.write_text(f"<filterbinding><owner><name>vm-{g.portdev}</name><uuid>{uuid.uuid4()}"
                       f"</uuid></owner><portdev name='{g.portdev}'/><mac address='{g.mac}'/>"
                       f"<filterref filter='stats-guest'><parameter name='IP' value='{g.ip}'/>"
                       f"</filterref></filterbinding>")
        assert cli(root, backend, qlab, capsys, "nwfilter-binding-create", str(doc))[0] == 0

    before = settled(lambda: stats(root, backend, qlab, capsys), lambda s: True)
    # Every rule of the port's chains is counted and tied to the XML.
    assert before["rules"] and all(r["packets"] is not None for r in before["rules"])
    assert {(r["filter"], r["rule"]) for r in before["rules"]} >= {
        ("stats-guest", 2), ("stats-guest", 3), ("stats-guest", 4),
        ("no-mac-spoofing", 1), ("no-other-l2-traffic", 1)}

    send(qlab, g0, g1, 4444, 100, 3)  # out, dropped by rule 2
    send(qlab, g0, g1, 5555, 50, 2)  # out, accepted by rule 3
    send(qlab, g1, g0, 6666, 10, 4)  # in, dropped by rule 4
    want_drop_out = (3, 3 * (UDP_HEADERS + 100))
    want_accept_out = (2, 2 * (UDP_HEADERS + 50))
    want_drop_in = (4, 4 * (UDP_HEADERS + 10))

    after = settled(lambda: stats(root, backend, qlab, capsys),
                    lambda s: delta(rule(s, "in", 4, "drop"), rule(before, "in", 4, "drop"))
                    >= want_drop_in)
    assert delta(rule(after, "out", 2, "drop"), rule(before, "out", 2, "drop")) == want_drop_out
    # libvirt's form of an accept going out: the port's chain returns.
    assert delta(rule(after, "out", 3, "return"),
                 rule(before, "out", 3, "return")) == want_accept_out
    assert delta(rule(after, "in", 4, "drop"), rule(before, "in", 4, "drop")) == want_drop_in
    t0, t1 = before["totals"], after["totals"]
    assert delta(t1["out"]["dropped"], t0["out"]["dropped"]) == want_drop_out
    assert delta(t1["out"]["accepted"], t0["out"]["accepted"]) == want_accept_out
    assert delta(t1["in"]["dropped"], t0["in"]["dropped"]) == want_drop_in
    assert delta(t1["in"]["accepted"], t0["in"]["accepted"]) == (0, 0)

    # Counter values are no drift: the audit finds none.
    rc, out = cli(root, backend, qlab, capsys, "audit", "--json", "vnet0")
    assert rc == 0
    assert [f for f in json.loads(out)["findings"] if f["kind"].startswith("drift")] == []

    # nwfilterd answers the same.
    server = serve(root, backend, qlab.host, None)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        assert default_socket(root).is_socket()
        assert stats(root, backend, qlab, capsys) == after
    finally:
        server.shutdown()
        close(server)
        thread.join(5)

    # A restart (which reconciles) keeps every counter.
    engine = Engine(root, get_backend(backend, qlab.host), stock_dir=STOCK)
    engine.start()
    engine.close()
    assert stats(root, backend, qlab, capsys) == after

    # The text form names the rule and the totals.
    rc, text = cli(root, backend, qlab, capsys, "stats", "vnet0")
    assert rc == 0
    assert "filter 'stats-guest' rule 2 <udp dstportstart='4444'>" in text
    assert "Dropped pkts" in text


def test_a_reconcile_that_rewrites_a_chain_keeps_its_unchanged_rules_counts(
        qlab: BridgeLab) -> None:
    """A start that finds a port's chain changed rewrites the chain; each
    rule it held unchanged (by digest) starts again at its old values."""
    g0, g1 = qlab.guests
    clean = clean_traffic(g0.portdev, g0.mac, g0.ip)
    first = NftBackend(netns=qlab.host)
    first.probe()
    first.apply(Changes(set=(clean,)))
    send(qlab, g0, g1, 4000, 20, 5)

    def counts(chain: str) -> list[tuple[str, tuple[int, int] | None]]:
        listing = readback.parse(first.listing_text())
        key = ("bridge", f"{g0.portdev}/from/{chain}")
        return [(c.split(render.DIGEST_TAG)[0], n)
                for c, n in zip(listing.comments[key], listing.counts[key], strict=True)]

    before = settled(lambda: counts("mac"), lambda c: c[0][1] == (5, 5 * (UDP_HEADERS + 20)))
    assert before[0][1] == (5, 5 * (UDP_HEADERS + 20))
    kept_before = counts("ipv4-ip")

    extra = Rule(Family.ETHER, (Match(Field.ETH_TYPE, 0x88B5),), Verdict.DROP,
                 origin=Origin("extra", 1))
    changed = Ruleset(port=clean.port, filter_names=clean.filter_names, l2={
        **clean.l2, Hook.FROM_VM: tuple(
            Chain(c.name, c.priority, (extra, *c.rules)) if c.name == "mac" else c
            for c in clean.chains(Hook.FROM_VM))})
    second = NftBackend(netns=qlab.host)
    second.probe()
    assert second.reconcile([changed]) > 0
    after = counts("mac")
    assert after[0] == ("filter 'extra' rule 1", (0, 0))
    assert after[1:] == before  # the chain's old rules, with their counts
    assert counts("ipv4-ip") == kept_before  # a chain not rewritten keeps them anyway
