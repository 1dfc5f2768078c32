"""Protocol fuzzing: whatever a client sends, each line gets exactly one
strict JSON reply and the daemon keeps serving everyone."""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nwfilter.api import METHODS
from nwfilter.client import Client
from nwfilter.daemon import Server, serve


@pytest.fixture(scope="module")
def daemon(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    base = tmp_path_factory.mktemp("fuzz")
    srv = serve(base / "root", "memory", None, base / "d.sock")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    srv.engine.close()
    thread.join(5)


def _strict(raw: bytes) -> Any:
    def refuse(name: str) -> None:
        raise AssertionError(f"reply holds {name}")

    return json.loads(raw, parse_constant=refuse)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=12,
)
# Requests close to real ones: known and unknown methods, typed and mistyped
# parameters; and lines that are not JSON at all.
requests = st.fixed_dictionaries(
    {"id": json_values, "method": st.sampled_from(sorted(METHODS)) | st.text(max_size=12)},
    optional={"params": st.dictionaries(
        st.sampled_from(["xml", "name", "portdev", "domain", "dry_run", "rules", "sources",
                         "inactive", "enable", "kinds", "bogus"]),
        json_values, max_size=3)},
)


def _line(request: dict[str, Any] | bytes) -> bytes:
    if isinstance(request, bytes):
        return request.replace(b"\n", b" ") + b"\n"
    return json.dumps(request, allow_nan=True).encode() + b"\n"


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(batch=st.lists(requests | st.binary(max_size=64), min_size=1, max_size=6))
def test_every_line_gets_one_strict_reply(daemon: Server, batch: list[Any]) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(20)
        sock.connect(str(daemon.path))
        reader = sock.makefile("rb")
        lines = [_line(item) for item in batch]
        for line in lines:
            sock.sendall(line)
            if line.strip() == b"":
                continue  # an empty line is no request
            reply = _strict(reader.readline())
            assert isinstance(reply, dict) and ("result" in reply or "error" in reply)
            if "events.subscribe" in line.decode(errors="replace") and "result" in reply:
                return  # the connection became an event stream
    # The daemon still serves a well-behaved client.
    with Client(daemon.path) as client:
        assert any(f["name"] == "clean-traffic" for f in client.call("filter.list"))
