"""`nwfilter sandbox` end to end: real namespaces, real frames, real rules.

Each run is a separate process, as a user would start it, and must leave no
namespace of its prefix behind, whether it finishes or is interrupted.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwfilter.netns import NETNS_DIR

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.slow, pytest.mark.timeout(180)]

REPO = Path(__file__).resolve().parents[2]
PREFIX_RE = re.compile(r"\bnwsb-[0-9a-f]{6}\b")


def _sandbox_namespaces() -> set[str]:
    try:
        return {p.name for p in NETNS_DIR.iterdir() if p.name.startswith("nwsb-")}
    except FileNotFoundError:
        return set()


def _argv(*extra: str) -> list[str]:
    return [sys.executable, "-m", "nwfilter.cli", "sandbox", *extra]


@pytest.fixture
def no_leftovers() -> Iterator[None]:
    before = _sandbox_namespaces()
    yield
    left = _sandbox_namespaces() - before
    for name in left:  # do not let a failure here spill into other tests
        subprocess.run(["ip", "netns", "del", name], check=False)
    assert not left, f"namespaces left behind: {sorted(left)}"


def test_sandbox_runs_and_cleans_up(no_leftovers: None, tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(_argv(), capture_output=True, text=True, timeout=150, cwd=tmp_path,
                          env=env, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    prefixes = set(PREFIX_RE.findall(out))
    assert len(prefixes) == 1, out
    prefix = prefixes.pop()
    assert not [n for n in _sandbox_namespaces() if n.startswith(prefix)]
    assert "MISMATCH" not in out
    assert "forged source IP" in out and "forged source MAC" in out
    assert out.count("observed") >= 3, out  # before the edit, after it, after the undo
    # The guest on the default network: no IP given, learnt from its lease.
    assert "the engine learnt: 192.168.122." in out, out
    assert "filtered by the address it leased" in out, out
    assert "verdict: DROP, decided by" in out and "the explainer and the counters agreed" in out
    assert re.search(r"nwfilter stats vnet-mallory: from the guest \d+ packets accepted, "
                     r"[1-9]\d* dropped", out), out
    assert "nwfilter audit: 3 ports" in out, out
    assert "(unexpected)" not in out, out


@pytest.mark.parametrize(("signum", "status"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_sandbox_interrupted_cleans_up(
    no_leftovers: None, tmp_path: Path, signum: signal.Signals, status: int
) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen(_argv(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, cwd=tmp_path, env=env)
    assert proc.stdout is not None
    seen = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            seen.append(line)
            if "rules in force" in line:  # the guests are running by now
                proc.send_signal(signum)
                break
        rest, _ = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    output = "".join(seen) + rest
    assert proc.returncode == status, output
    assert PREFIX_RE.search(output), output


def test_sandbox_rejects_a_recording_backend(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run(_argv("--backend", "memory"), capture_output=True, text=True,
                          timeout=30, cwd=tmp_path, env=env, check=False)
    assert proc.returncode == 2
    assert "kernel" in proc.stderr
