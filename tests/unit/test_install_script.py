"""tools/install.sh: says what it installs on a terminal, nothing in a log,
and puts the man pages and the completion into the virtualenv.

It runs on a copy of the files it uses, with stand-ins for dpkg-query,
apt-get, modprobe and the virtualenv's pip (which record their arguments),
so nothing is installed on this machine."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from nwfilter.docgen.generated import COMPLETION, MAN_NWFILTER, MAN_NWFILTERD, TOP

STUB = "#!/bin/sh\necho \"$(basename \"$0\") $*\" >> \"$STUB_LOG\"\n"
DPKG_QUERY = (
    "#!/bin/sh\n"
    "for last; do :; done\n"
    '[ "$last" = groff-base ] || printf "install ok installed"\n'
)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    top = tmp_path / "tree"
    for rel in ("tools/install.sh", COMPLETION, MAN_NWFILTER, MAN_NWFILTERD):
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(TOP / rel, top / rel)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in (("apt-get", STUB), ("modprobe", STUB), ("dpkg-query", DPKG_QUERY)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    venv_bin = top / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    for name in ("python", "pip"):
        (venv_bin / name).write_text(STUB)
        (venv_bin / name).chmod(0o755)
    return top


def _env(tree: Path) -> dict[str, str]:
    stubs = tree.parent / "stubs"
    return {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}",
            "STUB_LOG": str(tree.parent / "log")}


def test_silent_off_a_terminal_and_installs_docs(tree: Path) -> None:
    result = subprocess.run(
        ["sh", str(tree / "tools/install.sh")], env=_env(tree),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True, timeout=60,
    )
    assert (result.stdout, result.stderr) == ("", "")
    log = (tree.parent / "log").read_text()
    assert "apt-get install -y -qq --no-install-recommends groff-base" in log
    assert "pip install -q --disable-pip-version-check -e .[test]" in log
    share = tree / ".venv" / "share"
    assert (share / "man/man1/nwfilter.1").read_text() == (TOP / MAN_NWFILTER).read_text()
    assert (share / "man/man8/nwfilterd.8").exists()
    completions = share / "bash-completion/completions"
    assert (completions / "nwfilter").read_text() == (TOP / COMPLETION).read_text()
    assert (completions / "nwfilterd").resolve() == (completions / "nwfilter").resolve()


def test_says_what_it_installs_on_a_terminal(tree: Path) -> None:
    master, slave = os.openpty()
    try:
        proc = subprocess.run(
            ["sh", str(tree / "tools/install.sh")], env=_env(tree),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, check=True,
            timeout=60,
        )
        os.close(slave)
        slave = -1
        said = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            said += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert proc.stdout == b""
    lines = said.decode().splitlines()
    assert lines == [
        "install: installing Debian packages: groff-base",
        "install: installing nwfilter and its test tools into .venv",
        "install: installing the man pages and the bash completion into .venv/share",
    ]
