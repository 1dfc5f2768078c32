"""nwfilterd with the nft backend: bindings over the socket reach the kernel,
and a foreign `nft flush ruleset` is repaired."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwfilter.client import Client
from nwfilter.daemon import Server, close, serve
from nwfilter.netlab import NetLab
from tests.unit.test_daemon import BINDING

pytestmark = [pytest.mark.root, pytest.mark.netns]



@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[tuple[Server, NetLab, str]]:
    with NetLab() as lab:
        host = lab.add_ns("host")
        srv = serve(tmp_path / "root", "nft", host, tmp_path / "d.sock")
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        try:
            yield srv, lab, host
        finally:
            srv.shutdown()
            srv.engine.backend.clear_all()
            close(srv)
            thread.join(5)


def ruleset(lab: NetLab, ns: str) -> str:
    return lab.run(ns, ["nft", "list", "ruleset"]).stdout


def test_binding_reaches_kernel_and_flush_is_repaired(
    daemon: tuple[Server, NetLab, str],
) -> None:
    srv, lab, host = daemon
    with Client(srv.path) as client:
        client.call("binding.create", {"xml": [BINDING]})
    before = ruleset(lab, host)
    assert "vnet0/from/root" in before and "52:54:00:00:00:01" in before
    lab.run(host, ["nft", "flush", "ruleset"])
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and "vnet0/from/root" not in ruleset(lab, host):
        time.sleep(0.05)
    assert ruleset(lab, host) == before
    assert srv.monitor is not None and srv.monitor.repairs >= 1
    with Client(srv.path) as client:
        client.call("binding.delete", {"portdev": "vnet0"})
    assert "vnet0" not in ruleset(lab, host)


def test_a_repaired_flush_is_told_to_subscribers(daemon: tuple[Server, NetLab, str]) -> None:
    srv, lab, host = daemon
    with Client(srv.path) as sub, Client(srv.path) as client:
        sub.subscribe(["drift-repaired", "binding-created"])
        client.call("binding.create", {"xml": [BINDING]})
        created = sub.next_event(10)
        assert created is not None and created.name == "vnet0"
        lab.run(host, ["nft", "flush", "ruleset"])
        event = sub.next_event(10)
    assert event is not None, "no drift-repaired event within 10 s"
    assert (event.kind.value, event.object, event.name) == ("drift-repaired", "namespace", host)
    culprit = event.details["by"][0]
    assert culprit["command"] == "nft" and "delete table" in culprit["changes"]
    assert event.text().startswith(
        f"event 'drift-repaired' for namespace '{host}': tables restored after nft (tid ")
    assert "vnet0/from/root" in ruleset(lab, host)
