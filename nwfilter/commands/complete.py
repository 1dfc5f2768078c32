"""`nwfilter __complete KIND`: names for the shell's completion, one a line.

Internal (not in the help nor the man page): the bash completion runs it
for filter names, domain names and port devices.  It only reads, through
the one control path (the daemon serving the root, or a read-only engine
that waits at most a second for the root's lock), and never creates a
missing root.  A failure prints nothing: a completion must not write
errors into the command line being typed.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from nwfilter.errors import NwfilterError

if TYPE_CHECKING:
    from nwfilter.commands.context import Context

LOCK_TIMEOUT = 1.0


def _domains(rows: list[dict[str, Any]], active: bool | None) -> list[str]:
    return [r["name"] for r in rows if active is None or (r["id"] is not None) == active]


#: kind -> (API method, what to print of its rows)
KINDS: dict[str, tuple[str, Any]] = {
    "filters": ("filter.list", lambda rows: [r["name"] for r in rows]),
    "ports": ("binding.list", lambda rows: [r["portdev"] for r in rows]),
    "domains": ("domain.list", lambda rows: _domains(rows, None)),
    "active-domains": ("domain.list", lambda rows: _domains(rows, True)),
    "inactive-domains": ("domain.list", lambda rows: _domains(rows, False)),
}


COMMANDS = ("__complete",)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("__complete")  # no help: not listed
    p.add_argument("kind", choices=sorted(KINDS))
    p.set_defaults(handler=cmd_complete)


def completion_words(names: list[str]) -> list[str]:
    """The names a shell can offer as one word each, sorted."""
    return sorted({n for n in names if n.isprintable() and not any(c.isspace() for c in n)})


def cmd_complete(args: argparse.Namespace, ctx: Context) -> int:
    if ctx.connect is None and not ctx.root_path.is_dir():
        return 0  # nothing defined yet, and a query must not create the root
    method, pick = KINDS[args.kind]
    ctx.lock_timeout = LOCK_TIMEOUT
    try:
        names = pick(ctx.call(method))
    except NwfilterError:
        return 1
    for name in completion_words(names):
        print(name)
    return 0
