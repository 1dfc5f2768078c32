"""The filter subcommands, named and worded like virsh's.

`nwfilter-define`, `nwfilter-undefine`, `nwfilter-list`, `nwfilter-dumpxml`
and `nwfilter-edit`.  Each is one or two API calls (`ctx.call`), answered
by nwfilterd or the embedded engine, which rebuilds the bindings a changed
filter reaches.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from nwfilter.commands.inputs import input_source, read_document
from nwfilter.commands.table import format_table
from nwfilter.errors import NwfilterError, StorageError, ValidationError
from nwfilter.printable import printable

if TYPE_CHECKING:
    from nwfilter.api import Caller
    from nwfilter.commands.context import Context

_UUID_WIDTH = len("00000000-0000-0000-0000-000000000000")

# The choices virsh offers after a failed edit; we keep the two that matter.
EDIT_PROMPT = "Failed. Try again? [y,n,i,f,?]: "
EDIT_HELP = "y - yes, start editor again\nn - no, throw away my changes\n? - print this help\n"


COMMANDS = ("nwfilter-define", "nwfilter-undefine", "nwfilter-list", "nwfilter-dumpxml",
            "nwfilter-edit")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "nwfilter-define", help="define or update a network filter from an XML file"
    )
    p.add_argument("file", metavar="FILE", help="file holding the filter's XML")
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="validate and report what would change, change nothing",
    )
    p.add_argument(
        "--validate", action="store_true", help="only check the document; change nothing"
    )
    p.set_defaults(handler=cmd_define)

    p = subparsers.add_parser("nwfilter-undefine", help="undefine a network filter")
    p.add_argument("filter", metavar="NAME|UUID")
    p.set_defaults(handler=cmd_undefine)

    p = subparsers.add_parser("nwfilter-list", help="list the network filters")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=cmd_list)

    p = subparsers.add_parser("nwfilter-dumpxml", help="print a network filter's XML")
    p.add_argument("filter", metavar="NAME|UUID")
    p.set_defaults(handler=cmd_dumpxml)

    p = subparsers.add_parser(
        "nwfilter-edit", help="edit a network filter's XML in $VISUAL/$EDITOR (default vi)"
    )
    p.add_argument("filter", metavar="NAME|UUID")
    p.set_defaults(handler=cmd_edit)


def cmd_define(args: argparse.Namespace, ctx: Context) -> int:
    xml = read_document(args.file)
    source = input_source(args.file)
    if args.validate:
        result = ctx.call("filter.validate", {"xml": xml, "source": source})
        ctx.info(f"Network filter {result['name']} in {args.file} is valid")
        return 0
    result = ctx.call(
        "filter.define", {"xml": xml, "source": source, "dry_run": args.dry_run}
    )
    if args.dry_run:
        sys.stdout.write(_with_newline(result["summary"]))
    elif not result["changed"]:
        ctx.info(f"Network filter {result['name']} defined from {args.file} (unchanged)")
    else:
        rebuilt = len(result["rebuilt"])
        note = f"; {rebuilt} port{'s' if rebuilt != 1 else ''} rebuilt" if rebuilt else ""
        ctx.info(f"Network filter {result['name']} defined from {args.file}{note}")
    return 0


def cmd_undefine(args: argparse.Namespace, ctx: Context) -> int:
    name = ctx.call("filter.undefine", {"name": args.filter})["name"]
    ctx.info(f"Network filter {name} undefined")
    return 0


def cmd_list(args: argparse.Namespace, ctx: Context) -> int:
    rows = ctx.call("filter.list")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    print(format_list_table([(row["uuid"], row["name"]) for row in rows]), end="")
    return 0


def format_list_table(rows: list[tuple[str, str]]) -> str:
    """virsh's `nwfilter-list` table: header, dashes, rows, a blank line."""
    return format_table(("UUID", "Name"), rows, min_widths=(_UUID_WIDTH,)) + "\n"


def cmd_dumpxml(args: argparse.Namespace, ctx: Context) -> int:
    sys.stdout.write(_with_newline(ctx.call("filter.dumpxml", {"name": args.filter})))
    return 0


def _with_newline(text: str) -> str:
    return text if text.endswith("\n") else text + "\n"


def cmd_edit(args: argparse.Namespace, ctx: Context) -> int:
    return edit_filter(
        ctx.caller(), args.filter, stdin=sys.stdin, stdout=sys.stdout, stderr=sys.stderr
    )


def editor_command() -> list[str]:
    import shlex

    editor = os.environ.get("VISUAL") or os.environ.get("EDITOR") or "vi"
    argv = shlex.split(editor)
    if not argv:
        raise ValidationError(f"cannot run the editor {editor!r}")
    return argv


def edit_filter(
    service: Caller,
    name_or_uuid: str,
    *,
    stdin: TextIO,
    stdout: TextIO,
    stderr: TextIO,
) -> int:
    """virsh's edit loop: edit a copy, define it if valid, offer a retry if not."""
    import tempfile

    from nwfilter.conf import parse_filter

    original = _with_newline(service.call("filter.dumpxml", {"name": name_or_uuid}))
    name = parse_filter(original).name
    fd, tmp_name = tempfile.mkstemp(prefix="nwfilter-edit-", suffix=".xml")
    tmp = Path(tmp_name)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(original)
        while True:
            _run_editor(tmp)
            try:
                edited = tmp.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError) as exc:
                raise StorageError(f"cannot read the edited file '{tmp}': {exc}") from exc
            if edited == original:
                stdout.write(f"Network filter {printable(name)} XML configuration not changed.\n")
                return 0
            try:
                result = service.call(
                    "filter.define", {"xml": edited, "source": f"edited filter '{name}'"}
                )
            except NwfilterError as exc:
                stderr.write(f"error: {exc.message}\n")
                if _ask_retry(stdin, stdout):
                    continue
                return exc.exit_status
            if not result["changed"]:
                stdout.write(
                    f"Network filter {printable(result['name'])} XML configuration not changed.\n"
                )
            else:
                stdout.write(
                    f"Network filter {printable(result['name'])} XML configuration edited.\n"
                )
            return 0
    finally:
        tmp.unlink(missing_ok=True)


def _run_editor(path: Path) -> None:
    import subprocess

    argv = [*editor_command(), str(path)]
    try:
        status = subprocess.call(argv)
    except OSError as exc:
        raise StorageError(f"cannot run the editor '{argv[0]}': {exc.strerror}") from exc
    if status != 0:
        raise ValidationError(f"the editor '{argv[0]}' exited with status {status}")


def _ask_retry(stdin: TextIO, stdout: TextIO) -> bool:
    while True:
        stdout.write(EDIT_PROMPT)
        stdout.flush()
        answer = stdin.readline()
        if not answer:
            stdout.write("\n")
            return False
        choice = answer.strip().lower()
        if choice == "y":
            return True
        if choice == "n":
            return False
        stdout.write(EDIT_HELP)
