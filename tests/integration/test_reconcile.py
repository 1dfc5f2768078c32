"""Engine start reconciles the kernel with the bindings: it reads our two
tables back and writes only what differs.  `nft monitor`, run inside the
lab's namespace, records every transaction, so "nothing written" is seen,
not inferred."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nwfilter.backends.nft import NftBackend, render
from nwfilter.backends.nft.monitor import NftMonitor
from nwfilter.compile import Compiler
from nwfilter.conf.model import BindingDef, FilterRef, Parameter
from nwfilter.daemon import close, serve
from nwfilter.engine import Engine
from nwfilter.ir import Ruleset
from nwfilter.netlab import NetLab
from nwfilter.netns import in_netns
from tests.integration.conftest import HOST_IP, BridgeLab, build_bridge_lab
from tests.nft_rulesets import uncounted

pytestmark = [pytest.mark.root, pytest.mark.netns]

REPO = Path(__file__).resolve().parents[2]
STOCK = REPO / "filters"
LIMIT = """<filter name='conn-limit' chain='root'>
  <rule action='drop' direction='in' priority='100'>
    <tcp dstportstart='8080' connlimit-above='3'/>
  </rule>
  <rule action='accept' direction='inout' priority='500'>
    <all/>
  </rule>
</filter>"""
BLOCKED = """<filter name='block-set' chain='root'>
  <rule action='drop' direction='in' priority='100'>
    <all ipset='blocked' ipsetflags='src'/>
  </rule>
  <filterref filter='clean-traffic'/>
</filter>"""


@pytest.fixture
def lab3() -> Iterator[BridgeLab]:
    with NetLab() as netlab:
        yield build_bridge_lab(netlab, n_guests=3)


class NftEvents:
    """`nft monitor` in a namespace, captured to a file.  `take()` returns
    the events on our tables since the last call, once a marker transaction
    on a table of its own shows that everything before it was written."""

    def __init__(self, lab: BridgeLab, path: Path) -> None:
        self.lab = lab
        self.path = path
        self._seen = 0
        self._marks = 0
        self._out = path.open("w")
        self.proc = subprocess.Popen(
            ["ip", "netns", "exec", lab.host, "nft", "monitor"],
            stdout=self._out, stderr=subprocess.STDOUT)
        self.take()

    def _lines(self) -> list[str]:
        return self.path.read_text().splitlines()

    def take(self) -> list[str]:
        self._marks += 1
        mark = f"nwt_mark{self._marks}"
        deadline = time.monotonic() + 10
        while True:
            self.lab.run(self.lab.host, ["nft", "add", "table", "ip", mark])
            self.lab.run(self.lab.host, ["nft", "delete", "table", "ip", mark])
            for _ in range(20):
                lines = self._lines()
                hits = [i for i, line in enumerate(lines) if mark in line]
                if hits:
                    new = [line for line in lines[self._seen:hits[0]] if " nwfilter " in line]
                    self._seen = hits[-1] + 1
                    return new
                time.sleep(0.05)
            assert time.monotonic() < deadline, "nft monitor shows no events"

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(5)
        self._out.close()


@pytest.fixture
def events(lab3: BridgeLab, tmp_path: Path) -> Iterator[NftEvents]:
    watch = NftEvents(lab3, tmp_path / "monitor.txt")
    try:
        yield watch
    finally:
        watch.close()


def new_engine(root: Path, lab: BridgeLab) -> Engine:
    return Engine(root, NftBackend(netns=lab.host), stock_dir=STOCK)


def binding(portdev: str, mac: str, flt: str, ip: str | None = None) -> BindingDef:
    params = (Parameter("IP", ip),) if ip else ()
    return BindingDef(f"vm-{portdev}", uuid.uuid4(), portdev, mac, FilterRef(flt, params))


def listing(lab: BridgeLab) -> dict[str, Any]:
    """Both tables with handles: equal listings mean no object was recreated.
    Counter values are left out (traffic moves them); `counts` has them."""
    out = {}
    for family in ("bridge", "inet"):
        text = lab.run(lab.host, ["nft", "-a", "-j", "list", "table", family, "nwfilter"]).stdout
        items = [x for x in json.loads(text)["nftables"] if "metainfo" not in x]
        for item in items:
            if "rule" in item:
                item["rule"]["expr"] = [{"counter": "..."} if "counter" in e else e
                                        for e in item["rule"]["expr"]]
        out[family] = items
    return out


def counts(lab: BridgeLab) -> dict[tuple[str, int], int]:
    """(family, rule handle) -> packets, for every rule with a counter."""
    out = {}
    for family in ("bridge", "inet"):
        text = lab.run(lab.host, ["nft", "-a", "-j", "list", "table", family, "nwfilter"]).stdout
        for item in json.loads(text)["nftables"]:
            for expr in item.get("rule", {}).get("expr", ()):
                if "counter" in expr:
                    out[(family, item["rule"]["handle"])] = expr["counter"]["packets"]
    return out


def elements(lab: BridgeLab, family: str, name: str) -> list[Any]:
    kind = "set" if name.startswith(("cl", "ipset")) else "map"
    found = lab.run(lab.host, ["nft", "-j", "list", kind, family, "nwfilter", name], check=False)
    if found.returncode != 0:
        return []  # no tables: no bound port
    for item in json.loads(found.stdout)["nftables"]:
        body = item.get("set") or item.get("map")
        if body is not None:
            return list(body.get("elem", []))
    return []


def connlimit_sets(lab: BridgeLab) -> list[str]:
    text = lab.run(lab.host, ["nft", "-j", "list", "sets", "inet"]).stdout
    return sorted(x["set"]["name"] for x in json.loads(text)["nftables"]
                  if "set" in x and x["set"]["name"].startswith("cl"))


def cli(root: Path, lab: BridgeLab, *argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run(
        [sys.executable, "-m", "nwfilter.cli", "--root", str(root), "--backend", "nft",
         "--netns", lab.host, *argv], capture_output=True, text=True, timeout=60, env=env,
        check=True)


def open_connections(lab: BridgeLab, client: int, server: int, count: int,
                     held: list[socket.socket]) -> None:
    """`count` TCP connections from guest `client` to port 8080 of guest `server`."""
    dst = lab.guests[server]
    with in_netns(dst.ns):
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((dst.ip, 8080))
    srv.listen(16)
    held.append(srv)
    for _ in range(count):
        with in_netns(lab.guests[client].ns):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.settimeout(2)
        sock.connect((dst.ip, 8080))
        held.append(sock)
        conn, _ = srv.accept()
        held.append(conn)


def bind_three(root: Path, lab: BridgeLab) -> None:
    g0, g1, g2 = lab.guests
    engine = new_engine(root, lab)
    engine.start()
    try:
        engine.define_filter(LIMIT)
        engine.define_filter(BLOCKED)
        engine.create_bindings([
            binding(g0.portdev, g0.mac, "clean-traffic", g0.ip),
            binding(g1.portdev, g1.mac, "conn-limit"),
            binding(g2.portdev, g2.mac, "block-set", g2.ip),
        ])
    finally:
        engine.close()
    lab.run(lab.host, ["nft", "add", "element", "inet", "nwfilter", "ipset4_blocked",
                       "{ 192.0.2.0/24 }"])


def test_restart_and_commands_write_nothing_but_the_new_port(
    lab3: BridgeLab, events: NftEvents, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    bind_three(root, lab3)
    held: list[socket.socket] = []
    try:
        open_connections(lab3, 0, 1, 2, held)
        assert events.take()  # the setup wrote, and the monitor saw it
        before = listing(lab3)
        packets = counts(lab3)
        assert sum(packets.values()) > 0, "the rules counted the connections' packets"
        counted = elements(lab3, "inet", connlimit_sets(lab3)[0])
        assert counted, "the connlimit set counts the open connections"

        engine = new_engine(root, lab3)
        assert engine.start() == []
        engine.close()
        assert events.take() == []
        cli(root, lab3, "nwfilter-list")
        cli(root, lab3, "nwfilter-binding-list")
        assert events.take() == []
        assert listing(lab3) == before  # same objects, same handles, same elements
        later = counts(lab3)
        assert later.keys() == packets.keys()
        assert all(later[key] >= packets[key] for key in packets)  # counters survive

        xml = tmp_path / "vnet9.xml"
        xml.write_text(
            "<filterbinding><owner><name>vm9</name>"
            "<uuid>c2a3f1a2-8d4e-4a51-9a9e-2f6f1d8e7a19</uuid></owner>"
            "<portdev name='vnet9'/><mac address='52:54:00:00:00:09'/>"
            "<filterref filter='conn-limit'/></filterbinding>")
        cli(root, lab3, "nwfilter-binding-create", str(xml))
        added = events.take()
        assert added and all("vnet9" in line for line in added), added
        after = listing(lab3)
        for family in ("bridge", "inet"):
            old = [json.dumps(x, sort_keys=True) for x in before[family]
                   if "map" not in x and "set" not in x]
            new = {json.dumps(x, sort_keys=True) for x in after[family]}
            assert [x for x in old if x not in new] == []  # every object of before is kept
        # port ids (the layer-3 dispatch keys) of the old ports are unchanged
        for vmap in ("l3_from", "l3_to"):
            old_elems = elements_of(before, vmap)
            new_elems = elements_of(after, vmap)
            assert {k: v for k, v in new_elems.items() if "vnet9" not in v} == old_elems
        assert elements(lab3, "inet", connlimit_sets(lab3)[0]) == counted
        assert elements(lab3, "inet", "ipset4_blocked")
    finally:
        for sock in held:
            sock.close()


def elements_of(tables: dict[str, Any], vmap: str) -> dict[int, str]:
    for item in tables["inet"]:
        if "map" in item and item["map"]["name"] == vmap:
            return {k: json.dumps(v) for k, v in item["map"].get("elem", [])}
    return {}


def test_open_connection_survives_engine_and_daemon_restarts(
    lab3: BridgeLab, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    bind_three(root, lab3)
    guest = lab3.guests[1]  # conn-limit: layer-3 rules and conntrack
    with in_netns(lab3.host):
        srv = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((HOST_IP, 9000))
    srv.listen(1)
    with in_netns(guest.ns):
        client = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    client.settimeout(2)
    try:
        client.connect((HOST_IP, 9000))
        conn, _ = srv.accept()
        conn.settimeout(2)

        def echo(payload: bytes) -> None:
            client.sendall(payload)
            assert conn.recv(64) == payload
            conn.sendall(payload[::-1])
            assert client.recv(64) == payload[::-1]

        echo(b"before")
        engine = new_engine(root, lab3)
        engine.start()
        echo(b"during")
        engine.close()
        echo(b"engine-restarted")
        for round_ in range(2):
            daemon = serve(root, "nft", lab3.host, tmp_path / f"d{round_}.sock")
            thread = threading.Thread(target=daemon.serve_forever, daemon=True)
            thread.start()
            echo(b"daemon-%d" % round_)
            daemon.shutdown()
            close(daemon)
            thread.join(5)
        echo(b"after")
    finally:
        client.close()
        srv.close()


def _last_handle(lab: BridgeLab, family: str, chain: str) -> str:
    text = lab.run(lab.host, ["nft", "-a", "list", "chain", family, "nwfilter", chain]).stdout
    lines = [line for line in text.splitlines() if "# handle" in line]
    return lines[-1].rsplit("# handle ", 1)[1].strip()


def test_drift_is_repaired_and_nothing_else_is_written(
    lab3: BridgeLab, events: NftEvents, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    bind_three(root, lab3)
    p0, p1 = lab3.guests[0].portdev, lab3.guests[1].portdev
    nft = ["nft"]
    # (what, commands done by hand, a word every repair event holds)
    cases = [
        ("a deleted rule",
         [[*nft, "delete", "rule", "bridge", "nwfilter", f"{p0}/from/mac", "handle",
           _last_handle(lab3, "bridge", f"{p0}/from/mac")]], f"{p0}/from/mac"),
        ("a deleted chain",
         [[*nft, "flush", "chain", "bridge", "nwfilter", f"{p0}/from/root"],
          [*nft, "delete", "chain", "bridge", "nwfilter", f"{p0}/from/arp-ip"]], f"{p0}/from/"),
        ("a deleted map element",
         [[*nft, "delete", "element", "bridge", "nwfilter", "to_vm", f"{{ {p1} }}"]],
         f"{p1}/to/root"),
        ("a flushed chain", [[*nft, "flush", "chain", "inet", "nwfilter", f"{p1}/to"]], p1),
    ]
    events.take()
    before = listing(lab3)
    for what, commands, word in cases:
        for command in commands:
            lab3.run(lab3.host, command)
        assert events.take(), f"{what}: the edit was not seen"
        engine = new_engine(root, lab3)
        engine.start()
        engine.close()
        repaired = events.take()
        assert repaired, f"{what}: nothing was repaired"
        assert all(word in line for line in repaired), (what, repaired)
        again = new_engine(root, lab3)
        again.start()
        again.close()
        assert events.take() == [], f"{what}: a second start still writes"
    # every object the edits did not touch kept its handle
    after = {json.dumps(x, sort_keys=True) for x in after_objects(listing(lab3))}
    untouched = [x for x in after_objects(before)
                 if p0 not in json.dumps(x) and p1 not in json.dumps(x)]
    assert untouched
    assert [x for x in untouched if json.dumps(x, sort_keys=True) not in after] == []


def after_objects(tables: dict[str, Any]) -> list[Any]:
    """Chains, rules and sets (maps hold every port's elements)."""
    return [x for family in ("bridge", "inet") for x in tables[family] if "map" not in x]


STREAM = """
import random, sys
from nwfilter import cli
root, ns, seed = sys.argv[1], sys.argv[2], int(sys.argv[3])
rng = random.Random(seed)
base = ["--root", root, "--backend", "nft", "--netns", ns, "-q"]
flt = "<filter name='churn' chain='root'><rule action='accept' direction='out' " \\
      "priority='{p}'><mac srcmacaddr='52:54:00:00:00:{m:02x}'/></rule>" \\
      "<filterref filter='clean-traffic'/></filter>"
i = 0
while True:
    i += 1
    port = f"vk{rng.randrange(12)}"
    what = rng.random()
    if what < 0.45:
        path = f"{root}.{port}.xml"
        with open(path, "w") as out:
            out.write("<filterbinding><owner><name>vm</name>"
                      "<uuid>c2a3f1a2-8d4e-4a51-9a9e-2f6f1d8e7a19</uuid></owner>"
                      f"<portdev name='{port}'/><mac address='52:54:00:00:01:01'/>"
                      "<filterref filter='churn'><parameter name='IP' value='10.1.0.1'/>"
                      "</filterref></filterbinding>")
        cli.main([*base, "nwfilter-binding-create", path])
    elif what < 0.8:
        cli.main([*base, "nwfilter-binding-delete", port])
    else:
        path = f"{root}.churn.xml"
        with open(path, "w") as out:
            out.write(flt.format(p=rng.randrange(100, 900), m=rng.randrange(256)))
        cli.main([*base, "nwfilter-define", path])
"""


def test_kill_at_random_moments_leaves_the_kernel_as_the_records_say(
    lab3: BridgeLab, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    script = tmp_path / "stream.py"
    script.write_text(STREAM)
    (tmp_path / "churn0.xml").write_text(
        "<filter name='churn' chain='root'><filterref filter='clean-traffic'/></filter>")
    cli(root, lab3, "nwfilter-define", str(tmp_path / "churn0.xml"))
    rng = random.Random(7)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    for attempt in range(6):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(root), lab3.host, str(attempt)],
            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.8, 2.5))
        proc.send_signal(signal.SIGKILL)
        proc.wait(5)
        engine = new_engine(root, lab3)
        engine.start()
        try:
            bound = sorted(b.portdev for b in engine.list_bindings())
            backend = engine.backend
            assert isinstance(backend, NftBackend)
            kernel_ports = sorted(key for key, _target in
                                  elements(lab3, "bridge", "from_vm"))
            assert kernel_ports == bound, attempt
            compiler = Compiler(engine.pool.snapshot())
            wanted = [compiler.compile(b, None) for b in engine.list_bindings()]
            assert backend.recorded() == {rs.port.portdev: rs for rs in wanted}
            # the kernel holds exactly what the records render to
            assert backend.reconcile(wanted) == 0, attempt
        finally:
            engine.close()


def test_monitor_repairs_a_foreign_edit_that_keeps_our_comment(
    lab3: BridgeLab, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    bind_three(root, lab3)
    p0 = lab3.guests[0].portdev
    chain = f"{p0}/from/mac"
    held: list[socket.socket] = []
    engine = new_engine(root, lab3)
    engine.start()
    try:
        open_connections(lab3, 0, 1, 2, held)
        counted = elements(lab3, "inet", connlimit_sets(lab3)[0])
        before = after_objects(listing(lab3))
        backend = engine.backend
        assert isinstance(backend, NftBackend)
        with NftMonitor.for_backend(backend) as monitor:
            text = lab3.run(lab3.host, ["nft", "-a", "-j", "list", "chain", "bridge",
                                        "nwfilter", chain]).stdout
            last = [x["rule"] for x in json.loads(text)["nftables"] if "rule" in x][-1]
            assert last["expr"][-1] == {"drop": None}
            # The rule now accepts, under the comment (and digest) of ours.
            lab3.run(lab3.host, ["nft", "replace", "rule", "bridge", "nwfilter", chain,
                                 "handle", str(last["handle"]), "accept", "comment",
                                 json.dumps(last["comment"])])

            def dropping() -> bool:
                out = lab3.run(lab3.host, ["nft", "list", "chain", "bridge", "nwfilter",
                                           chain]).stdout
                return "drop comment" in out

            deadline = time.monotonic() + 3
            while time.monotonic() < deadline and not dropping():
                time.sleep(0.05)
            assert dropping(), "the foreign rule was not repaired"
            assert monitor.repairs >= 1 and monitor.last_error is None
        # the repair rewrote that chain only: everything else kept its handle
        now = {json.dumps(x, sort_keys=True) for x in after_objects(listing(lab3))}
        untouched = [x for x in before if chain not in json.dumps(x)]
        assert [x for x in untouched if json.dumps(x, sort_keys=True) not in now] == []
        assert elements(lab3, "inet", connlimit_sets(lab3)[0]) == counted
    finally:
        engine.close()
        for sock in held:
            sock.close()


def stamps(lab: BridgeLab) -> dict[str, str]:
    """Each bound port's stamp, as its stamp chain lists it."""
    out = {}
    for guest in lab.guests:
        found = lab.run(lab.host, ["nft", "list", "chain", "bridge", "nwfilter",
                                   f"{guest.portdev}/stamp"], check=False)
        if found.returncode == 0:
            out[guest.portdev] = found.stdout.split(render.STAMP_TAG, 1)[1].split('"')[0]
    return out


@pytest.fixture
def rendered(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[str]]:
    """The ports the nft renderer renders (the real renderer, counted)."""
    seen: list[str] = []
    real = render.render_port

    def counting(ruleset: Ruleset, *args: Any, **kwargs: Any) -> Any:
        seen.append(ruleset.port.portdev)
        return real(ruleset, *args, **kwargs)

    monkeypatch.setattr(render, "render_port", counting)
    render.renderer_salt.cache_clear()
    yield seen
    monkeypatch.undo()
    render.renderer_salt.cache_clear()


@pytest.fixture
def compiles(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The bindings the compiler compiles (the real compiler, counted)."""
    seen: list[str] = []
    real = Compiler.compile

    def counting(self: Compiler, binding: BindingDef, *args: Any, **kwargs: Any) -> Ruleset:
        seen.append(binding.portdev)
        return real(self, binding, *args, **kwargs)

    monkeypatch.setattr(Compiler, "compile", counting)
    return seen


def restart(root: Path, lab: BridgeLab) -> None:
    engine = new_engine(root, lab)
    try:
        assert engine.start() == []
    finally:
        engine.close()


def test_a_start_renders_no_port_whose_stamp_proves_it(
    lab3: BridgeLab, events: NftEvents, tmp_path: Path, rendered: list[str],
    compiles: list[str],
) -> None:
    root = tmp_path / "root"
    bind_three(root, lab3)
    assert sorted(stamps(lab3)) == sorted(g.portdev for g in lab3.guests)
    events.take()
    restart(root, lab3)  # the first start records what each binding compiles to
    rendered.clear()
    compiles.clear()
    restart(root, lab3)
    assert rendered == [] and compiles == [] and events.take() == []
    # what a deferred compile gives, when asked for, is what the kernel holds
    engine = new_engine(root, lab3)
    engine.start()
    try:
        assert compiles == []
        fresh = Compiler(engine.pool.snapshot())
        assert dict(engine.backend.recorded()) == {
            b.portdev: fresh.compile(b, None) for b in engine.list_bindings()}
    finally:
        engine.close()
    # A port bound since, sorting first, takes the smallest free port id at
    # the next start: ports without layer-3 rules (clean-traffic) hold no
    # id in the kernel and get another one, and still need no render.
    engine = new_engine(root, lab3)
    engine.start()
    try:
        engine.create_bindings([binding("aaa0", "52:54:00:00:0a:01", "clean-traffic")])
    finally:
        engine.close()
    events.take()
    rendered.clear()
    restart(root, lab3)
    assert rendered == [] and events.take() == []


def test_a_chain_edited_by_hand_under_an_intact_stamp_is_repaired(
    lab3: BridgeLab, events: NftEvents, tmp_path: Path, rendered: list[str]
) -> None:
    root = tmp_path / "root"
    bind_three(root, lab3)
    p0, p2 = lab3.guests[0].portdev, lab3.guests[2].portdev
    held = stamps(lab3)
    restart(root, lab3)  # each port's compile deferred from now on
    for chain, edit in (
        (f"{p0}/from/mac", ["delete", "rule", "bridge", "nwfilter", f"{p0}/from/mac",
                            "handle", _last_handle(lab3, "bridge", f"{p0}/from/mac")]),
        (f"{p2}/stamp", ["flush", "chain", "bridge", "nwfilter", f"{p2}/stamp"]),
    ):
        lab3.run(lab3.host, ["nft", *edit])
        events.take()
        rendered.clear()
        restart(root, lab3)
        repaired = events.take()
        assert repaired and all(chain in line for line in repaired), (chain, repaired)
        assert rendered == [chain.split("/")[0]]  # the other ports were proven
        assert stamps(lab3) == held
        restart(root, lab3)
        assert events.take() == []


def test_a_filter_edit_changes_the_stamps_of_exactly_the_ports_it_reaches(
    lab3: BridgeLab, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    bind_three(root, lab3)
    p0, p1, p2 = (g.portdev for g in lab3.guests)  # clean-traffic, conn-limit, block-set
    engine = new_engine(root, lab3)
    engine.start()
    try:
        before = stamps(lab3)
        limit = engine.pool.get("conn-limit")
        assert limit is not None
        engine.define_filter(LIMIT.replace("connlimit-above='3'", "connlimit-above='5'").replace(
            "<rule ", f"<uuid>{limit.uuid}</uuid><rule ", 1))
        after = stamps(lab3)
        assert [p for p in before if before[p] != after[p]] == [p1]
        # clean-traffic reaches allow-incoming-ipv4; block-set reaches clean-traffic
        text = (STOCK / "allow-incoming-ipv4.xml").read_text()
        engine.define_filter(text.replace("<rule ", "<rule priority='600' ", 1))
        again = stamps(lab3)
        assert sorted(p for p in after if after[p] != again[p]) == sorted([p0, p2])
    finally:
        engine.close()


def test_a_renderer_salt_change_renders_every_port_again(
    lab3: BridgeLab, events: NftEvents, tmp_path: Path, rendered: list[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    root = tmp_path / "root"
    bind_three(root, lab3)
    held = stamps(lab3)
    before = listing(lab3)
    events.take()
    monkeypatch.setattr(render, "RENDER_VERSION", render.RENDER_VERSION + 1)
    render.renderer_salt.cache_clear()
    rendered.clear()
    restart(root, lab3)
    assert sorted(rendered) == sorted(held)
    written = events.take()
    # the rules render the same: only the stamps are written again
    assert written and all("/stamp" in line for line in written), written
    now = stamps(lab3)
    assert all(now[p] != held[p] for p in held)
    untouched = [x for x in after_objects(before) if "/stamp" not in json.dumps(x)]
    kept = {json.dumps(x, sort_keys=True) for x in after_objects(listing(lab3))}
    assert [x for x in untouched if json.dumps(x, sort_keys=True) not in kept] == []
    rendered.clear()
    restart(root, lab3)
    assert rendered == [] and events.take() == []


def _as_written_without_counters(root: Path, lab: BridgeLab, path: Path) -> None:
    """Rewrite every port's chains as a renderer without counters wrote
    them (RENDER_VERSION 1): the same rules less their `counter` and less
    the root chains' entry counters, with the digests and stamps that
    renderer gave them."""
    engine = new_engine(root, lab)
    engine.start()
    try:
        backend = engine.backend
        assert isinstance(backend, NftBackend)
        caps = backend.capabilities()
        batch = render.Batch()
        for portdev in backend.ports():
            held = backend.record(portdev)
            assert held is not None
            ruleset, record = held
            _b, record = render.render_port(ruleset, record.port_id, None, caps)
            digests: dict[tuple[str, str], tuple[str, ...]] = {}
            for (family, name), rules in sorted(record.contents.items()):
                if name.endswith("/" + render.STAMP_CHAIN):
                    continue
                batch.add({"flush": {"chain": {"family": family, "table": "nwfilter",
                                               "name": name}}})
                sigs = []
                for exprs, origin in rules:
                    if origin == render.ENTRY_TEXT:
                        continue
                    old = [e for e in exprs if e != render.COUNTER]
                    text = origin if origin is not None else render.port_id_comment(
                        record.port_id)
                    sigs.append(render.digest(old, text))
                    batch.add(render._rule(family, name, old, text))
                digests[(family, name)] = tuple(sigs)
            version = render.RENDER_VERSION
            try:
                render.RENDER_VERSION = 1
                render.renderer_salt.cache_clear()
                stamp = render.stamp_comment(ruleset, record.port_id, caps, digests)
            finally:
                render.RENDER_VERSION = version
                render.renderer_salt.cache_clear()
            name = render.stamp_chain_name(portdev)
            batch.add({"flush": {"chain": {"family": "bridge", "table": "nwfilter",
                                           "name": name}}})
            batch.add(render._rule("bridge", name, [{"continue": None}], stamp))
    finally:
        engine.close()
    path.write_text(json.dumps(batch.document()))
    lab.run(lab.host, ["nft", "-j", "-f", str(path)])


def _uncounted(lab: BridgeLab) -> str:
    return uncounted(lab.run(lab.host, ["nft", "list", "ruleset"]).stdout)


def test_rules_written_without_counters_are_rewritten_once(
    lab3: BridgeLab, events: NftEvents, tmp_path: Path
) -> None:
    root = tmp_path / "root"
    bind_three(root, lab3)
    current = _uncounted(lab3)
    _as_written_without_counters(root, lab3, tmp_path / "old.json")
    older = _uncounted(lab3)
    assert not [line for line in older.splitlines() if "#d=" in line and "counter" in line]
    assert render.ENTRY_TEXT not in older
    events.take()

    restart(root, lab3)  # the first start of the version with counters
    written = events.take()
    assert written
    assert _uncounted(lab3) == current  # exactly what a fresh install holds
    restart(root, lab3)
    assert events.take() == []  # and from then on nothing is written
