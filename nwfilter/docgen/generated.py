"""The files generated from the parsers, by their path in the source tree."""

from __future__ import annotations

import os
from pathlib import Path

from nwfilter.docgen import completion, manpage
from nwfilter.docgen.parserinfo import describe

#: the top of the source tree
TOP = Path(__file__).resolve().parent.parent.parent

COMPLETION = "contrib/bash-completion/nwfilter"
MAN_NWFILTER = "docs/man/nwfilter.1"
MAN_NWFILTERD = "docs/man/nwfilterd.8"

_ENVIRONMENT = ("NWFILTER_ROOT", "NWFILTER_BACKEND", "NWFILTER_NETNS", "NWFILTER_SOCKET")


def generated_files() -> dict[str, str]:
    """Path (relative to the top) -> content.  The parsers read defaults
    from the environment; they are built without it, so the output is the
    same everywhere."""
    from nwfilter.cli import build_parser
    from nwfilter.commands import command_modules
    from nwfilter.daemon import build_parser as build_daemon_parser

    saved = {name: os.environ.pop(name) for name in _ENVIRONMENT if name in os.environ}
    try:
        cli = describe(build_parser())
        daemon = describe(build_daemon_parser())
    finally:
        os.environ.update(saved)
    return {
        COMPLETION: completion.generate([cli, daemon]),
        MAN_NWFILTER: manpage.nwfilter_page(cli, command_modules()),
        MAN_NWFILTERD: manpage.nwfilterd_page(daemon),
    }
