"""Events through nwfilterd: `events.subscribe` streams what the engine and
the domains did, in order; a subscriber that stops reading is dropped
without holding the others back or growing the daemon's memory; `nwfilter
event` prints them."""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nwfilter import protocol
from nwfilter.cli import main
from nwfilter.client import Client
from nwfilter.connserver import Limits
from nwfilter.daemon import Server, serve
from nwfilter.errors import UnavailableError, ValidationError
from nwfilter.events import Event, EventBus, EventKind
from tests.unit.test_control_path import BINDING, DOMAIN, FILTER

STREAM_BUFFER = 16 * 1024


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"still waiting for {what}")
        time.sleep(0.01)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Server]:
    srv = serve(tmp_path / "root", "memory", None, None,
                Limits(stream_buffer=STREAM_BUFFER), EventBus(queue_size=64))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    srv.engine.close()
    thread.join(5)


def _events(client: Client, count: int) -> list[Event]:
    out = []
    while len(out) < count:
        event = client.next_event(10)
        assert event is not None, f"only {len(out)} of {count} events came: {out}"
        out.append(event)
    return out


def test_a_subscriber_sees_every_change_in_order(daemon: Server) -> None:
    with Client(daemon.path) as sub, Client(daemon.path) as cli:
        ack = sub.subscribe()
        assert "lifecycle" in ack["kinds"] and "drift-repaired" in ack["kinds"]
        cli.call("filter.define", {"xml": FILTER})
        cli.call("binding.create", {"xml": [BINDING]})
        cli.call("binding.delete", {"portdev": "vnet9"})
        cli.call("domain.define", {"xml": DOMAIN})
        for verb in ("start", "suspend", "resume"):
            cli.call(f"domain.{verb}", {"domain": "vm1"})
        cli.call("filter.define", {"xml": FILTER.replace("'80'", "'8080'")})
        cli.call("domain.destroy", {"domain": "vm1"})
        cli.call("domain.start", {"domain": "vm1"})
        cli.call("domain.shutdown", {"domain": "vm1"})
        cli.call("domain.undefine", {"domain": "vm1"})
        cli.call("filter.undefine", {"name": "web"})
        expected = [
            ("filter-defined", "web", "no port rebuilt"),
            ("binding-created", "vnet9", "filter 'web' for domain 'vm9'"),
            ("binding-deleted", "vnet9", "filter 'web' removed"),
            ("lifecycle", "vm1", "Defined Added"),
            ("binding-created", "vnet1", "filter 'web' for domain 'vm1'"),
            ("lifecycle", "vm1", "Started Booted"),
            ("lifecycle", "vm1", "Suspended Paused"),
            ("lifecycle", "vm1", "Resumed Unpaused"),
            ("filter-defined", "web", "1 port rebuilt"),
            ("rebuild", "web", None),
            ("binding-deleted", "vnet1", "filter 'web' removed"),
            ("lifecycle", "vm1", "Stopped Destroyed"),
            ("binding-created", "vnet1", "filter 'web' for domain 'vm1'"),
            ("lifecycle", "vm1", "Started Booted"),
            ("binding-deleted", "vnet1", "filter 'web' removed"),
            ("lifecycle", "vm1", "Shutdown Finished"),
            ("lifecycle", "vm1", "Stopped Shutdown"),
            ("lifecycle", "vm1", "Undefined Removed"),
            ("filter-undefined", "web", "undefined"),
        ]
        got = _events(sub, len(expected))
        assert [(e.kind.value, e.name, e.text().split(": ", 1)[1]) for e in got] == [
            (k, n, t if t is not None else got[i].text().split(": ", 1)[1])
            for i, (k, n, t) in enumerate(expected)
        ]
        assert [e.seq for e in got] == list(range(1, len(expected) + 1))
        rebuild = got[9]
        assert rebuild.details["ports"] == ["vnet1"] and rebuild.details["ms"] >= 0
        assert got[5].details == {"event": "started", "detail": "booted"}
        assert sub.next_event(0.2) is None  # nothing more


def test_a_subscriber_may_choose_kinds_and_an_unknown_kind_is_refused(daemon: Server) -> None:
    with Client(daemon.path) as sub, Client(daemon.path) as cli:
        with pytest.raises(ValidationError, match="unknown event kind 'bogus'"):
            sub.call("events.subscribe", {"kinds": ["lifecycle", "bogus"]})
        assert sub.subscribe(["lifecycle"]) == {"kinds": ["lifecycle"]}
        cli.call("filter.define", {"xml": FILTER})
        cli.call("domain.define", {"xml": DOMAIN})
        cli.call("domain.start", {"domain": "vm1"})
        got = _events(sub, 2)
        assert [e.text() for e in got] == [
            "event 'lifecycle' for domain 'vm1': Defined Added",
            "event 'lifecycle' for domain 'vm1': Started Booted",
        ]


def test_a_subscriber_that_leaves_is_forgotten(daemon: Server) -> None:
    sub = Client(daemon.path)
    sub.subscribe()
    assert daemon.events.subscriber_count == 1
    sub.close()
    _wait_for(lambda: daemon.events.subscriber_count == 0, "the subscription to go")
    with Client(daemon.path) as cli:  # the daemon is none the worse
        cli.call("filter.define", {"xml": FILTER})


def test_a_stream_ends_when_the_daemon_stops(daemon: Server) -> None:
    with Client(daemon.path) as sub:
        sub.subscribe()
        daemon.shutdown()
        with pytest.raises(UnavailableError, match="closed the event stream"):
            sub.next_event(10)
    assert daemon.events.subscriber_count == 0


def _raw_subscriber(path: Path) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(str(path))
    sock.sendall(protocol.encode({"id": 1, "method": "events.subscribe", "params": {}}))
    ack = b""
    while not ack.endswith(b"\n"):
        ack += sock.recv(1)
    assert json.loads(ack)["result"]["kinds"]
    return sock


def test_a_subscriber_that_never_reads_is_dropped_and_the_others_keep_up(
    daemon: Server,
) -> None:
    bus = daemon.events
    slow = _raw_subscriber(daemon.path)
    fast = Client(daemon.path)
    fast.subscribe()
    received: list[Event] = []
    failure: list[BaseException] = []

    def read_fast() -> None:
        try:
            while len(received) < total:
                event = fast.next_event(30)
                assert event is not None
                received.append(event)
        except BaseException as exc:
            failure.append(exc)

    total, batch = 2000, 50
    reader = threading.Thread(target=read_fast, daemon=True)
    reader.start()
    pad = "x" * 600
    largest = 0
    try:
        for start in range(0, total, batch):
            for i in range(start, start + batch):
                bus.publish(EventKind.BINDING_CREATED, "port", f"vnet{i}",
                            {"filter": "web", "owner": pad})
            _wait_for(lambda n=start + batch: len(received) >= n or bool(failure),
                      "the fast subscriber")
            largest = max([largest, *daemon.pending_output.values()])
        reader.join(10)
        assert not failure, failure
        # The fast one got everything, in order, with no gap.
        assert [e.seq for e in received] == list(range(1, total + 1))
        assert received[-1].name == f"vnet{total - 1}"
        # The slow one was dropped; what the daemon held for it stayed bounded.
        assert bus.subscriber_count == 1 and bus.dropped == 1
        line = len(protocol.encode({"event": received[0].to_json()}))
        assert largest <= STREAM_BUFFER + line
        # What it reads now: the events it had, without a gap, then the notice, then the end.
        slow.settimeout(10)
        data = b""
        while chunk := slow.recv(65536):
            data += chunk
        events = [Event.from_json(json.loads(x)["event"]) for x in data.splitlines()]
        assert events[-1].kind is EventKind.OVERFLOW
        seqs = [e.seq for e in events[:-1]]
        assert seqs == list(range(1, len(seqs) + 1)) and len(seqs) < total
    finally:
        slow.close()
        fast.close()


def test_events_are_allowed_on_a_read_only_connection(daemon: Server) -> None:
    from nwfilter.connserver import Streaming
    from nwfilter.daemon import answer

    line = protocol.encode({"id": 7, "method": "events.subscribe", "params": {}})
    reply, refusal = answer(daemon.context, line, read_only=True)
    assert refusal is None and isinstance(reply, Streaming)
    assert json.loads(reply.reply) == {"id": 7, "result": {"kinds": json.loads(
        reply.reply)["result"]["kinds"]}}
    reply.stream.close()
    assert daemon.events.subscriber_count == 0


def _cli_event(root: Path, args: list[str], out: list[int]) -> threading.Thread:
    thread = threading.Thread(
        target=lambda: out.append(main(["--root", str(root), "event", *args])), daemon=True)
    thread.start()
    return thread


def test_cli_event_json_prints_the_first_event(
    daemon: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status: list[int] = []
    thread = _cli_event(tmp_path / "root", ["--json", "--timeout", "30"], status)
    _wait_for(lambda: daemon.events.subscriber_count == 1, "the command to subscribe")
    with Client(daemon.path) as cli:
        cli.call("filter.define", {"xml": FILTER})
        cli.call("filter.undefine", {"name": "web"})
    thread.join(10)
    assert status == [0]
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 1  # without --loop: the first event only
    event = json.loads(lines[0])
    assert (event["kind"], event["object"], event["name"]) == ("filter-defined", "filter", "web")
    assert event["details"]["created"] is True and event["seq"] == 1


def test_cli_event_loop_prints_virsh_lines_until_the_timeout(
    daemon: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status: list[int] = []
    thread = _cli_event(tmp_path / "root", ["--loop", "--kind", "lifecycle", "--timeout", "3"],
                        status)
    _wait_for(lambda: daemon.events.subscriber_count == 1, "the command to subscribe")
    with Client(daemon.path) as cli:
        cli.call("filter.define", {"xml": FILTER})
        cli.call("domain.define", {"xml": DOMAIN})
        cli.call("domain.start", {"domain": "vm1"})
        cli.call("domain.destroy", {"domain": "vm1"})
    thread.join(10)
    assert status == [0]
    assert capsys.readouterr().out == (
        "event 'lifecycle' for domain 'vm1': Defined Added\n"
        "event 'lifecycle' for domain 'vm1': Started Booted\n"
        "event 'lifecycle' for domain 'vm1': Stopped Destroyed\n"
        "event loop timed out\n"
        "events received: 3\n"
    )


def test_cli_event_without_a_daemon_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "alone"
    assert main(["--root", str(root), "--backend", "memory", "event", "--timeout", "1"]) == 6
    err = capsys.readouterr().err
    assert "events need nwfilterd serving the root" in err and "nwfilterd.sock" in err
    assert not root.exists()  # no engine was started for it


def test_the_embedded_path_refuses_to_subscribe(tmp_path: Path) -> None:
    from nwfilter.commands.context import Context

    ctx = Context(root=str(tmp_path / "r"), backend="memory", netns=None)
    try:
        with pytest.raises(UnavailableError, match="need nwfilterd"):
            ctx.call("events.subscribe")
    finally:
        ctx.close()


def test_requests_sent_on_a_stream_are_not_served(daemon: Server) -> None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(str(daemon.path))
        sock.sendall(
            protocol.encode({"id": 1, "method": "events.subscribe", "params": {}})
            + protocol.encode({"id": 2, "method": "filter.undefine", "params": {"name": "x"}}))
        _wait_for(lambda: daemon.events.subscriber_count == 1, "the subscription")
        sock.sendall(protocol.encode({"id": 3, "method": "filter.list", "params": {}}))
        with Client(daemon.path) as cli:
            cli.call("filter.define", {"xml": FILTER})
        reader = sock.makefile("rb")
        sock.settimeout(10)
        ack, event = protocol.read_message(reader), protocol.read_message(reader)
        assert ack == {"id": 1, "result": ack["result"] if ack else None}
        assert event is not None and event["event"]["name"] == "web"
        sock.settimeout(0.3)
        with pytest.raises(TimeoutError):
            protocol.read_message(reader)  # no reply to 2 or 3
    finally:
        sock.close()


def test_the_read_only_socket_streams_events(tmp_path: Path) -> None:
    ro = tmp_path / "ro.sock"
    srv = serve(tmp_path / "root", "memory", None, None, ro_socket=ro)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        with Client(ro) as sub, Client(srv.path) as cli:
            assert "filter-defined" in sub.subscribe()["kinds"]
            cli.call("filter.define", {"xml": FILTER})
            (event,) = _events(sub, 1)
            assert (event.kind.value, event.name) == ("filter-defined", "web")
    finally:
        srv.shutdown()
        srv.server_close()
        srv.engine.close()
        thread.join(5)
