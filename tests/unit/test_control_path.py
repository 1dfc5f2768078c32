"""One control path: every command gives the same output, errors and exit
status through nwfilterd as embedded, and a running daemon locks no command out."""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwfilter.cli import main
from nwfilter.commands.context import default_socket
from nwfilter.daemon import Server, serve

FILTER = """<filter name='web' chain='ipv4'>
  <uuid>5c1a0d2e-0f6b-4d7e-9d55-7d1c3b1a2e01</uuid>
  <rule action='accept' direction='in'><tcp dstportstart='80'/></rule>
  <filterref filter='clean-traffic'/>
</filter>
"""
BINDING = """<filterbinding>
  <owner><name>vm9</name><uuid>c2a3f1a2-8d4e-4a51-9a9e-2f6f1d8e7a11</uuid></owner>
  <portdev name='vnet9'/>
  <mac address='52:54:00:00:00:09'/>
  <filterref filter='web'><parameter name='IP' value='10.0.0.9'/></filterref>
</filterbinding>
"""
DOMAIN = """<domain type='test'>
  <name>vm1</name><uuid>7d3f5c1e-2b4a-4c8d-9e0f-1a2b3c4d5e6f</uuid>
  <devices><interface type='bridge'><mac address='52:54:00:00:00:01'/>
    <source bridge='br0'/><target dev='vnet1'/>
    <filterref filter='web'><parameter name='IP' value='10.0.0.1'/></filterref>
  </interface></devices>
</domain>
"""
BAD = "<filter name='bad'><rule action='nope' direction='in'/></filter>"

# (arguments, with '{dir}' for the directory of the input files)
SCRIPT: tuple[tuple[str, ...], ...] = (
    ("nwfilter-define", "--validate", "{dir}/web.xml"),
    ("nwfilter-define", "{dir}/web.xml"),
    ("nwfilter-define", "{dir}/web.xml"),
    ("nwfilter-define", "{dir}/bad.xml"),
    ("nwfilter-list",),
    ("nwfilter-list", "--json"),
    ("nwfilter-dumpxml", "web"),
    ("nwfilter-dumpxml", "nosuch"),
    ("nwfilter-binding-create", "--validate", "{dir}/binding.xml"),
    ("nwfilter-binding-create", "{dir}/binding.xml"),
    ("nwfilter-binding-create", "{dir}/binding.xml"),
    ("nwfilter-binding-list",),
    ("nwfilter-binding-list", "--json"),
    ("nwfilter-binding-dumpxml", "--rules", "vnet9"),
    ("stats",),
    ("stats", "--json", "vnet9"),
    ("stats", "nosuch"),
    ("stats", "--watch", "0"),
    ("nwfilter-define", "--dry-run", "{dir}/web2.xml"),
    ("define", "{dir}/vm1.xml"),
    ("list", "--all"),
    ("start", "vm1"),
    ("list",),
    ("list", "--name"),
    ("list", "--uuid", "--all"),
    ("list", "--state-shutoff"),
    ("dominfo", "vm1"),
    ("dominfo", "--json", "1"),
    ("domid", "vm1"),
    ("domuuid", "1"),
    ("domname", "7d3f5c1e-2b4a-4c8d-9e0f-1a2b3c4d5e6f"),
    ("domiflist", "vm1"),
    ("domiflist", "--json", "vm1"),
    ("nwfilter-binding-list",),
    ("suspend", "vm1"),
    ("domstate", "--reason", "vm1"),
    ("resume", "1"),
    ("nwfilter-undefine", "web"),
    ("destroy", "vm1"),
    ("domstate", "--reason", "vm1"),
    ("domstate", "--json", "vm1"),
    ("start", "vm1"),
    ("shutdown", "vm1"),
    ("domstate", "--reason", "vm1"),
    ("autostart", "vm1"),
    ("list", "--all", "--autostart"),
    ("dumpxml", "--inactive", "vm1"),
    ("undefine", "vm1"),
    ("dominfo", "vm1"),
    ("-q", "nwfilter-binding-delete", "vnet9"),
    ("nwfilter-binding-delete", "vnet9"),
    ("nwfilter-undefine", "web"),
)


def _inputs(directory: Path) -> None:
    directory.mkdir()
    (directory / "web.xml").write_text(FILTER)
    (directory / "web2.xml").write_text(FILTER.replace("dstportstart='80'", "dstportstart='81'"))
    (directory / "bad.xml").write_text(BAD)
    (directory / "binding.xml").write_text(BINDING)
    (directory / "vm1.xml").write_text(DOMAIN)


_OURS = ("5c1a0d2e-0f6b-4d7e-9d55-7d1c3b1a2e01", "c2a3f1a2-8d4e-4a51-9a9e-2f6f1d8e7a11",
         "7d3f5c1e-2b4a-4c8d-9e0f-1a2b3c4d5e6f")
_UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def _normal(text: str, root: Path) -> str:
    """The output with the root's path and the stock filters' UUIDs (made
    anew for every root) replaced."""
    text = text.replace(str(root), "ROOT")
    return _UUID.sub(lambda m: m.group(0) if m.group(0) in _OURS else "UUID", text)


def _run_script(
    root: Path, files: Path, capsys: pytest.CaptureFixture[str]
) -> list[tuple[int, str, str]]:
    out: list[tuple[int, str, str]] = []
    for step in SCRIPT:
        args = [a.replace("{dir}", str(files)) for a in step]
        capsys.readouterr()
        status = main(["--root", str(root), "--backend", "memory", *args])
        stdout, stderr = capsys.readouterr()
        out.append((status, _normal(stdout, root), _normal(stderr, root)))
    return out


@pytest.fixture
def daemon_root(tmp_path: Path) -> Iterator[tuple[Path, Server]]:
    root = tmp_path / "served"
    srv = serve(root, "memory", None, None)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield root, srv
    srv.shutdown()
    srv.server_close()
    srv.engine.close()
    thread.join(5)


def test_every_command_is_the_same_through_the_daemon(
    tmp_path: Path, daemon_root: tuple[Path, Server], capsys: pytest.CaptureFixture[str]
) -> None:
    files = tmp_path / "in"
    _inputs(files)
    embedded = _run_script(tmp_path / "embedded", files, capsys)
    root, srv = daemon_root
    assert default_socket(root).is_socket()
    served = _run_script(root, files, capsys)
    for step, mine, theirs in zip(SCRIPT, embedded, served, strict=True):
        assert mine == theirs, step
    # The script exercises successes and every kind of refusal.
    statuses = {status for status, _out, _err in served}
    assert {0, 2, 3, 4} <= statuses
    # Nothing was refused for want of the root: the daemon served it all.
    assert not any("in use by nwfilterd" in err for _s, _o, err in served)
    assert srv.engine.list_bindings() == []


def test_connect_names_the_socket(
    tmp_path: Path, daemon_root: tuple[Path, Server], capsys: pytest.CaptureFixture[str]
) -> None:
    _root, srv = daemon_root
    other = tmp_path / "unused-root"
    status = main(["--root", str(other), "-c", str(srv.path), "nwfilter-list", "--json"])
    assert status == 0 and '"clean-traffic"' in capsys.readouterr().out
    assert not other.exists()


def test_connect_to_nothing_is_a_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    status = main(["--root", str(tmp_path / "r"), "-c", str(tmp_path / "none.sock"),
                   "nwfilter-list"])
    err = capsys.readouterr().err
    assert status == 6 and "cannot connect to nwfilterd" in err and "none.sock" in err


def test_unknown_option_prints_the_subcommand_usage(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["list", "--bogus"])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: nwfilter list") and "--bogus" in err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.startswith("nwfilter ")

