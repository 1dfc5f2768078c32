"""What layer 3 depends on, broken with real packets: the bridge-nf sysctls,
and another table rewriting the packet mark before our dispatch.

Either lets traffic past every layer-3 rule (the kernel's fact, shown first
in each test); the engine must then report the port as not enforced, say
why, and the watch (nwfilterd's monitor) must restore the sysctl and warn
about the foreign table.
"""

from __future__ import annotations

import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from nwfilter.backends.nft import NftBackend, NftMonitor
from nwfilter.cli import main
from nwfilter.conf import parse_binding
from nwfilter.daemon import Server, close, serve
from nwfilter.engine import Engine
from tests.integration.conftest import BridgeLab
from tests.integration.test_nft_backend import _delivered, _udp

pytestmark = [pytest.mark.root, pytest.mark.netns]

SYSCTL = "net.bridge.bridge-nf-call-iptables"
NO_UDP = """<filter name='no-udp-4001' chain='root'>
  <rule action='drop' direction='out' priority='100'><udp dstportstart='4001'/></rule>
</filter>"""
CLOBBER = """table bridge clobber {
  chain c { type filter hook prerouting priority -250; policy accept; meta mark set 0; }
}
"""


def binding(portdev: str, mac: str) -> str:
    return (
        "<filterbinding><owner><name>vm0</name>"
        "<uuid>c2a3f1a2-8d4e-4a51-9a9e-2f6f1d8e7a11</uuid></owner>"
        f"<portdev name='{portdev}'/><mac address='{mac}'/>"
        "<filterref filter='no-udp-4001'/></filterbinding>"
    )


def wait_for(condition: Callable[[], bool], seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return condition()


def sysctl(lab: BridgeLab) -> str:
    return lab.run(lab.host, ["sysctl", "-n", SYSCTL]).stdout.strip()


def blocked(lab: BridgeLab) -> bool:
    g0, g1 = lab.guests
    return _delivered(lab, g0, g1, [_udp(g0.mac, g1, g0.ip)]) == 0


@pytest.fixture
def engine(lab: BridgeLab, tmp_path: Path) -> Iterator[Engine]:
    g0 = lab.guests[0]
    eng = Engine(tmp_path / "root", NftBackend(netns=lab.host))
    eng.start()
    eng.define_filter(NO_UDP)
    eng.create_bindings([parse_binding(binding(g0.portdev, g0.mac))])
    try:
        yield eng
    finally:
        lab.run(lab.host, ["nft", "delete", "table", "bridge", "clobber"], check=False)
        lab.lab.enable_bridge_netfilter(lab.host)
        eng.close()
        eng.backend.clear_all()


def test_sysctl_off_is_reported_and_restored_by_the_watch(
    lab: BridgeLab, engine: Engine
) -> None:
    assert blocked(lab) and engine.enforcement() == {}
    lab.lab.sysctl(lab.host, SYSCTL, "0")
    assert not blocked(lab)  # the bypass itself
    reason = engine.enforcement()["vnet0"]
    assert SYSCTL in reason and lab.host in reason
    assert isinstance(engine.backend, NftBackend)
    with NftMonitor.for_backend(engine.backend) as monitor:
        assert wait_for(lambda: sysctl(lab) == "1")
        assert monitor.last_error is None
    assert blocked(lab) and engine.enforcement() == {}


def test_foreign_mark_writer_is_detected_and_reported(
    lab: BridgeLab, engine: Engine, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert isinstance(engine.backend, NftBackend)
    with NftMonitor.for_backend(engine.backend) as monitor:
        assert wait_for(lambda: monitor.broken == ())
        result = subprocess.run(["ip", "netns", "exec", lab.host, "nft", "-f", "-"],
                                input=CLOBBER, text=True, capture_output=True, timeout=10)
        assert result.returncode == 0, result.stderr
        assert not blocked(lab)  # the bypass itself
        assert wait_for(lambda: any("bridge clobber" in p for p in monitor.broken))
    reason = engine.enforcement()["vnet0"]
    assert "table bridge clobber chain c" in reason and "priority -250" in reason
    engine.close()
    # The command line, on the recorded namespace, says so too.
    capsys.readouterr()
    assert main(["--root", str(tmp_path / "root"), "nwfilter-binding-list"]) == 0
    out, err = capsys.readouterr()
    assert " vnet0      no-udp-4001   no" in out
    assert "port vnet0 is not enforced" in err and "bridge clobber" in err
    assert main(["--root", str(tmp_path / "root"), "nwfilter-binding-dumpxml", "vnet0"]) == 0
    assert "bridge clobber" in capsys.readouterr().err
    # A command that binds warns as well.
    g1 = lab.guests[1]
    path = tmp_path / "b1.xml"
    path.write_text(binding(g1.portdev, g1.mac).replace("vm0", "vm1").replace("7a11", "7a12"))
    assert main(["--root", str(tmp_path / "root"), "nwfilter-binding-create", str(path)]) == 0
    err = capsys.readouterr().err
    assert "port vnet1 is not enforced" in err and "bridge clobber" in err
    engine.start()


@pytest.fixture
def daemon(lab: BridgeLab, tmp_path: Path) -> Iterator[Server]:
    srv = serve(tmp_path / "d", "nft", lab.host, tmp_path / "d.sock")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    try:
        yield srv
    finally:
        srv.shutdown()
        lab.lab.enable_bridge_netfilter(lab.host)
        srv.engine.backend.clear_all()
        close(srv)
        thread.join(5)


def test_nwfilterd_restores_the_sysctl(lab: BridgeLab, daemon: Server) -> None:
    g0 = lab.guests[0]
    daemon.engine.define_filter(NO_UDP)
    daemon.engine.create_bindings([parse_binding(binding(g0.portdev, g0.mac))])
    assert blocked(lab)
    lab.lab.sysctl(lab.host, SYSCTL, "0")
    assert wait_for(lambda: sysctl(lab) == "1")
    assert blocked(lab)
