"""The `nwfilter` command line: global options, dispatch, error mapping.

The CLI is thin: each group of subcommands lives in a module of
`nwfilter.commands` exposing `register(subparsers)`; a handler receives the
parsed arguments and a `Context` that builds the engine lazily.  Errors of
the engine become one line on stderr and the exit status of their code.

A run builds the parsers of the groups its words name only (building them
all costs more than a call through nwfilterd); what would show the other
groups (help, an unknown command) or an error is left to the full parser,
so that the output is the same.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any, NoReturn

from nwfilter.commands import command_modules, modules_naming
from nwfilter.commands.context import DEFAULT_ROOT, Context
from nwfilter.errors import NwfilterError
from nwfilter.printable import configure_logging


class _NeedsFullParser(Exception):
    """The narrow parser met what only the full one shows right."""


class _NarrowParser(argparse.ArgumentParser):
    """The top level of a parser with some of the subcommands: it leaves
    its help (which lists the subcommands) and its errors (an unknown
    subcommand lists them too) to the full parser.  The subcommands' own
    parsers are the full parser's, and report their errors themselves."""

    def error(self, message: str) -> NoReturn:
        raise _NeedsFullParser(message)

    def print_help(self, file: object = None) -> NoReturn:
        raise _NeedsFullParser("help")


def build_parser(
    modules: Sequence[ModuleType] | None = None,
    parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser,
) -> argparse.ArgumentParser:
    """The parser of the subcommands of `modules` (default: all)."""
    parser = parser_class(
        prog="nwfilter",
        description="Network filters for VM ports, in libvirt's nwfilter language.",
    )
    parser.add_argument(
        "--root",
        default=os.environ.get("NWFILTER_ROOT", DEFAULT_ROOT),
        help=f"state root directory (default: $NWFILTER_ROOT or {DEFAULT_ROOT})",
    )
    # Both default to "not given": the root then uses the host it recorded at
    # first use, and refuses a given value that differs (see host-move).
    parser.add_argument(
        "--backend",
        default=os.environ.get("NWFILTER_BACKEND") or None,
        help="firewall backend: nft, ebiptables or memory (default: $NWFILTER_BACKEND, else the "
        "root's recorded one, else nft)",
    )
    parser.add_argument(
        "--netns",
        default=os.environ.get("NWFILTER_NETNS") or None,
        help="network namespace whose kernel rules the backend manages (default: "
        "$NWFILTER_NETNS, else the root's recorded one, else the host's)",
    )
    parser.add_argument(
        "-c", "--connect", default=os.environ.get("NWFILTER_SOCKET") or None, metavar="SOCKET",
        help="nwfilterd socket to use (default: the root's, when a daemon serves it)",
    )
    parser.add_argument("-q", "--quiet", action="store_true",
                        help="print results only, no messages about what was done")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more logging")
    parser.add_argument("--version", action=VersionAction)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True,
                                parser_class=argparse.ArgumentParser)
    for module in command_modules() if modules is None else modules:
        module.register(sub)
    return parser


class VersionAction(argparse.Action):
    """`--version`, as argparse's own prints it; the version is looked up
    only when asked (the package metadata takes longer to load than the
    rest of a command)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS,
                 default: Any = argparse.SUPPRESS,
                 help: str = "show program's version number and exit") -> None:
        super().__init__(option_strings, dest=dest, default=default, nargs=0, help=help)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: Any, option_string: str | None = None) -> None:
        parser._print_message(version_text() + "\n", sys.stdout)
        parser.exit()


def version_text() -> str:
    from importlib import metadata

    try:
        ours = metadata.version("nwfilter")
    except metadata.PackageNotFoundError:  # pragma: no cover - run from a bare checkout
        ours = "unknown"
    # Where the tools' links lead: no process is started.
    from nwfilter.backends.ebiptables.tools import describe

    return f"nwfilter {ours}; {describe()}"


def parse_command_line(argv: Sequence[str] | None) -> argparse.Namespace:
    """The arguments, parsed with the groups their words name; the full
    parser's answer whenever that parser would differ."""
    words = sys.argv[1:] if argv is None else list(argv)
    try:
        # With no group named, only --version gets through.
        return parse_args(build_parser(modules_naming(words), _NarrowParser), words)
    except _NeedsFullParser:
        return parse_args(build_parser(), words)


def parse_args(
    parser: argparse.ArgumentParser, argv: Sequence[str] | None
) -> argparse.Namespace:
    """Parse, reporting an unknown option with the usage of the subcommand
    it was given to rather than the top level's."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        sub = _subparser(parser, args.command)
        (sub or parser).error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def _subparser(
    parser: argparse.ArgumentParser, command: str | None
) -> argparse.ArgumentParser | None:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction) and command in action.choices:
            found: argparse.ArgumentParser = action.choices[command]
            return found
    return None


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_command_line(argv)
    configure_logging(
        logging.WARNING - 10 * min(args.verbose, 2), "%(levelname)s %(name)s: %(message)s"
    )
    ctx = Context(
        root=args.root, backend=args.backend, netns=args.netns, connect=args.connect,
        quiet=args.quiet,
    )
    try:
        status: int = args.handler(args, ctx)
    except NwfilterError as exc:
        print(f"error: {exc.message}", file=sys.stderr)
        return exc.exit_status
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    finally:
        ctx.close()
    return status


if __name__ == "__main__":
    sys.exit(main())
