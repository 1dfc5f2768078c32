"""Subcommand groups of the `nwfilter` command line, one module each."""

from __future__ import annotations

from types import ModuleType

from nwfilter.commands import bindings, complete, domains, events, filters, host, sandbox


def command_modules() -> tuple[ModuleType, ...]:
    return (filters, bindings, domains, events, sandbox, host, complete)
