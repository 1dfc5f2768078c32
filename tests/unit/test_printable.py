"""Control characters from names, file names and documents never reach a
terminal or a log raw: every message, listing and log line stays one line."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwfilter.cli import main
from nwfilter.daemon import Server, serve
from nwfilter.errors import NotFoundError
from nwfilter.printable import printable

REPO = Path(__file__).resolve().parents[2]

# every character that must never reach an output raw
UNSAFE = [chr(c) for c in range(0x20)] + [chr(c) for c in range(0x7F, 0xA0)] + [
    "\u2028", "\u2029", "\u202e", "\u2066", "\u200f", "\udcff",
]


def assert_clean(text: str) -> None:
    """`text` holds no unsafe character besides the line ends of its lines."""
    for line in text.split("\n"):
        bad = [c for c in line if c in UNSAFE]
        assert not bad, f"raw control characters {bad!r} in {line!r}"


class Cli:
    def __init__(self, root: Path, capsys: pytest.CaptureFixture[str]) -> None:
        self.root = root
        self.capsys = capsys

    def __call__(self, *args: str) -> tuple[int, str, str]:
        self.capsys.readouterr()
        status = main(["--root", str(self.root), "--backend", "memory", *args])
        out, err = self.capsys.readouterr()
        return status, out, err


@pytest.fixture
def cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Cli:
    return Cli(tmp_path / "root", capsys)


# -- the escaping itself ---------------------------------------------------------


def test_printable_escapes_controls_and_keeps_printable_unicode() -> None:
    assert printable("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert printable("\x1b[2K\x00\x7f\x85\x9b") == "\\x1b[2K\\x00\\x7f\\x85\\x9b"
    assert printable("x\u2028y\u202ez\udcff") == "x\\u2028y\\u202ez\\udcff"
    kept = "caf\u00e9 \u65e5\u672c \U0001f600 a\\nb \u00a0 it's"
    assert printable(kept) == kept


def test_printable_escapes_every_unsafe_character_and_is_idempotent() -> None:
    for char in UNSAFE:
        once = printable(f"<{char}>")
        assert_clean(once)
        assert "\n" not in once and printable(once) == once


def test_error_messages_are_escaped_at_construction() -> None:
    err = NotFoundError("no filter 'a\nb\x1b[31m'")
    assert err.message == str(err) == "no filter 'a\\nb\\x1b[31m'"


# -- error messages through the command line -------------------------------------


@pytest.mark.parametrize(
    "args",
    [
        ("nwfilter-undefine", "ab\ncd\x1b[2Kx"),
        ("nwfilter-dumpxml", "ab\rcd"),
        ("nwfilter-binding-delete", "ab\ncd"),
        ("nwfilter-binding-dumpxml", "vnet\x9b0"),
        ("start", "vm\n1"),
        ("nwfilter-define", "/nonexistent/a\nb.xml"),
        ("define", "/nonexistent/a\u2028b.xml"),
    ],
)
def test_error_naming_a_hostile_argument_is_one_line(cli: Cli, args: tuple[str, ...]) -> None:
    status, out, err = cli(*args)
    assert status != 0 and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert_clean(err)


@pytest.mark.parametrize(
    "document",
    [
        "<filter name='a&#10;b'/>",
        "<filter name='a&#13;b'/>",
        "<filter name='a&#133;b'/>",
        "<filter name='ok'><filterref filter='x&#10;y&#155;2J'/></filter>",
    ],
)
def test_error_quoting_file_content_is_one_line(
    cli: Cli, tmp_path: Path, document: str
) -> None:
    path = tmp_path / "f.xml"
    path.write_text(document)
    status, _, err = cli("nwfilter-define", str(path))
    assert status == 2 and err.count("\n") == 1
    assert_clean(err)


# -- normal output ---------------------------------------------------------------


def test_success_messages_escape_the_file_name(cli: Cli, tmp_path: Path) -> None:
    fpath = tmp_path / "web\n\x1b[1A.xml"
    fpath.write_text("<filter name='web'/>")
    status, out, _ = cli("nwfilter-define", str(fpath))
    assert status == 0 and out.count("\n") == 1
    assert out.endswith("web\\n\\x1b[1A.xml\n")
    dpath = tmp_path / "vm\r1.xml"
    dpath.write_text("<domain type='test'><name>vm1</name></domain>")
    status, out, _ = cli("define", str(dpath))
    assert status == 0 and "vm\\r1.xml" in out
    assert_clean(out)


def test_listings_escape_names(cli: Cli, tmp_path: Path) -> None:
    # the filter language takes any printable name; a bidirectional
    # override is allowed in it but must not reorder the listing
    path = tmp_path / "f.xml"
    path.write_text("<filter name='evil\u202eexe.txt'/>")
    status, out, _ = cli("nwfilter-define", str(path))
    assert status == 0 and "evil\\u202eexe.txt" in out
    status, out, _ = cli("nwfilter-list")
    assert status == 0 and "evil\\u202eexe.txt" in out
    assert_clean(out)


# -- log lines -------------------------------------------------------------------


def test_log_lines_escape_file_names(tmp_path: Path) -> None:
    root = tmp_path / "root"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    cmd = [sys.executable, "-m", "nwfilter.cli", "--root", str(root), "--backend", "memory"]
    subprocess.run([*cmd, "nwfilter-list"], check=True, env=env, capture_output=True)
    # a file the pool skips, named to forge a log line of its own
    (root / "nwfilter" / "x\nERROR forged: line.xml").write_text("<filter name='y'/>")
    proc = subprocess.run(
        [*cmd, "-v", "nwfilter-list"], env=env, capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0
    warning = [line for line in proc.stderr.splitlines() if "skipping" in line]
    assert len(warning) == 1 and "x\\nERROR forged: line.xml" in warning[0]
    assert not any(line.startswith("ERROR forged") for line in proc.stderr.splitlines())


# -- the daemon's replies ----------------------------------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Server]:
    srv = serve(tmp_path / "root", "memory", None, tmp_path / "d.sock")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()
    thread.join(5)


def test_daemon_error_replies_are_escaped(server: Server) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(str(server.path))
        request = {"id": 1, "method": "filter.dumpxml", "params": {"name": "a\nb\x1b[0m"}}
        sock.sendall(json.dumps(request).encode() + b"\n")
        reply = json.loads(sock.makefile("rb").readline())
    message = reply["error"]["message"]
    assert "a\\nb\\x1b[0m" in message
    assert_clean(message)
