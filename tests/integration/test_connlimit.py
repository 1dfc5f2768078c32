"""connlimit-above on real TCP connections, through the whole stack: the
filter language, the compiler, the nft backend and the kernel's conntrack."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwfilter.backends.nft import NftBackend
from nwfilter.conf.model import BindingDef, FilterRef
from nwfilter.engine import Engine
from nwfilter.netns import in_netns
from tests.integration.conftest import BridgeLab, kernel_engine
from tests.integration.nettools import tcp_server

pytestmark = [pytest.mark.root, pytest.mark.netns]

PORT = 8080
LIMIT = """<filter name='conn-limit' chain='root'>
  <rule action='drop' direction='in' priority='100'>
    <tcp dstportstart='8080' connlimit-above='2'/>
  </rule>
  <rule action='accept' direction='inout' priority='500'>
    <all/>
  </rule>
</filter>"""


def connect(ns: str, ip: str, port: int) -> socket.socket | None:
    with in_netns(ns):
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect((ip, port))
        if sock.recv(2) == b"ok":
            return sock
    except OSError:
        pass
    sock.close()
    return None


@pytest.fixture
def engine(lab: BridgeLab, tmp_path: Path) -> Iterator[Engine]:
    with kernel_engine(NftBackend(netns=lab.host), tmp_path) as eng:
        yield eng


def test_connlimit_above_refuses_the_third_connection(lab: BridgeLab, engine: Engine) -> None:
    client, server = lab.guests
    engine.define_filter(LIMIT)
    engine.create_bindings([
        BindingDef("srv", uuid.uuid4(), server.portdev, server.mac, FilterRef("conn-limit"))
    ])
    held: list[socket.socket] = []
    srv, _ = tcp_server(server.ns, server.ip, PORT, keep=held)
    opened: list[socket.socket] = []
    try:
        for _ in range(2):
            sock = connect(client.ns, server.ip, PORT)
            assert sock is not None, "a connection within the limit was refused"
            opened.append(sock)
        assert connect(client.ns, server.ip, PORT) is None, "the third connection got through"
        # established connections keep working above the limit
        opened[0].sendall(b"x")
        assert lab.ping(client, server.ip)
        engine.delete_binding(server.portdev)
        third = connect(client.ns, server.ip, PORT)
        assert third is not None, "without the filter the connection must pass"
        opened.append(third)
    finally:
        for sock in opened + held:
            sock.close()
        srv.close()
