"""The daemon answers over its socket with the engine's results and errors."""

from __future__ import annotations

import io
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwfilter import protocol
from nwfilter.client import Client
from nwfilter.daemon import Server, serve
from nwfilter.errors import (
    ERROR_CLASSES,
    ErrorCode,
    NotFoundError,
    NwfilterError,
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
            {"portdev": "vnet0", "filter": "clean-traffic", "enforced": True}
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


def test_daemon_starts_autostart_domains(tmp_path: Path) -> None:
    from nwfilter.backends.memory import MemoryBackend
    from nwfilter.domain.driver import DomainManager
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
    server: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(protocol, "MAX_LINE", 64)
    # JSON allows leading white space: were the line read in pieces, its
    # tail would be taken for a request of its own.
    line = b" " * 65 + protocol.encode({"id": 7, "method": "binding.list"})
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        sock.connect(str(server.path))
        sock.sendall(line)
        reader = sock.makefile("rb")
        reply = json.loads(reader.readline())
        assert reply["id"] is None and reply["error"]["code"] == ErrorCode.INVALID.value
        try:
            rest = reader.read()
        except ConnectionResetError:
            rest = b""
        assert rest == b""
