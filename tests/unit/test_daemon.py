"""The daemon answers over its socket with the engine's results and errors."""

from __future__ import annotations

import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

import nwfilter
from nwfilter import protocol
from nwfilter.client import Client
from nwfilter.connserver import Limits
from nwfilter.daemon import Server, close, serve
from nwfilter.daemon import main as daemon_main
from nwfilter.errors import (
    ERROR_CLASSES,
    ErrorCode,
    NotFoundError,
    NwfilterError,
    UnavailableError,
    ValidationError,
)

FILTER = (
    "<filter name='web' chain='ipv4'>"
    "<rule action='accept' direction='in'><tcp dstportstart='81'/></rule></filter>"
)
BINDING = """<filterbinding>
  <owner><name>vm1</name><uuid>c2a3f1a2-8d4e-4a51-9a9e-2f6f1d8e7a11</uuid></owner>
  <portdev name='vnet0'/>
  <mac address='52:54:00:00:00:01'/>
  <filterref filter='clean-traffic'><parameter name='IP' value='10.0.0.2'/></filterref>
</filterbinding>"""


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = serve(tmp_path / "root", "memory", None, tmp_path / "d.sock")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def test_define_list_dump_undefine(server: Server) -> None:
    with Client(server.path) as client:
        client.call("filter.define", {"xml": FILTER})
        names = [f["name"] for f in client.call("filter.list")]
        assert "web" in names and "clean-traffic" in names
        assert "81" in client.call("filter.dumpxml", {"name": "web"})
        client.call("filter.undefine", {"name": "web"})
        with pytest.raises(NwfilterError) as err:
            client.call("filter.dumpxml", {"name": "web"})
        assert err.value.code is ErrorCode.NOT_FOUND


def test_bindings_and_errors(server: Server) -> None:
    with Client(server.path) as client:
        client.call("binding.create", {"xml": [BINDING]})
        assert client.call("binding.list") == [
            {"portdev": "vnet0", "filter": "clean-traffic", "owner": "vm1",
             "mac": "52:54:00:00:00:01", "enforced": True}
        ]
        dumped = client.call("binding.dumpxml", {"portdev": "vnet0", "rules": True})
        assert "52:54:00:00:00:01" in dumped["rules"]
        with pytest.raises(NwfilterError) as err:
            client.call("binding.create", {"xml": [BINDING]})
        assert err.value.code is ErrorCode.CONFLICT
        with pytest.raises(NwfilterError) as err:
            client.call("no.such.method")
        assert err.value.code is ErrorCode.INVALID
        with pytest.raises(NwfilterError) as err:
            client.call("filter.define", {"xml": "<filter name='x'><rule/></filter>"})
        assert err.value.code in (ErrorCode.INVALID, ErrorCode.XML)
        client.call("binding.delete", {"portdev": "vnet0"})
        assert client.call("binding.list") == []
        for name in ("v\\*", "*"):
            with pytest.raises(NwfilterError) as err:
                client.call("binding.create", {"xml": [BINDING.replace("vnet0", name)]})
            assert err.value.code is ErrorCode.INVALID and repr(name) in err.value.message
        assert client.call("binding.list") == []


def test_daemon_starts_autostart_domains(tmp_path: Path) -> None:
    from nwfilter.backends.memory import MemoryBackend
    from nwfilter.domain.manager import DomainManager
    from nwfilter.engine import Engine

    root = tmp_path / "root"
    engine = Engine(root, MemoryBackend())
    engine.start()
    manager = DomainManager.for_engine(engine)
    manager.start()
    manager.define_xml(
        "<domain type='test'><name>auto1</name><devices><interface type='bridge'>"
        "<mac address='52:54:00:00:00:07'/><source bridge='br0'/>"
        "<filterref filter='clean-traffic'><parameter name='IP' value='10.0.0.7'/>"
        "</filterref></interface></devices></domain>"
    )
    manager.set_autostart("auto1", True)
    engine.close()
    srv = serve(root, "memory", None, tmp_path / "d.sock")
    try:
        assert srv.domains is not None
        assert [row.name for row in srv.domains.list_domains()] == ["auto1"]
        assert [b.owner_name for b in srv.engine.list_bindings()] == ["auto1"]
    finally:
        srv.server_close()
        srv.engine.close()


def test_errors_come_back_as_their_class(server: Server) -> None:
    with Client(server.path) as client, pytest.raises(NotFoundError) as err:
        client.call("filter.dumpxml", {"name": "nosuch"})
    assert err.value.code is ErrorCode.NOT_FOUND and "nosuch" in err.value.message


@pytest.mark.parametrize("code", list(ErrorCode))
def test_raise_for_reply_uses_the_class_of_the_code(code: ErrorCode) -> None:
    with pytest.raises(NwfilterError) as err:
        protocol.raise_for_reply({"id": 1, "error": {"code": code.value, "message": "m"}})
    assert type(err.value) is ERROR_CLASSES[code]
    assert err.value.code is code and err.value.message == "m"


def test_raise_for_reply_unknown_code_is_internal() -> None:
    with pytest.raises(NwfilterError) as err:
        protocol.raise_for_reply({"id": 1, "error": {"code": "no-such-code", "message": "m"}})
    assert type(err.value) is NwfilterError and err.value.code is ErrorCode.INTERNAL
    assert protocol.raise_for_reply({"id": 1, "result": [1]}) == [1]


def test_read_message_frames_lines() -> None:
    stream = io.BytesIO(b'{"id":1}\nnot json\n[1]\n{"id":2}')
    assert protocol.read_message(stream) == {"id": 1}
    for _ in range(2):
        # a malformed line is consumed whole: the stream stays in step
        with pytest.raises(ValidationError) as err:
            protocol.read_message(stream)
        assert not isinstance(err.value, protocol.MessageTooLargeError)
    assert protocol.read_message(stream) == {"id": 2}
    assert protocol.read_message(stream) is None


def test_read_message_refuses_an_oversized_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(protocol, "MAX_LINE", 16)
    fits = b'{"a":"' + b"b" * 7 + b'"}\n'
    assert len(fits) == 16
    assert protocol.read_message(io.BytesIO(fits)) == {"a": "b" * 7}
    with pytest.raises(protocol.MessageTooLargeError) as err:
        protocol.read_message(io.BytesIO(b'{"a":"' + b"b" * 8 + b'"}\n'))
    assert err.value.code is ErrorCode.INVALID


def test_oversized_request_is_answered_once_then_the_connection_closes(
    tmp_path: Path,
) -> None:
    srv = serve(tmp_path / "root", "memory", None, tmp_path / "d.sock", Limits(max_line=64))
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    # JSON allows leading white space: were the line read in pieces, its
    # tail would be taken for a request of its own.
    line = b" " * 65 + protocol.encode({"id": 7, "method": "binding.list"})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(srv.path))
        sock.sendall(line)
        reader = sock.makefile("rb")
        reply = json.loads(reader.readline())
        assert reply["id"] is None and reply["error"]["code"] == ErrorCode.INVALID.value
        try:
            rest = reader.read()
        except ConnectionResetError:
            rest = b""
        assert rest == b""
    srv.shutdown()
    close(srv)
    thread.join(5)


# --- abuse: malformed requests ------------------------------------------------


def strict_json(line: bytes) -> dict[str, Any]:
    def refuse(name: str) -> None:
        raise AssertionError(f"reply holds {name}")

    value = json.loads(line, parse_constant=refuse)
    assert isinstance(value, dict)
    return value


MALFORMED = {
    "huge integer id": b'{"id": 1' + b"0" * 5000 + b', "method": "filter.list"}\n',
    "huge integer param": b'{"id": 1, "method": "filter.list", "params": {"x": 9'
    + b"9" * 5000
    + b"}}\n",
    "deep nesting": b"[" * 100_000 + b"\n",
    "nesting in params": b'{"id": 1, "method": "filter.list", "params": '
    + b'{"a": ' * 40
    + b"1"
    + b"}" * 40
    + b"}\n",
    "NaN id": b'{"id": NaN, "method": "filter.list"}\n',
    "Infinity id": b'{"id": Infinity, "method": "filter.list"}\n',
    "overflowing float id": b'{"id": 1e400, "method": "filter.list"}\n',
    "float id": b'{"id": 1.5, "method": "filter.list"}\n',
    "boolean id": b'{"id": true, "method": "filter.list"}\n',
    "id out of range": b'{"id": 9223372036854775808, "method": "filter.list"}\n',
    "long string id": b'{"id": "' + b"x" * 300 + b'", "method": "filter.list"}\n',
    "list id": b'{"id": [1], "method": "filter.list"}\n',
    "string dry_run": b'{"id": 1, "method": "filter.define", "params": {"xml": "'
    + FILTER.replace("'", "\\u0027").encode()
    + b'", "dry_run": "false"}}\n',
    "integer rules flag": b'{"id": 1, "method": "binding.dumpxml", '
    b'"params": {"portdev": "vnet0", "rules": 1}}\n',
    "unknown parameter": b'{"id": 1, "method": "filter.list", "params": {"all": true}}\n',
    "unknown member": b'{"id": 1, "method": "filter.list", "jsonrpc": "2.0"}\n',
    "method not a string": b'{"id": 1, "method": 7}\n',
    "params not an object": b'{"id": 1, "method": "filter.list", "params": []}\n',
    "not an object": b"[1, 2]\n",
    "invalid UTF-8": b'{"id": 1, "method": "\xff\xfe"}\n',
    "empty line": b"\n",
    "truncated": b'{"id": 1, "method": \n',
}


@pytest.mark.parametrize("line", MALFORMED.values(), ids=MALFORMED.keys())
def test_each_malformed_request_gets_one_error_and_the_connection_goes_on(
    server: Server, line: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(server.path))
        reader = sock.makefile("rb")
        sock.sendall(line)
        reply = strict_json(reader.readline())
        assert reply["error"]["code"] == ErrorCode.INVALID.value
        assert reply["id"] in (None, 1)
        # exactly one reply: the next line answers the next request
        sock.sendall(protocol.encode({"id": 2, "method": "binding.list"}))
        assert strict_json(reader.readline()) == {"id": 2, "result": []}
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    with Client(server.path) as client, pytest.raises(NotFoundError):
        client.call("filter.dumpxml", {"name": "web"})  # "dry_run": "false" defined nothing


def test_a_bad_client_is_logged_once_with_its_pid(
    server: Server, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(server.path))
        reader = sock.makefile("rb")
        for line in list(MALFORMED.values())[:5]:
            sock.sendall(line)
            strict_json(reader.readline())
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(warnings) == 1 and f"pid {os.getpid()}" in warnings[0], warnings


def test_valid_ids_are_echoed(server: Server) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(server.path))
        reader = sock.makefile("rb")
        for request_id in (0, -(2**63), 2**63 - 1, "", "a" * 256, None):
            sock.sendall(protocol.encode({"id": request_id, "method": "binding.list"}))
            assert strict_json(reader.readline()) == {"id": request_id, "result": []}


def test_encode_refuses_nan() -> None:
    with pytest.raises(ValueError):
        protocol.encode({"id": float("nan")})


# --- abuse: the socket path ----------------------------------------------------


@pytest.fixture
def private(tmp_path: Path) -> Path:
    path = tmp_path / "private"
    path.mkdir(mode=0o700)
    return path


def run_main(private: Path, socket_path: Path | str, capsys: pytest.CaptureFixture[str]) -> str:
    status = daemon_main(
        ["--backend", "memory", "--root", str(private / "other-root"), "--socket", str(socket_path)]
    )
    err = capsys.readouterr().err
    assert status != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    return lines[0]


def test_socket_on_a_regular_file_is_refused_and_the_file_kept(
    private: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = private / "notes.txt"
    target.write_text("keep me\n")
    message = run_main(private, target, capsys)
    assert str(target) in message and "not a socket" in message
    assert target.read_text() == "keep me\n"


def test_socket_on_a_directory_is_refused(
    private: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    target = private / "dir"
    target.mkdir()
    (target / "inside").write_text("x")
    assert "is a directory" in run_main(private, target, capsys)
    assert (target / "inside").read_text() == "x"


@pytest.mark.parametrize(
    "where", ["under-a-file", "in-proc", "too-long"], ids=["parent is a file", "/proc", "too long"]
)
def test_socket_at_an_unusable_path_is_a_one_line_error(
    private: Path, capsys: pytest.CaptureFixture[str], where: str
) -> None:
    (private / "file").write_text("")
    target = {
        "under-a-file": private / "file" / "d.sock",
        "in-proc": Path("/proc/nwfilterd-test.sock"),
        "too-long": private / ("x" * 120),
    }[where]
    assert "socket" in run_main(private, target, capsys)


def test_socket_of_a_live_daemon_is_refused_and_that_daemon_unaffected(
    server: Server, private: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    before = server.path.stat().st_ino
    assert "in use by a running daemon" in run_main(private, server.path, capsys)
    assert server.path.stat().st_ino == before
    with Client(server.path) as client:
        assert client.call("binding.list") == []


def test_a_stale_socket_is_replaced(private: Path) -> None:
    path = private / "d.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as dead:
        dead.bind(str(path))  # left behind by a daemon that died
    srv = serve(private / "root", "memory", None, path)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        with Client(path) as client:
            assert client.call("binding.list") == []
    finally:
        srv.shutdown()
        close(srv)
        thread.join(5)
    assert not path.exists()


# --- abuse: floods against a daemon process ----------------------------------------


class DaemonProcess:
    def __init__(self, private: Path, *args: str) -> None:
        self.path = private / "d.sock"
        repo = Path(nwfilter.__file__).resolve().parents[1]
        self.log = private / "daemon.log"
        with self.log.open("wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nwfilter.daemon", "--backend", "memory",
                 "--root", str(private / "root"), "--socket", str(self.path), *args],
                env=dict(os.environ, PYTHONPATH=str(repo)),
                stdout=subprocess.DEVNULL,
                stderr=log,
            )
        deadline = time.monotonic() + 60
        while not self.path.exists() or not self.served():
            assert self.proc.poll() is None, self.log.read_text()
            assert time.monotonic() < deadline, "daemon did not start"
            time.sleep(0.05)

    def served(self) -> bool:
        try:
            with Client(self.path, timeout=30) as client:
                return client.call("binding.list") == []
        except UnavailableError:
            return False

    def status(self, key: str) -> int:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            name, _, value = line.partition(":")
            if name == key:
                return int(value.split()[0])
        raise KeyError(key)

    def terminate(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def daemon_proc(private: Path) -> Iterator[Callable[..., DaemonProcess]]:
    started: list[DaemonProcess] = []

    def start(*args: str) -> DaemonProcess:
        started.append(DaemonProcess(private, *args))
        return started[-1]

    yield start
    for proc in started:
        if proc.proc.poll() is None:
            proc.proc.kill()
            proc.proc.wait()


def test_partial_lines_of_many_clients_keep_memory_bounded(
    daemon_proc: Callable[..., DaemonProcess],
) -> None:
    daemon = daemon_proc()
    base_kib = daemon.status("VmRSS")
    holders = []
    # the longest line the daemon must wait for: one byte short of the limit
    partial = b" " * (protocol.MAX_LINE - 1)
    refused = 0
    try:
        for _ in range(150):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(30)
            holders.append(sock)
            sock.connect(str(daemon.path))
            try:
                sock.sendall(partial)
            except OSError:
                refused += 1
        assert refused > 0
        assert daemon.served()
        # 150 x 4 MiB = 600 MiB were sent; the daemon holds at most its
        # 64 MiB budget of partial lines (and the copies of one read).
        grown_mib = (daemon.status("VmHWM") - base_kib) / 1024
        assert grown_mib < 64 + 48, f"daemon grew by {grown_mib:.0f} MiB"
        assert daemon.terminate() == 0
    finally:
        for sock in holders:
            sock.close()
    assert "Traceback" not in daemon.log.read_text()


def test_idle_connections_cost_no_threads_and_sigterm_still_stops_the_daemon(
    daemon_proc: Callable[..., DaemonProcess],
) -> None:
    daemon = daemon_proc()
    holders = []
    try:
        for _ in range(2000):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            holders.append(sock)
            sock.connect(str(daemon.path))
        assert daemon.served()
        assert daemon.status("Threads") <= 1 + Limits().workers + 4
        assert daemon.terminate() == 0
    finally:
        for sock in holders:
            sock.close()


def _open_sockets(pid: int) -> int:
    """Sockets the process holds; an fd closed while we look is not counted."""
    count = 0
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            count += os.readlink(fd).startswith("socket:")
        except FileNotFoundError:
            continue
    return count


def test_a_flood_over_the_connection_cap_leaves_room_for_new_clients(
    daemon_proc: Callable[..., DaemonProcess],
) -> None:
    daemon = daemon_proc("--max-connections", "100")
    holders = []
    try:
        for _ in range(300):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            holders.append(sock)
            sock.connect(str(daemon.path))
        assert daemon.served()
        assert _open_sockets(daemon.proc.pid) <= 100 + 10
        assert daemon.terminate() == 0
    finally:
        for sock in holders:
            sock.close()
