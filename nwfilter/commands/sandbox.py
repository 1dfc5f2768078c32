"""`nwfilter sandbox`: the self-contained demo (see `nwfilter.sandbox`).

The demo never uses the default state root nor the global `--netns`: it
builds its own namespaces and, unless a root is named explicitly (with the
command's `--root`, or a global `--root` other than the default), a
temporary state root that it removes afterwards.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from nwfilter.commands.context import DEFAULT_ROOT
from nwfilter.errors import ValidationError

if TYPE_CHECKING:
    from nwfilter.commands.context import Context

# Backends that only record rules cannot show a frame being dropped.
_KERNEL_BACKENDS = ("nft", "ebiptables")


COMMANDS = ("sandbox",)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "sandbox",
        help="run the demo in private network namespaces (needs root)",
        description=(
            "Build a private lab (a host namespace with a bridge and three namespace "
            "guests using clean-traffic), send legitimate and forged traffic, edit a "
            "filter live, and remove everything again. Touches nothing outside its "
            "own namespaces."
        ),
    )
    p.add_argument("--keep", action="store_true",
                   help="leave the namespaces (and state root) in place for inspection")
    p.add_argument("--backend", dest="sandbox_backend", default=None, metavar="NAME",
                   help="firewall backend to demonstrate (default: the global --backend, nft)")
    p.add_argument("--root", dest="sandbox_root", default=None, metavar="DIR",
                   help="state root to use (default: a temporary directory)")
    p.set_defaults(handler=cmd_sandbox)


def _explicit_root(args: argparse.Namespace) -> Path | None:
    if args.sandbox_root is not None:
        return Path(args.sandbox_root)
    default = os.environ.get("NWFILTER_ROOT", DEFAULT_ROOT)
    return Path(args.root) if args.root != default else None


def cmd_sandbox(args: argparse.Namespace, ctx: Context) -> int:
    from nwfilter.sandbox import SandboxOptions, run_sandbox

    backend = args.sandbox_backend or ctx.backend or "nft"
    if backend not in _KERNEL_BACKENDS:
        raise ValidationError(
            f"the sandbox needs a backend that programs the kernel "
            f"({', '.join(_KERNEL_BACKENDS)}), not '{backend}'"
        )
    options = SandboxOptions(backend=backend, keep=args.keep, root=_explicit_root(args))
    return run_sandbox(options, sys.stdout)
