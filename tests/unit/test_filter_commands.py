"""The virsh-like filter subcommands, run through `nwfilter.cli.main`."""

from __future__ import annotations

import io
import json
import shlex
import sys
from pathlib import Path

import pytest

from nwfilter.cli import main
from nwfilter.commands.filters import EDIT_PROMPT, format_list_table
from nwfilter.conf import parse_filter

WEB = """<filter name='web' chain='ipv4'>
  <rule action='accept' direction='in'><tcp dstportstart='80'/></rule>
  <filterref filter='clean-traffic'/>
</filter>
"""


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


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def test_define_list_dumpxml_undefine(cli: Cli, tmp_path: Path) -> None:
    path = write(tmp_path, "web.xml", WEB)
    assert cli("nwfilter-define", path) == (0, f"Network filter web defined from {path}\n", "")
    # Without a <uuid> the second define would name a new filter (libvirt
    # refuses that); the dumped form carries the uuid and changes nothing.
    dumped = write(tmp_path, "web-dumped.xml", cli("nwfilter-dumpxml", "web")[1])
    assert cli("nwfilter-define", dumped) == (
        0, f"Network filter web defined from {dumped} (unchanged)\n", ""
    )
    status, out, _ = cli("nwfilter-list")
    assert status == 0
    lines = out.split("\n")
    assert lines[0] == " UUID                                   Name"
    assert lines[1] == "-" * (1 + 36 + 3 + len("qemu-announce-self-rarp") + 2)
    assert out.endswith("\n\n")
    names = [line.split()[1] for line in lines[2:] if line]
    assert names == sorted(names) and "web" in names and len(names) == 25

    status, xml, _ = cli("nwfilter-dumpxml", "web")
    assert status == 0
    fdef = parse_filter(xml)
    assert fdef.name == "web" and fdef.referenced_names() == {"clean-traffic"}
    # by UUID too, and the output is stable
    assert cli("nwfilter-dumpxml", str(fdef.uuid))[1] == xml
    again = write(tmp_path, "again.xml", xml)
    assert cli("nwfilter-define", again)[0] == 0
    assert cli("nwfilter-dumpxml", "web")[1] == xml

    assert cli("nwfilter-undefine", str(fdef.uuid)) == (0, "Network filter web undefined\n", "")
    status, _, err = cli("nwfilter-dumpxml", "web")
    assert status == 3 and "'web'" in err


def test_list_json(cli: Cli) -> None:
    status, out, _ = cli("nwfilter-list", "--json")
    assert status == 0
    rows = json.loads(out)
    assert len(rows) == 24
    row = next(r for r in rows if r["name"] == "no-mac-spoofing")
    assert row == {
        "uuid": "87ab8a66-70b7-47af-9b45-dd0eeedd7b3d",
        "name": "no-mac-spoofing",
        "chain": "mac",
        "priority": -800,
        "rules": 2,
    }


def test_list_table_format() -> None:
    assert format_list_table([]) == (
        " UUID                                   Name\n" + "-" * 46 + "\n\n"
    )


def test_dry_run_changes_nothing(cli: Cli, tmp_path: Path) -> None:
    path = write(tmp_path, "web.xml", WEB)
    status, out, _ = cli("nwfilter-define", path, "--dry-run")
    assert status == 0 and "would be defined" in out
    assert cli("nwfilter-dumpxml", "web")[0] == 3
    assert not (cli.root / "nwfilter" / "web.xml").exists()


@pytest.mark.parametrize(
    ("text", "status"),
    [
        ("<filter name='x'><rule", 2),  # not well-formed
        ("<filter name='x'><rule action='maybe' direction='in'/></filter>", 2),
        ("<filter name='../../evil'><rule action='drop' direction='in'/></filter>", 2),
        ("<filter name='loop'><filterref filter='loop'/></filter>", 4),
        ("<filter name='clean-traffic'><uuid>00000000-0000-4000-8000-000000000001</uuid>"
         "</filter>", 4),
    ],
)
def test_invalid_define_is_one_line_and_changes_nothing(
    cli: Cli, tmp_path: Path, text: str, status: int
) -> None:
    before = cli("nwfilter-list", "--json")[1]
    path = write(tmp_path, "bad.xml", text)
    got, out, err = cli("nwfilter-define", path)
    assert got == status and out == ""
    assert err.startswith("error: ") and err.count("\n") == 1
    assert cli("nwfilter-list", "--json")[1] == before
    assert not (tmp_path / "evil.xml").exists()


def test_missing_file(cli: Cli, tmp_path: Path) -> None:
    status, _, err = cli("nwfilter-define", str(tmp_path / "nope.xml"))
    assert status != 0 and "nope.xml" in err


def test_undefine_in_use_and_unknown(cli: Cli) -> None:
    status, _, err = cli("nwfilter-undefine", "no-mac-spoofing")
    assert status == 4 and "clean-traffic" in err
    status, _, err = cli("nwfilter-undefine", "nosuch")
    assert status == 3 and "'nosuch'" in err


# -------------------------------------------------------------------- edit

EDITOR = r"""
import sys
from pathlib import Path
state = Path(sys.argv[1])
target = Path(sys.argv[-1])
runs = int(state.read_text()) if state.exists() else 0
state.write_text(str(runs + 1))
mode = sys.argv[2].split(",")[min(runs, len(sys.argv[2].split(",")) - 1)]
text = target.read_text()
if mode == "bad":
    target.write_text(text.replace("<rule ", "<rule action2='x' ", 1))
elif mode == "good":
    # a retry edits the file as the failed attempt left it
    text = text.replace("action2='x' ", "")
    for quote in "'\"":
        text = text.replace(f"priority={quote}-800", f"priority={quote}-801", 1)
    target.write_text(text)
"""


def use_editor(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, modes: str) -> Path:
    script = tmp_path / "editor.py"
    script.write_text(EDITOR)
    state = tmp_path / "runs"
    cmd = shlex.join([sys.executable, str(script), str(state), modes])
    monkeypatch.delenv("VISUAL", raising=False)
    monkeypatch.setenv("EDITOR", cmd)
    return state


def test_edit_unchanged(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_editor(monkeypatch, tmp_path, "same")
    status, out, _ = cli("nwfilter-edit", "no-mac-spoofing")
    assert (status, out) == (0, "Network filter no-mac-spoofing XML configuration not changed.\n")


def test_edit_valid(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_editor(monkeypatch, tmp_path, "good")
    status, out, _ = cli("nwfilter-edit", "no-mac-spoofing")
    assert (status, out) == (0, "Network filter no-mac-spoofing XML configuration edited.\n")
    assert parse_filter(cli("nwfilter-dumpxml", "no-mac-spoofing")[1]).priority == -801


def test_edit_invalid_then_abort(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    before = cli("nwfilter-dumpxml", "no-mac-spoofing")[1]
    use_editor(monkeypatch, tmp_path, "bad")
    monkeypatch.setattr(sys, "stdin", io.StringIO("x\nn\n"))
    status, out, err = cli("nwfilter-edit", "no-mac-spoofing")
    assert status == 2
    assert out.count(EDIT_PROMPT) == 2 and "n - no" in out
    assert err.startswith("error: ")
    assert cli("nwfilter-dumpxml", "no-mac-spoofing")[1] == before


def test_edit_invalid_then_retry(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    state = use_editor(monkeypatch, tmp_path, "bad,good")
    monkeypatch.setattr(sys, "stdin", io.StringIO("y\n"))
    status, out, _ = cli("nwfilter-edit", "no-mac-spoofing")
    assert status == 0 and out.endswith("XML configuration edited.\n")
    assert state.read_text() == "2"
    assert parse_filter(cli("nwfilter-dumpxml", "no-mac-spoofing")[1]).priority == -801


def test_edit_eof_aborts(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    use_editor(monkeypatch, tmp_path, "bad")
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert cli("nwfilter-edit", "no-mac-spoofing")[0] == 2


# ---------------------------------------------------------- inputs, bindings

BINDING = """<filterbinding>
  <owner><name>vm1</name><uuid>c2a3f1a2-8d4e-4a51-9a9e-2f6f1d8e7a11</uuid></owner>
  <portdev name='vnet0'/>
  <mac address='52:54:00:00:00:01'/>
  <filterref filter='clean-traffic'><parameter name='IP' value='10.0.0.2'/></filterref>
</filterbinding>"""


def test_non_utf8_filter_file_names_the_file(cli: Cli, tmp_path: Path) -> None:
    path = tmp_path / "latin1.xml"
    path.write_bytes("<filter name='caf\u00e9'/>".encode("latin-1"))
    status, out, err = cli("nwfilter-define", str(path))
    assert (status, out) == (2, "")
    assert err.startswith(f"error: {path}: ") and "UTF-8" in err and err.count("\n") == 1


def test_oversized_input_is_refused_before_parsing(cli: Cli, tmp_path: Path) -> None:
    from nwfilter.commands.inputs import MAX_INPUT_BYTES

    path = tmp_path / "big.xml"
    path.write_bytes(b" " * (MAX_INPUT_BYTES + 1))
    status, _, err = cli("nwfilter-binding-create", str(path))
    assert status == 2 and "big.xml" in err and "larger than" in err


def test_binding_create_list_delete(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(BINDING.encode()))
    monkeypatch.setattr(sys, "stdin", stdin)
    assert cli("nwfilter-binding-create", "-") == (
        0, "Network filter binding on vnet0 created\n", ""
    )
    assert cli("nwfilter-binding-list") == (
        0,
        " Port Dev   Filter          Enforced\n" + "-" * 38
        + "\n vnet0      clean-traffic   yes\n\n",
        "",
    )
    assert cli("nwfilter-binding-delete", "vnet0")[0] == 0
    assert cli("nwfilter-binding-list")[1] == (
        " Port Dev   Filter   Enforced\n" + "-" * 31 + "\n\n"
    )


def test_binding_errors_name_stdin(
    cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(BINDING.replace("vnet0", "a/b").encode()))
    monkeypatch.setattr(sys, "stdin", stdin)
    status, _, err = cli("nwfilter-binding-create", "-")
    assert status == 2 and err.startswith("error: <stdin>: ")


@pytest.mark.parametrize(("name", "why"), [
    ("v\\*", "must not end with '*'"), ("v*", "must not end with '*'"), ("*", "catch-all"),
    ("@v", "set reference"),
])
def test_binding_create_refuses_names_nft_reads_specially(
    cli: Cli, monkeypatch: pytest.MonkeyPatch, name: str, why: str
) -> None:
    stdin = io.TextIOWrapper(io.BytesIO(BINDING.replace("vnet0", name).encode()))
    monkeypatch.setattr(sys, "stdin", stdin)
    status, out, err = cli("nwfilter-binding-create", "-")
    assert (status, out) == (2, "")
    assert repr(name) in err and why in err
    assert cli("nwfilter-binding-list")[1] == " Port Dev   Filter   Enforced\n" + "-" * 31 + "\n\n"
