"""The command line through nwfilterd stays lean: a command the daemon
answers loads no parser of the filter language, no engine and no backend
in the command's process, and parsing with the parsers of the named
subcommand only gives what the full parser gives."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

import nwfilter
from nwfilter.cli import build_parser, main, parse_args, parse_command_line
from nwfilter.commands import command_modules
from nwfilter.daemon import Server, serve

TREE = Path(nwfilter.__file__).resolve().parent.parent

BINDING = """<filterbinding>
  <owner><name>vm9</name><uuid>c2a3f1a2-8d4e-4a51-9a9e-2f6f1d8e7a11</uuid></owner>
  <portdev name='vnet9'/>
  <mac address='52:54:00:00:00:09'/>
  <filterref filter='clean-traffic'><parameter name='IP' value='10.0.0.9'/></filterref>
</filterbinding>
"""

# What a command through nwfilterd may load of nwfilter: the command line,
# its client and the wire format, the errors, and the input size limit.
ALLOWED = {
    "nwfilter", "nwfilter.cli", "nwfilter.client", "nwfilter.protocol", "nwfilter.errors",
    "nwfilter.printable", "nwfilter.progress", "nwfilter.conf", "nwfilter.conf.limits",
}
# ... and never these, which take longer to load than the call itself
# (dataclasses loads inspect, and the whole of it with ast and dis).
FORBIDDEN = ("lxml", "networkx", "pyroute2", "importlib.metadata", "dataclasses")

# Runs `nwfilter.cli.main(ARGV)` and writes the names of the loaded modules
# to FILE: python -c RUN FILE ARGV...
RUN = """\
import json, sys
from nwfilter.cli import main
status = main(sys.argv[2:])
with open(sys.argv[1], "w") as out:
    json.dump(sorted(sys.modules), out)
sys.exit(status)
"""


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, Server]]:
    root = tmp_path / "served"
    srv = serve(root, "memory", None, None)
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield root, srv
    srv.shutdown()
    srv.server_close()
    srv.engine.close()
    thread.join(5)


def _loaded(tmp_path: Path, argv: list[str]) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    listing = tmp_path / "modules.json"
    env = {key: value for key, value in os.environ.items() if not key.startswith("NWFILTER_")}
    env["PYTHONPATH"] = str(TREE)
    proc = subprocess.run(
        [sys.executable, "-c", RUN, str(listing), *argv], env=env, cwd=tmp_path,
        capture_output=True, text=True, timeout=120, check=False,
    )
    modules: set[str] = set(json.loads(listing.read_text())) if listing.exists() else set()
    return proc, modules


@pytest.mark.parametrize("command", [
    ("nwfilter-list",),
    ("nwfilter-dumpxml", "clean-traffic"),
    ("nwfilter-binding-create", "{binding}"),
    ("nwfilter-binding-dumpxml", "--rules", "vnet9"),
    ("nwfilter-binding-list",),
    ("nwfilter-binding-delete", "vnet9"),
    ("list", "--all"),
    ("net-list", "--all"),
])
def test_a_command_through_the_daemon_loads_no_engine(
    tmp_path: Path, served: tuple[Path, Server], command: tuple[str, ...]
) -> None:
    root, _srv = served
    binding = tmp_path / "binding.xml"
    binding.write_text(BINDING)
    if command[0] != "nwfilter-binding-create":
        main(["--root", str(root), "-q", "nwfilter-binding-create", str(binding)])
    argv = ["--root", str(root), *(a.replace("{binding}", str(binding)) for a in command)]
    proc, modules = _loaded(tmp_path, argv)
    assert proc.returncode == 0, proc.stderr
    assert "nwfilter.client" in modules  # it did go through the daemon
    ours = {m for m in modules if m == "nwfilter" or m.startswith("nwfilter.")}
    assert ours - ALLOWED - {m for m in ours if m.startswith("nwfilter.commands")} == set()
    assert [m for m in modules if m.split(".")[0] in FORBIDDEN or m in FORBIDDEN] == []


def test_each_group_names_the_subcommands_it_registers() -> None:
    for module in command_modules():
        sub = argparse.ArgumentParser().add_subparsers()
        module.register(sub)
        assert tuple(sub.choices) == module.COMMANDS, module.__name__


@pytest.mark.parametrize("argv", [
    ["nwfilter-list", "--json"],
    ["--root", "/r", "-q", "nwfilter-binding-create", "a.xml", "b.xml"],
    ["-c", "/s", "--backend", "memory", "list", "--all", "--name"],
    ["--root", "list", "start", "vm1", "vm2"],  # an option's value named like a command
    ["event", "--kind", "lifecycle", "rebuild", "--timeout", "2.5"],
    ["domid", "3"],
    ["host-move", "--host-netns"],
])
def test_the_named_groups_parse_as_all_of_them(argv: list[str]) -> None:
    assert parse_command_line(argv) == parse_args(build_parser(), argv)


@pytest.mark.parametrize("argv", [
    [], ["--help"], ["-qh"], ["--hel", "list"], ["nosuch"], ["--root", "list", "nosuch"],
    ["list", "--bogus"], ["list", "-h"], ["domid"], ["event", "--timeout", "0"],
    ["nwfilter-list", "extra"], ["--version"], ["-q", "--version"], ["--root", "x"], ["-v"],
])
def test_help_and_errors_are_the_full_parsers(
    argv: list[str], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as narrow:
        parse_command_line(argv)
    seen = capsys.readouterr()
    with pytest.raises(SystemExit) as full:
        parse_args(build_parser(), argv)
    assert (narrow.value.code, seen) == (full.value.code, capsys.readouterr())
