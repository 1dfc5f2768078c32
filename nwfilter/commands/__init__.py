"""Subcommand groups of the `nwfilter` command line, one module each."""

from __future__ import annotations

import importlib
from types import ModuleType

_NAMES = ("filters", "bindings", "domains", "sandbox")


def command_modules() -> tuple[ModuleType, ...]:
    modules = []
    for name in _NAMES:
        try:
            modules.append(importlib.import_module(f"nwfilter.commands.{name}"))
        except ModuleNotFoundError as exc:
            if exc.name != f"nwfilter.commands.{name}":
                raise
    return tuple(modules)

