"""Subcommand groups of the `nwfilter` command line, one module each.

A group module has `COMMANDS` (the names of its subcommands) and
`register(subparsers)`, which adds them.  Every run of the command line
imports every group, so a group imports at its top only what building its
parsers and talking to nwfilterd need: the filter language's parsers, the
engine, the backends and the helpers of a single command are imported in the
handlers that use them.  A command through nwfilterd then costs little more
than starting Python.
"""

from __future__ import annotations

from collections.abc import Iterable
from types import ModuleType

from nwfilter.commands import (
    audit,
    bindings,
    cluster,
    complete,
    domains,
    events,
    filters,
    host,
    networks,
    sandbox,
)


def command_modules() -> tuple[ModuleType, ...]:
    return (filters, bindings, domains, networks, events, sandbox, host, audit, cluster, complete)


def modules_naming(words: Iterable[str]) -> tuple[ModuleType, ...]:
    """The groups that own a subcommand named by one of `words` (the words
    of a command line: its subcommand is one of them, if it has one)."""
    named = set(words)
    return tuple(module for module in command_modules() if named.intersection(module.COMMANDS))
