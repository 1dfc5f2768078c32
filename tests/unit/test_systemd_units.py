"""The systemd units in contrib/systemd: they name the default state root
and its socket, and `systemd-analyze verify` accepts them (never started)."""

from __future__ import annotations

import configparser
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from nwfilter.commands.context import DEFAULT_ROOT, default_ro_socket, default_socket
from nwfilter.docgen.generated import MAN_NWFILTER, MAN_NWFILTERD, TOP

UNITS = TOP / "contrib" / "systemd"


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


def test_units_name_the_default_root_and_sockets() -> None:
    admin = _unit("nwfilterd.socket")["Socket"]
    assert admin["ListenStream"] == str(default_socket(Path(DEFAULT_ROOT)))
    assert admin["SocketMode"] == "0600"
    ro = _unit("nwfilterd-ro.socket")["Socket"]
    assert ro["ListenStream"] == str(default_ro_socket(Path(DEFAULT_ROOT)))
    assert (ro["SocketMode"], ro["Service"]) == ("0666", "nwfilterd.service")
    service = _unit("nwfilterd.service")["Service"]
    assert service["ExecStart"].split()[1:] == ["--root", DEFAULT_ROOT]
    assert service["Sockets"].split() == ["nwfilterd.socket", "nwfilterd-ro.socket"]
    assert Path("/var/lib", service["StateDirectory"]) == Path(DEFAULT_ROOT)
    # the root is writable by root only; others may reach the read-only socket
    assert service["StateDirectoryMode"] == "0711"
    assert set(service["CapabilityBoundingSet"].split()) == {"CAP_NET_ADMIN", "CAP_SYS_ADMIN"}


def test_systemd_analyze_verifies_the_units(tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    daemon = tmp_path / "bin" / "nwfilterd"
    daemon.parent.mkdir()
    daemon.write_text("#!/bin/sh\n")
    daemon.chmod(0o755)
    text = (UNITS / "nwfilterd.service").read_text()
    (tmp_path / "nwfilterd.service").write_text(
        text.replace("/usr/local/bin/nwfilterd", str(daemon))
    )
    for name in ("nwfilterd.socket", "nwfilterd-ro.socket"):
        shutil.copy(UNITS / name, tmp_path)
    # Documentation= is checked too: the man pages, installed in a private MANPATH.
    for rel, section in ((MAN_NWFILTER, "man1"), (MAN_NWFILTERD, "man8")):
        (tmp_path / "man" / section).mkdir(parents=True)
        shutil.copy(TOP / rel, tmp_path / "man" / section)
    # (without man-db, Documentation= cannot be looked up)
    man = [] if shutil.which("man") else ["--man=no"]
    result = subprocess.run(
        ["systemd-analyze", "verify", *man,
         *(str(tmp_path / name)
           for name in ("nwfilterd.socket", "nwfilterd-ro.socket", "nwfilterd.service"))],
        cwd=tmp_path, capture_output=True, text=True, check=False, timeout=120,
        env={**os.environ, "MANPATH": str(tmp_path / "man")},
    )
    assert (result.returncode, result.stderr) == (0, "")
