"""Subcommand groups of the `nwfilter` command line, one module each."""

from __future__ import annotations

from types import ModuleType

from nwfilter.commands import (
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
    return (filters, bindings, domains, networks, events, sandbox, host, cluster, complete)
