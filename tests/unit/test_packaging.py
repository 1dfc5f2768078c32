"""The shipped man pages and bash completion: generated from the parsers,
up to date, rendered without warnings, and completing with bash itself."""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from nwfilter.cli import build_parser
from nwfilter.cli import main as cli_main
from nwfilter.daemon import build_parser as build_daemon_parser
from nwfilter.docgen import completion, manpage
from nwfilter.docgen.generated import (
    COMPLETION,
    MAN_NWFILTER,
    MAN_NWFILTERD,
    TOP,
    generated_files,
)
from nwfilter.docgen.parserinfo import describe

DOMAIN = """<domain type='test'>
  <name>{name}</name>
  <devices><interface type='bridge'><mac address='52:54:00:00:00:{n:02x}'/>
    <source bridge='br0'/><target dev='vnet{n}'/>
    <filterref filter='clean-traffic'><parameter name='IP' value='10.0.0.{n}'/></filterref>
  </interface></devices>
</domain>
"""


# -- the shipped files --------------------------------------------------------------------


@pytest.mark.parametrize("rel", [COMPLETION, MAN_NWFILTER, MAN_NWFILTERD])
def test_shipped_file_is_the_generated_one(rel: str) -> None:
    shipped = (TOP / rel).read_text(encoding="utf-8")
    assert shipped == generated_files()[rel], (
        f"{rel} is out of date: run tools/gen_packaging.py"
    )


def test_every_command_and_option_is_in_the_man_page() -> None:
    page = (TOP / MAN_NWFILTER).read_text(encoding="utf-8")
    info = describe(build_parser())
    assert len(info.commands) > 20
    for command in info.commands:
        assert f".TP\n\\fB{manpage.esc(command.name)}\\fR" in page, command.name
        for option in command.options:
            for flag in option.flags:
                assert f"\\fB{manpage.esc(flag)}\\fR" in page, (command.name, flag)
    for option in info.top.options:
        assert f"\\fB{manpage.esc(option.flags[-1])}\\fR" in page
    assert "__complete" not in page
    daemon_page = (TOP / MAN_NWFILTERD).read_text(encoding="utf-8")
    for option in describe(build_daemon_parser()).top.options:
        assert f"\\fB{manpage.esc(option.flags[-1])}\\fR" in daemon_page


def test_a_new_option_reaches_both_generated_files() -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    sub.choices["nwfilter-list"].add_argument("--brand-new", action="store_true", help="new")
    p = sub.add_parser("brand-new-command", help="does new things")
    p.add_argument("portdev", metavar="PORTDEV")
    info = describe(parser)
    page = manpage.nwfilter_page(info, ())
    assert "\\fB\\-\\-brand\\-new\\fR" in page
    assert ".SS Other commands" in page and "\\fBbrand\\-new\\-command\\fR" in page
    script = completion.generate([info])
    assert "'nwfilter-list') echo '--json --brand-new'" in script
    assert "'brand-new-command') echo 'ports 1'" in script


@pytest.mark.parametrize("rel", [MAN_NWFILTER, MAN_NWFILTERD])
def test_man_page_renders_without_warnings(rel: str) -> None:
    if shutil.which("groff") is None:
        pytest.skip("groff is not installed (tools/install.sh installs groff-base)")
    result = subprocess.run(
        ["groff", "-ww", "-man", "-Tutf8", "-z", str(TOP / rel)],
        capture_output=True, text=True, check=False,
    )
    assert result.returncode == 0
    assert result.stderr == ""


def test_man_page_escapes_roff() -> None:
    assert manpage.esc(".start") == "\\&.start"
    assert manpage.esc("'q") == "\\&'q"
    assert manpage.esc("a-b\\c") == "a\\-b\\ec"


# -- completing with bash -----------------------------------------------------------------


@pytest.fixture
def tool(tmp_path: Path) -> Path:
    """An `nwfilter` that runs this tree's code."""
    path = tmp_path / "nwfilter"
    path.write_text(
        f"#!/bin/sh\nPYTHONPATH={TOP} exec {sys.executable} -m nwfilter.cli \"$@\"\n"
    )
    path.chmod(0o755)
    return path


def complete(*words: str, function: str = "_nwfilter") -> list[str]:
    """What bash's completion function offers for `words` (the last one being
    completed), sorted."""
    script = (
        'source "$1"; shift; COMP_WORDS=("$@"); COMP_CWORD=$(( $# - 1 )); '
        f'{function}; printf "%s\\0" "${{COMPREPLY[@]}}"'
    )
    result = subprocess.run(
        ["bash", "--norc", "--noprofile", "-c", script, "bash", str(TOP / COMPLETION), *words],
        capture_output=True, text=True, check=True, timeout=60,
    )
    assert result.stderr == ""
    # one word per element: an element holding several would be one candidate
    return sorted(word for word in result.stdout.split("\0") if word)


def test_completes_commands_and_their_options(tool: Path) -> None:
    assert complete(str(tool), "nwfilter-binding-d") == [
        "nwfilter-binding-delete", "nwfilter-binding-dumpxml",
    ]
    assert complete(str(tool), "--root", "/x", "list", "--state-") == [
        "--state-paused", "--state-running", "--state-shutoff",
    ]
    assert complete(str(tool), "--ver") == ["--verbose", "--version"]
    assert complete(str(tool), "host-move", "--") == ["--backend", "--host-netns", "--netns"]
    assert complete(str(tool), "--backend", "") == ["ebiptables", "memory", "nft"]
    assert complete(str(tool), "--backend", "=", "m") == ["memory"]
    assert complete("nwfilterd", "--w", function="_nwfilterd") == ["--workers"]
    assert complete("nwfilterd", "--workers", "", function="_nwfilterd") == []


def test_completes_paths(tool: Path, tmp_path: Path) -> None:
    (tmp_path / "dir-a").mkdir()
    (tmp_path / "dir b").mkdir()
    (tmp_path / "file-b.xml").write_text("")
    (tmp_path / "my filter.xml").write_text("")
    assert complete(str(tool), "--root", f"{tmp_path}/d") == [
        f"{tmp_path}/dir b", f"{tmp_path}/dir-a",
    ]
    offered = complete(str(tool), "nwfilter-define", f"{tmp_path}/")
    assert f"{tmp_path}/file-b.xml" in offered
    assert f"{tmp_path}/my filter.xml" in offered


def _memory_root(root: Path, *args: str) -> None:
    assert cli_main(["--root", str(root), "--backend", "memory", "-q", *args]) == 0


def test_completes_names_from_the_root_given_earlier(tool: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    other = tmp_path / "other"
    for i, name in ((1, "vm1"), (2, "vm2")):
        path = tmp_path / f"{name}.xml"
        path.write_text(DOMAIN.format(name=name, n=i))
        _memory_root(root, "define", str(path))
    _memory_root(root, "start", "vm2")
    (tmp_path / "web.xml").write_text(
        "<filter name='web-only-here' chain='ipv4'>"
        "<rule action='accept' direction='in'><tcp dstportstart='80'/></rule></filter>"
    )
    _memory_root(root, "nwfilter-define", str(tmp_path / "web.xml"))
    _memory_root(other, "nwfilter-list")

    t = str(tool)
    assert complete(t, "--root", str(root), "nwfilter-dumpxml", "web") == ["web-only-here"]
    assert complete(t, "--root", str(other), "nwfilter-dumpxml", "web") == []
    assert "clean-traffic" in complete(t, "--root", str(root), "nwfilter-undefine", "")
    assert complete(t, "--root", "=", str(root), "nwfilter-edit", "web") == ["web-only-here"]
    assert complete(t, f"--root={root}", "nwfilter-edit", "web") == ["web-only-here"]
    assert complete(t, "--root", str(root), "nwfilter-binding-delete", "") == ["vnet2"]
    assert complete(t, "--root", str(root), "nwfilter-binding-dumpxml", "--rules", "v") == [
        "vnet2"
    ]
    assert complete(t, "--root", str(root), "dominfo", "") == ["vm1", "vm2"]
    assert complete(t, "--root", str(root), "start", "") == ["vm1"]
    assert complete(t, "--root", str(root), "destroy", "") == ["vm2"]
    # one argument taken: nothing more to offer but options
    assert complete(t, "--root", str(root), "dominfo", "vm1", "") == []


def test_names_of_a_missing_root_complete_to_nothing_and_create_nothing(
    tool: Path, tmp_path: Path
) -> None:
    missing = tmp_path / "missing"
    assert complete(str(tool), "--root", str(missing), "nwfilter-dumpxml", "") == []
    assert not missing.exists()


def test_complete_command_is_hidden(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        cli_main(["--help"])
    assert "__complete" not in capsys.readouterr().out
