"""`nwfilter stats --watch`: on a terminal it clears and redraws, without
one it prints a snapshot per interval, and Ctrl-C ends it with status 0."""

from __future__ import annotations

import os
import pty
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from nwfilter.cli import main

ROOT = Path(__file__).resolve().parents[3]
BINDING = """<filterbinding>
  <owner><name>vm9</name><uuid>c2a3f1a2-8d4e-4a51-9a9e-2f6f1d8e7a11</uuid></owner>
  <portdev name='vnet9'/><mac address='52:54:00:00:00:09'/>
  <filterref filter='clean-traffic'><parameter name='IP' value='10.0.0.9'/></filterref>
</filterbinding>
"""
CLEAR = b"\x1b[H\x1b[2J"


def _root(tmp_path: Path) -> Path:
    root = tmp_path / "root"
    (tmp_path / "b.xml").write_text(BINDING)
    assert main(["--root", str(root), "--backend", "memory", "-q",
                 "nwfilter-binding-create", str(tmp_path / "b.xml")]) == 0
    return root


def _watch(root: Path, stdout: int) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "nwfilter.cli", "--root", str(root),
                             "stats", "--watch", "0.1"], stdout=stdout,
                            stderr=subprocess.PIPE, env=env, cwd=ROOT)


def _read_until(fd: int, enough: bytes, count: int, limit: float = 30.0) -> bytes:
    """What `fd` gives until `enough` was seen `count` times (or `limit` s)."""
    got = b""
    deadline = time.monotonic() + limit
    while got.count(enough) < count and time.monotonic() < deadline:
        ready, _w, _x = select.select([fd], [], [], 0.5)
        if ready:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            got += chunk
    return got


def test_without_a_terminal_a_snapshot_per_interval(tmp_path: Path) -> None:
    root = _root(tmp_path)
    proc = _watch(root, subprocess.PIPE)
    assert proc.stdout is not None
    try:
        got = _read_until(proc.stdout.fileno(), b"every 0.1s: nwfilter stats", 3)
    finally:
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=30)
    assert got.count(b"every 0.1s: nwfilter stats") >= 3, (got, err)
    assert CLEAR not in got + rest
    assert got.count(b" vnet9   out ") >= 3
    assert proc.returncode == 0, err


def test_on_a_terminal_it_clears_and_redraws(tmp_path: Path) -> None:
    root = _root(tmp_path)
    parent, child = pty.openpty()
    proc = _watch(root, child)
    os.close(child)
    try:
        got = _read_until(parent, CLEAR, 3)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        os.close(parent)
    assert got.count(CLEAR) >= 3, got
    assert got.index(CLEAR) < got.index(b"vnet9")
    assert proc.returncode == 0
