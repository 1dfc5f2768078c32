"""The binding subcommands: nwfilter-binding-create/-delete/-list/-dumpxml."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from nwfilter.commands.context import Context
from nwfilter.commands.inputs import input_source, read_input
from nwfilter.commands.table import format_table
from nwfilter.conf.binding_xml import format_binding, parse_binding
from nwfilter.conf.model import BindingDef
from nwfilter.render_text import render_text


def register(subparsers: Any) -> None:
    """Add the binding subcommands to the top-level parser."""
    p = subparsers.add_parser(
        "nwfilter-binding-create",
        help="bind ports to filters from <filterbinding> XML files (one transaction)",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="binding XML file ('-': stdin)")
    p.set_defaults(handler=create_handler)

    p = subparsers.add_parser("nwfilter-binding-delete", help="remove a port's binding and rules")
    p.add_argument("portdev", metavar="PORTDEV")
    p.set_defaults(handler=delete_handler)

    p = subparsers.add_parser(
        "nwfilter-binding-list",
        help="list the active bindings, and whether their rules are in force now",
    )
    p.set_defaults(handler=list_handler)

    p = subparsers.add_parser(
        "nwfilter-binding-dumpxml", help="print a binding's XML (and its compiled rules)"
    )
    p.add_argument("portdev", metavar="PORTDEV")
    p.add_argument("--rules", action="store_true", help="also print the rules in force")
    p.set_defaults(handler=dumpxml_handler)


def create_handler(args: argparse.Namespace, ctx: Context) -> int:
    defs: list[BindingDef] = [
        parse_binding(read_input(name), source=input_source(name)) for name in args.files
    ]
    engine = ctx.engine()
    engine.create_bindings(defs)
    for binding in defs:
        print(f"Network filter binding on {binding.portdev} created")
    ctx.warn_unenforced(engine, [b.portdev for b in defs])
    return 0


def delete_handler(args: argparse.Namespace, ctx: Context) -> int:
    ctx.engine().delete_binding(args.portdev)
    print(f"Network filter binding on {args.portdev} deleted")
    return 0


def list_handler(args: argparse.Namespace, ctx: Context) -> int:
    engine = ctx.engine(read_only=True)
    bindings = engine.list_bindings()
    unenforced = engine.enforcement() if bindings else {}
    rows = [
        (b.portdev, b.filterref.filter, "no" if b.portdev in unenforced else "yes")
        for b in bindings
    ]
    sys.stdout.write(format_table(("Port Dev", "Filter", "Enforced"), rows) + "\n")
    ctx.warn(f"port {port} is not enforced: {why}" for port, why in sorted(unenforced.items()))
    return 0


def dumpxml_handler(args: argparse.Namespace, ctx: Context) -> int:
    engine = ctx.engine(read_only=True)
    binding = engine.binding(args.portdev)
    text = format_binding(binding)
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    ctx.warn_unenforced(engine, [args.portdev])
    if args.rules:
        sys.stdout.write(render_text(engine.ruleset(args.portdev)))
    return 0
