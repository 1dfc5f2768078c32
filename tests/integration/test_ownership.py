"""One namespace, one owning root; a root writes only into the host it recorded.

Two state roots on one namespace used to erase each other's rules (each
start replaces the tables wholesale), and a command without `--netns`, or
with another one, wrote a root's whole ruleset into that namespace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwfilter.backends.base import Owner
from nwfilter.backends.nft import NftBackend
from nwfilter.cli import main
from nwfilter.client import Client
from nwfilter.daemon import Server, close, serve
from nwfilter.errors import ConflictError
from nwfilter.ir import Changes
from tests.integration.conftest import BridgeLab, Guest
from tests.nft_rulesets import clean_traffic

pytestmark = [pytest.mark.root, pytest.mark.netns]

REPO = Path(__file__).resolve().parents[2]


def binding_xml(g: Guest, filter_name: str = "no-mac-spoofing") -> str:
    return (
        f"<filterbinding><owner><name>vm-{g.portdev}</name>"
        f"<uuid>c2a3f1a2-8d4e-4a51-9a9e-2f6f1d8e7a1{g.portdev[-1]}</uuid></owner>"
        f"<portdev name='{g.portdev}'/><mac address='{g.mac}'/>"
        f"<filterref filter='{filter_name}'/></filterbinding>"
    )


def write_binding(tmp_path: Path, g: Guest) -> str:
    path = tmp_path / f"{g.portdev}.xml"
    path.write_text(binding_xml(g))
    return str(path)


def from_vm_ports(lab: BridgeLab, ns: str) -> list[str]:
    """The ports in our bridge dispatch map in `ns` ([] without our table)."""
    proc = lab.run(ns, ["nft", "-j", "list", "map", "bridge", "nwfilter", "from_vm"],
                   check=False)
    if proc.returncode != 0:
        return []
    for item in json.loads(proc.stdout)["nftables"]:
        if "map" in item:
            return sorted(e[0] for e in item["map"].get("elem", []))
    return []


def cli(root: Path, *args: str) -> int:
    return main(["--root", str(root), *args])


def test_second_root_is_refused_and_first_keeps_its_rules(
    lab: BridgeLab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    g0, g1 = lab.guests
    root_a, root_b = tmp_path / "a", tmp_path / "b"
    assert cli(root_a, "--netns", lab.host, "nwfilter-binding-create",
               write_binding(tmp_path, g0)) == 0
    capsys.readouterr()
    status = cli(root_b, "--netns", lab.host, "nwfilter-binding-create",
                 write_binding(tmp_path, g1))
    err = capsys.readouterr().err
    assert status == 4
    assert str(root_a.absolute()) in err and "owned by" in err
    assert from_vm_ports(lab, lab.host) == ["vnet0"]
    # Root A still lists and controls its binding.
    assert cli(root_a, "nwfilter-binding-list") == 0
    assert "vnet0" in capsys.readouterr().out
    assert cli(root_a, "nwfilter-binding-delete", "vnet0") == 0
    assert from_vm_ports(lab, lab.host) == []
    # With A's tables gone, B may take the namespace.
    assert cli(root_b, "--netns", lab.host, "nwfilter-binding-create",
               write_binding(tmp_path, g1)) == 0
    assert from_vm_ports(lab, lab.host) == ["vnet1"]
    assert cli(root_b, "nwfilter-binding-delete", "vnet1") == 0


@pytest.fixture
def daemon_a(lab: BridgeLab, tmp_path: Path) -> Iterator[Server]:
    srv = serve(tmp_path / "a", "nft", lab.host, tmp_path / "a.sock")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        srv.engine.backend.clear_all()
        close(srv)
        thread.join(5)


def test_daemon_of_one_root_and_a_bind_under_another(
    lab: BridgeLab, tmp_path: Path, daemon_a: Server, capsys: pytest.CaptureFixture[str]
) -> None:
    g0, g1 = lab.guests
    with Client(daemon_a.path) as client:
        client.call("binding.create", {"xml": [binding_xml(g0)]})
    capsys.readouterr()
    status = cli(tmp_path / "b", "--netns", lab.host, "nwfilter-binding-create",
                 write_binding(tmp_path, g1))
    assert status == 4 and "owned by" in capsys.readouterr().err
    # Give the daemon's monitor the time it would need to "repair" anything.
    time.sleep(0.5)
    assert from_vm_ports(lab, lab.host) == ["vnet0"]
    assert daemon_a.monitor is not None and daemon_a.monitor.repairs == 0
    with Client(daemon_a.path) as client:
        assert [b["portdev"] for b in client.call("binding.list")] == ["vnet0"]


def test_a_flush_then_another_root_the_monitor_repairs_nothing_of_theirs(
    lab: BridgeLab, tmp_path: Path, daemon_a: Server
) -> None:
    """After a flush, whoever claims the namespace first owns it; the
    daemon's repair then refuses instead of erasing the other root."""
    g0 = lab.guests[0]
    with Client(daemon_a.path) as client:
        client.call("binding.create", {"xml": [binding_xml(g0)]})
    elsewhere = Owner("/elsewhere", "f" * 32)
    # Flush and claim in one transaction, so the daemon cannot win the race.
    script = ("flush ruleset\nadd table bridge nwfilter\n"
              "add chain bridge nwfilter owner\n"
              f'add rule bridge nwfilter owner counter comment "{elsewhere.label()}"\n')
    proc = subprocess.run(["ip", "netns", "exec", lab.host, "nft", "-f", "-"], input=script,
                          text=True, capture_output=True, timeout=10)
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 3
    monitor = daemon_a.monitor
    assert monitor is not None
    while time.monotonic() < deadline and monitor.last_error is None:
        time.sleep(0.05)
    assert isinstance(monitor.last_error, ConflictError)
    assert NftBackend(netns=lab.host).owner() == elsewhere
    assert from_vm_ports(lab, lab.host) == []
    lab.run(lab.host, ["nft", "flush", "ruleset"])


def test_wrong_netns_is_refused(
    lab: BridgeLab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    g0, g1 = lab.guests
    other = lab.lab.add_ns("other")
    root = tmp_path / "a"
    assert cli(root, "--netns", lab.host, "nwfilter-binding-create",
               write_binding(tmp_path, g0)) == 0
    capsys.readouterr()
    status = cli(root, "--netns", other, "nwfilter-binding-create", write_binding(tmp_path, g1))
    err = capsys.readouterr().err
    assert status == 4
    assert f"namespace '{lab.host}'" in err and f"namespace '{other}'" in err
    assert "host-move" in err
    assert lab.run(other, ["nft", "list", "ruleset"]).stdout == ""
    assert cli(root, "nwfilter-binding-delete", "vnet0") == 0


def test_forgotten_netns_uses_the_recorded_one(lab: BridgeLab, tmp_path: Path) -> None:
    """A command without --netns acts on the recorded namespace, never on the
    namespace it runs in (here a lab namespace standing for the host's)."""
    g0, g1 = lab.guests
    other = lab.lab.add_ns("other")
    root = tmp_path / "a"
    assert cli(root, "--netns", lab.host, "nwfilter-binding-create",
               write_binding(tmp_path, g0)) == 0
    env = {k: v for k, v in os.environ.items() if not k.startswith("NWFILTER_")}
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.run(
        ["ip", "netns", "exec", other, sys.executable, "-m", "nwfilter.cli", "--root",
         str(root), "nwfilter-binding-create", write_binding(tmp_path, g1)],
        capture_output=True, text=True, env=env, timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert from_vm_ports(lab, lab.host) == ["vnet0", "vnet1"]
    assert lab.run(other, ["nft", "list", "ruleset"]).stdout == ""
    assert cli(root, "nwfilter-binding-delete", "vnet0") == 0
    assert cli(root, "nwfilter-binding-delete", "vnet1") == 0


def test_host_move_takes_the_rules_along(
    lab: BridgeLab, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    g0 = lab.guests[0]
    other = lab.lab.add_ns("other")
    root = tmp_path / "a"
    assert cli(root, "--netns", lab.host, "nwfilter-binding-create",
               write_binding(tmp_path, g0)) == 0
    assert cli(root, "host-move", "--netns", other) == 0
    assert from_vm_ports(lab, lab.host) == []
    assert from_vm_ports(lab, other) == ["vnet0"]
    capsys.readouterr()
    assert cli(root, "--netns", lab.host, "nwfilter-binding-list") == 4
    assert cli(root, "nwfilter-binding-delete", "vnet0") == 0
    assert from_vm_ports(lab, other) == []


def test_two_first_claims_race_to_one_owner(lab: BridgeLab) -> None:
    g0 = lab.guests[0]
    backends = []
    for n in range(2):
        backend = NftBackend(netns=lab.host)
        backend.set_owner(Owner(f"/root{n}", f"{n:032x}"))
        backend.probe()
        backends.append(backend)
    barrier = threading.Barrier(2)
    outcome: dict[int, str] = {}

    def start(n: int) -> None:
        barrier.wait()
        try:
            backends[n].apply(Changes(set=(clean_traffic(g0.portdev, g0.mac, g0.ip),),
                                      replace_all=True))
            outcome[n] = "won"
        except ConflictError:
            outcome[n] = "refused"

    threads = [threading.Thread(target=start, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert sorted(outcome.values()) == ["refused", "won"]
    winner = next(n for n, what in outcome.items() if what == "won")
    assert backends[1 - winner].owner() == Owner(f"/root{winner}", f"{winner:032x}")
    backends[winner].clear_all()
    assert backends[0].owner() is None
