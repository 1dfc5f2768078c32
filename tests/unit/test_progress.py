"""Progress lines: on a terminal only, throttled, cleared when done."""

from __future__ import annotations

import io
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwfilter import progress
from nwfilter.cli import main
from nwfilter.progress import TerminalProgress, counted

BINDING = """<filterbinding>
  <owner><name>vm{i}</name><uuid>c2a3f1a2-8d4e-4a51-9a9e-2f6f1d8e7a{i:02x}</uuid></owner>
  <portdev name='vnet{i}'/>
  <mac address='52:54:00:00:00:{i:02x}'/>
  <filterref filter='clean-traffic'><parameter name='IP' value='10.0.0.{i}'/></filterref>
</filterbinding>
"""
DOMAIN = """<domain type='test'><name>{name}</name><devices>
  <interface type='bridge'><mac address='52:54:00:00:01:{i:02x}'/><source bridge='br0'/>
  <filterref filter='clean-traffic'><parameter name='IP' value='10.0.1.{i}'/></filterref>
  </interface></devices></domain>
"""
CLEAR = "\r\x1b[K"


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_drawn_after_the_start_delay_throttled_and_cleared() -> None:
    out = io.StringIO()
    clock = Clock()
    bar = TerminalProgress(out, enabled=True, start_delay=0.5, interval=0.1, clock=clock)
    bar.update("rebuilding ports", 0, 4)
    assert out.getvalue() == ""  # short work shows nothing
    clock.now += 0.6
    bar.update("rebuilding ports", 1, 4)
    assert out.getvalue() == "\rrebuilding ports: 1/4 (25%)\x1b[K"
    clock.now += 0.05
    bar.update("rebuilding ports", 2, 4)
    assert out.getvalue().count("rebuilding") == 1  # throttled
    clock.now += 0.1
    bar.update("applying the rules of 4 ports", 0, 0)
    assert out.getvalue().endswith("\rapplying the rules of 4 ports...\x1b[K")
    bar.clear()
    assert out.getvalue().endswith("...\x1b[K" + CLEAR)
    size = len(out.getvalue())
    bar.clear()
    assert len(out.getvalue()) == size  # nothing shown, nothing to clear


def test_disabled_writes_nothing() -> None:
    out = io.StringIO()
    clock = Clock()
    bar = TerminalProgress(out, enabled=False, start_delay=0, clock=clock)
    for done in range(10):
        clock.now += 1
        bar.update("work", done, 10)
    bar.clear()
    assert out.getvalue() == ""


@pytest.fixture
def terminal() -> Iterator[tuple[int, io.TextIOWrapper]]:
    """A pseudo-terminal: its master end and a text stream on the other."""
    master, slave = os.openpty()
    os.set_blocking(master, False)
    stream = open(slave, "w", encoding="utf-8", closefd=True)  # noqa: SIM115
    yield master, stream
    stream.close()
    os.close(master)


def _read(master: int) -> str:
    chunks = []
    while True:
        try:
            chunk = os.read(master, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks).decode()


def test_enabled_on_a_terminal_only(terminal: tuple[int, io.TextIOWrapper]) -> None:
    master, stream = terminal
    assert TerminalProgress(stream).enabled
    assert not TerminalProgress(io.StringIO()).enabled
    with open(os.devnull, "w") as null:
        assert not TerminalProgress(null).enabled
    bar = TerminalProgress(stream, start_delay=0)
    bar.update("compiling bindings", 3, 6)
    bar.clear()
    assert _read(master) == "\rcompiling bindings: 3/6 (50%)\x1b[K" + CLEAR


def test_counted_reports_every_step() -> None:
    seen: list[tuple[str, int, int]] = []
    items = list(counted(lambda *report: seen.append(report), "x", ["a", "b"]))
    assert items == ["a", "b"]
    assert seen == [("x", 0, 2), ("x", 1, 2), ("x", 2, 2)]


# -- the command line ---------------------------------------------------------------------


def _root_with_bindings(tmp_path: Path, count: int) -> tuple[Path, Path]:
    root = tmp_path / "root"
    files = []
    for i in range(1, count + 1):
        path = tmp_path / f"b{i}.xml"
        path.write_text(BINDING.format(i=i))
        files.append(str(path))
    assert main(["--root", str(root), "--backend", "memory", "-q",
                 "nwfilter-binding-create", *files]) == 0
    changed = tmp_path / "no-mac-spoofing.xml"
    changed.write_text(
        "<filter name='no-mac-spoofing' chain='mac' priority='-800'>"
        "<uuid>87ab8a66-70b7-47af-9b45-dd0eeedd7b3d</uuid>"
        "<rule action='return' direction='out' priority='500'><mac srcmacaddr='$MAC'/></rule>"
        "<rule action='drop' direction='out' priority='600'><mac/></rule></filter>"
    )
    return root, changed


def test_a_rebuild_on_a_terminal_shows_progress_then_clears_it(
    tmp_path: Path, terminal: tuple[int, io.TextIOWrapper], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root, changed = _root_with_bindings(tmp_path, 5)
    capsys.readouterr()
    master, stream = terminal
    monkeypatch.setattr(progress, "START_DELAY", 0.0)
    monkeypatch.setattr(sys, "stderr", stream)
    assert main(["--root", str(root), "nwfilter-define", str(changed)]) == 0
    shown = _read(master)
    assert shown.startswith("\rcompiling bindings: 0/5 (0%)\x1b[K")  # the engine's start
    assert shown.endswith(CLEAR)
    assert "5 ports rebuilt" in capsys.readouterr().out


@pytest.mark.parametrize("quiet", [False, True])
def test_no_progress_off_a_terminal_nor_with_quiet(
    tmp_path: Path, terminal: tuple[int, io.TextIOWrapper], monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str], quiet: bool,
) -> None:
    root, changed = _root_with_bindings(tmp_path, 5)
    monkeypatch.setattr(progress, "START_DELAY", 0.0)
    if quiet:
        master, stream = terminal
        monkeypatch.setattr(sys, "stderr", stream)
    capsys.readouterr()
    args = ["--root", str(root), *(["-q"] if quiet else []), "nwfilter-define", str(changed)]
    assert main(args) == 0
    if quiet:
        assert _read(master) == ""
    else:
        assert capsys.readouterr().err == ""


def test_several_domains_in_one_command(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = tmp_path / "root"
    r = ["--root", str(root), "--backend", "memory"]
    for i, name in enumerate(("vm1", "vm2", "vm3"), start=1):
        path = tmp_path / f"{name}.xml"
        path.write_text(DOMAIN.format(name=name, i=i))
        assert main([*r, "-q", "define", str(path)]) == 0
    capsys.readouterr()
    assert main([*r, "start", "vm1", "vm2"]) == 0
    assert capsys.readouterr().out == "Domain 'vm1' started\n\nDomain 'vm2' started\n\n"
    # in order, up to the first that fails
    assert main([*r, "destroy", "vm2", "nope", "vm1"]) == 3
    captured = capsys.readouterr()
    assert captured.out == "Domain 'vm2' destroyed\n\n"
    assert "nope" in captured.err
    assert main([*r, "list", "--name"]) == 0
    assert capsys.readouterr().out == "vm1\n\n"
