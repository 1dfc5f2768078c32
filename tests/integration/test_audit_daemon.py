"""The audit as nwfilterd runs it, against the kernel of a test namespace.

* The kernel reads of an audit do not grow with the number of ports: one
  listing of our two tables (plus the owner), whatever the ports, nothing
  read per port; and none at all by an `Auditor` (nwfilterd's) while no
  transaction was committed in the namespace since its last listing.
* `nwfilterd --audit-interval`: a real daemon process audits in the
  background and publishes one `audit` event per new finding and one per
  resolved finding; a finding that stays is not told again.  A kernel rule
  deleted by hand is repaired by the daemon's nft monitor (its own
  `drift-repaired` event), so the periodic audit either never sees that
  drift or, if a round ran before the repair, tells it found and then
  resolved: never left open.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nwfilter.audit.run import Auditor
from nwfilter.backends.nft import NftBackend
from nwfilter.backends.nft.backend import NftContext, default_nft_factory
from nwfilter.client import Client
from nwfilter.conf.model import BindingDef, FilterRef, Parameter
from nwfilter.engine import Engine
from nwfilter.events import Event
from nwfilter.netlab import NetLab
from tests.integration.conftest import BridgeLab, build_bridge_lab

pytestmark = [pytest.mark.root, pytest.mark.netns]

STOCK = Path(__file__).resolve().parents[2] / "filters"
GUEST = """<filter name='guest' chain='root'>
  <filterref filter='clean-traffic'/>
  <rule action='drop' direction='out' priority='-900'>
    <udp srcportstart='67' dstportstart='68'/></rule>
</filter>"""


def binding(n: int) -> BindingDef:
    return BindingDef(f"vm{n}", uuid.UUID(int=n + 1), f"vnet{n}", f"52:54:00:00:{n >> 8:02x}:"
                      f"{n & 255:02x}", FilterRef("guest", (Parameter("IP", f"10.1.{n >> 8}."
                                                                           f"{n & 255}"),)))


def binding_xml(portdev: str, mac: str, ip: str) -> str:
    return (f"<filterbinding><owner><name>vm-{portdev}</name><uuid>{uuid.uuid4()}</uuid>"
            f"</owner><portdev name='{portdev}'/><mac address='{mac}'/>"
            f"<filterref filter='guest'><parameter name='IP' value='{ip}'/></filterref>"
            "</filterbinding>")


class Counting:
    """A libnftables context that counts the commands sent through it."""

    def __init__(self, ctx: NftContext) -> None:
        self._ctx = ctx
        self.commands: list[str] = []

    def json_cmd(self, json_root: dict[str, Any]) -> tuple[int, Any, str]:
        self.commands.append("json " + ",".join(
            sorted({next(iter(c)) for c in json_root.get("nftables", ())})))
        return self._ctx.json_cmd(json_root)

    def cmd(self, cmdline: str) -> tuple[int, str, str]:
        self.commands.append(cmdline)
        return self._ctx.cmd(cmdline)

    def set_json_output(self, value: bool) -> bool:
        return self._ctx.set_json_output(value)

    def set_dry_run(self, onoff: bool) -> bool:
        return self._ctx.set_dry_run(onoff)


def test_the_kernel_reads_of_an_audit_do_not_grow_with_the_ports(tmp_path: Path) -> None:
    reads: dict[int, list[list[str]]] = {}
    with NetLab() as lab:
        for count in (2, 40):
            ns = lab.add_ns(f"a{count}")
            contexts: list[Counting] = []

            def factory(contexts: list[Counting] = contexts) -> NftContext:
                contexts.append(Counting(default_nft_factory()))
                return contexts[-1]

            backend = NftBackend(netns=ns, nft_factory=factory)
            engine = Engine(tmp_path / str(count), backend, stock_dir=STOCK)
            engine.start()
            try:
                engine.define_filter(GUEST)
                engine.create_bindings([binding(n) for n in range(count)])
                auditor = Auditor()  # as nwfilterd's `audit.run` holds it
                (ctx,) = contexts
                rounds = reads.setdefault(count, [])
                for change in (False, False, True):
                    if change:  # a commit in the namespace: the tables are read again
                        lab.run(ns, ["nft", "add", "table", "ip", "other"])
                    ctx.commands.clear()
                    result = auditor.run(engine, None)
                    assert result["ports"] == count and result["findings"] == []
                    rounds.append(ctx.commands[:])
            finally:
                engine.close()
                backend.clear_all()
    assert reads[2] == reads[40]
    first, unchanged, changed = reads[2]
    for commands in (first, changed):
        assert commands.count("list table bridge nwfilter") == 1
        assert commands.count("list table inet nwfilter") == 1
        assert len(commands) <= 4, commands
    assert not any(c.startswith("list table") for c in unchanged), unchanged


class Daemon:
    """`python -m nwfilter.daemon` in its own process."""

    def __init__(self, root: Path, netns: str, *extra: str) -> None:
        self.socket = root.parent / "d.sock"
        self.log = (root.parent / "daemon.log").open("w")
        env = dict(os.environ, PYTHONPATH=str(Path(__file__).resolve().parents[2]))
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "nwfilter.daemon", "--root", str(root), "--backend", "nft",
             "--netns", netns, "--socket", str(self.socket), "--no-ro-socket", *extra],
            stdout=self.log, stderr=subprocess.STDOUT, env=env)
        deadline = time.monotonic() + 30
        while not self.socket.exists():
            assert self.proc.poll() is None, (root.parent / "daemon.log").read_text()
            assert time.monotonic() < deadline, "nwfilterd did not start within 30 s"
            time.sleep(0.1)

    def client(self) -> Client:
        return Client(self.socket)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(5)
        self.log.close()


@pytest.fixture
def alab() -> Iterator[BridgeLab]:
    with NetLab() as netlab:
        yield build_bridge_lab(netlab)


class Stream:
    """The events of one subscription, read until the one a test waits for."""

    def __init__(self, client: Client) -> None:
        self.client = client
        self.seen: list[Event] = []

    def until(self, name: str, state: str, timeout: float = 20) -> list[Event]:
        """The events up to and with the audit event `state` for `name`."""
        got: list[Event] = []
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            assert left > 0, f"no audit event {state!r} for {name!r}; got {got}"
            event = self.client.next_event(left)
            assert event is not None, f"no audit event {state!r} for {name!r}; got {got}"
            got.append(event)
            self.seen.append(event)
            if event.kind.value == "audit" and event.name == name \
                    and event.details["state"] == state:
                return got


def audit_events(events: list[Event]) -> list[tuple[str, str, str]]:
    return [(e.name, e.details["state"], e.details["finding"]["kind"]) for e in events
            if e.kind.value == "audit"]


def test_periodic_audit_tells_new_and_resolved_findings(alab: BridgeLab,
                                                        tmp_path: Path) -> None:
    daemon = Daemon(tmp_path / "root", alab.host, "--audit-interval", "1")
    try:
        with daemon.client() as client:
            client.call("filter.define", {"xml": GUEST})
            client.call("binding.create", {"xml": [
                binding_xml(g.portdev, g.mac, g.ip) for g in alab.guests]})
        with daemon.client() as sub, daemon.client() as client:
            sub.subscribe(["audit", "drift-repaired"])
            stream = Stream(sub)
            # A lasting finding, so that a round is seen to have run.
            client.call("filter.define", {"xml": "<filter name='lonely' chain='root'/>"})
            first = stream.until("lonely", "found")
            assert audit_events(first) == [("lonely", "found", "hygiene.unused-filter")]

            # Drift by hand: a rule of vnet0 deleted.  The nft monitor repairs it.
            chain = "vnet0/from/root"
            text = alab.run(alab.host, ["nft", "-a", "list", "chain", "bridge", "nwfilter",
                                        chain]).stdout
            handle = re.findall(r"comment .* # handle (\d+)$", text, re.M)[0]
            alab.run(alab.host, ["nft", "delete", "rule", "bridge", "nwfilter", chain,
                                 "handle", handle])

            # A port on the bridge with no binding: nothing repairs that.
            alab.run(alab.host, ["ip", "link", "add", "vnet9", "type", "veth", "peer",
                                 "name", "vnet9p"])
            alab.run(alab.host, ["ip", "link", "set", "vnet9", "master", alab.bridge, "up"])
            middle = stream.until("vnet9", "found")
            assert any(e.kind.value == "drift-repaired" for e in middle)
            assert audit_events(middle)[-1] == (
                "vnet9", "found", "precondition.unbound-bridge-port")
            finding = middle[-1].details["finding"]
            assert finding["port"] == "vnet9" and alab.bridge in finding["message"]

            # Later rounds do not tell the lasting findings again.
            client.call("filter.define", {"xml": "<filter name='lonely2' chain='root'/>"})
            later = stream.until("lonely2", "found")
            # Binding the port resolves its finding.
            client.call("binding.create", {"xml": [
                binding_xml("vnet9", "52:54:00:00:00:09", "10.77.0.19")]})
            last = stream.until("vnet9", "resolved")
            assert audit_events(last)[-1] == (
                "vnet9", "resolved", "precondition.unbound-bridge-port")
    finally:
        daemon.stop()
    told = audit_events(stream.seen)
    lasting = [t for t in told if not t[2].startswith("drift.")]
    assert lasting == [
        ("lonely", "found", "hygiene.unused-filter"),
        ("vnet9", "found", "precondition.unbound-bridge-port"),
        ("lonely2", "found", "hygiene.unused-filter"),
        ("vnet9", "resolved", "precondition.unbound-bridge-port"),
    ], told
    # The deleted rule: never seen, or seen and then resolved by the repair.
    drift = [t for t in told if t[2].startswith("drift.")]
    assert all(t[0] == "vnet0" for t in drift), drift
    found = sorted((t[0], t[2]) for t in drift if t[1] == "found")
    assert found == sorted((t[0], t[2]) for t in drift if t[1] == "resolved"), drift
    assert later[-1].details["finding"]["kind"] == "hygiene.unused-filter"
