"""The domain subcommands, named and worded like virsh's (embedded mode).

`define`, `undefine`, `start`, `shutdown`, `destroy`, `suspend`, `resume`,
`list`, `dumpxml`, `domiflist`, `domstate` and `autostart`.  Each call
builds the engine of the state root (which re-applies every binding), then
the domain manager, which finds running domains again; guests of the `test`
type keep their records under the state root, so they outlive the command.
"""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING

from nwfilter.commands.inputs import input_source, read_input
from nwfilter.commands.table import format_table
from nwfilter.conf import parse_domain

if TYPE_CHECKING:
    from nwfilter.commands.context import Context
    from nwfilter.domain.driver import DomainManager


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("define", help="define or update a domain from an XML file")
    p.add_argument("file", metavar="FILE", help="file holding the domain's XML ('-': stdin)")
    p.set_defaults(handler=cmd_define)

    for name, helptext, handler in (
        ("undefine", "undefine a domain", cmd_undefine),
        ("start", "start a defined domain (its filters are applied first)", cmd_start),
        ("shutdown", "gracefully shut a domain down", cmd_shutdown),
        ("destroy", "stop a domain at once", cmd_destroy),
        ("suspend", "pause a domain", cmd_suspend),
        ("resume", "continue a paused domain", cmd_resume),
        ("domiflist", "list a domain's interfaces", cmd_domiflist),
    ):
        p = subparsers.add_parser(name, help=helptext)
        p.add_argument("domain", metavar="NAME")
        p.set_defaults(handler=handler)

    p = subparsers.add_parser("list", help="list domains (active ones unless --all)")
    p.add_argument("--all", action="store_true", help="include inactive domains")
    p.set_defaults(handler=cmd_list)

    p = subparsers.add_parser("dumpxml", help="print a domain's XML")
    p.add_argument("domain", metavar="NAME")
    p.add_argument("--inactive", action="store_true",
                   help="the persistent definition, not the running one")
    p.set_defaults(handler=cmd_dumpxml)

    p = subparsers.add_parser("domstate", help="print a domain's state")
    p.add_argument("domain", metavar="NAME")
    p.add_argument("--reason", action="store_true", help="also print the reason")
    p.set_defaults(handler=cmd_domstate)

    p = subparsers.add_parser("autostart", help="start a domain when the daemon starts")
    p.add_argument("domain", metavar="NAME")
    p.add_argument("--disable", action="store_true", help="do not autostart it any more")
    p.set_defaults(handler=cmd_autostart)


def _manager(ctx: Context, *, query: bool = False) -> DomainManager:
    """The domain manager on this root.  A `query` one reads the recorded
    state only: no kernel rule, guest or file is touched."""
    from nwfilter.domain.driver import DomainManager

    manager = DomainManager.for_engine(ctx.engine(read_only=query), netns=ctx.netns)
    manager.start(autostart=False, take_over=not query)
    return manager


def cmd_define(args: argparse.Namespace, ctx: Context) -> int:
    # Parsed here, from the bytes, so encoding errors name the file.
    parsed = parse_domain(read_input(args.file), source=input_source(args.file))
    definition = _manager(ctx).define(parsed)
    print(f"Domain '{definition.name}' defined from {args.file}\n")
    return 0


def cmd_undefine(args: argparse.Namespace, ctx: Context) -> int:
    _manager(ctx).undefine(args.domain)
    print(f"Domain '{args.domain}' has been undefined\n")
    return 0


def cmd_start(args: argparse.Namespace, ctx: Context) -> int:
    _manager(ctx).start_domain(args.domain)
    print(f"Domain '{args.domain}' started\n")
    return 0


def cmd_shutdown(args: argparse.Namespace, ctx: Context) -> int:
    _manager(ctx).shutdown(args.domain)
    print(f"Domain '{args.domain}' is being shutdown\n")
    return 0


def cmd_destroy(args: argparse.Namespace, ctx: Context) -> int:
    _manager(ctx).destroy(args.domain)
    print(f"Domain '{args.domain}' destroyed\n")
    return 0


def cmd_suspend(args: argparse.Namespace, ctx: Context) -> int:
    _manager(ctx).suspend(args.domain)
    print(f"Domain '{args.domain}' suspended\n")
    return 0


def cmd_resume(args: argparse.Namespace, ctx: Context) -> int:
    _manager(ctx).resume(args.domain)
    print(f"Domain '{args.domain}' resumed\n")
    return 0


def cmd_list(args: argparse.Namespace, ctx: Context) -> int:
    rows = [
        ("-" if r.id < 0 else str(r.id), r.name, r.state.value)
        for r in _manager(ctx, query=True).list_domains(all_domains=args.all)
    ]
    sys.stdout.write(format_table(("Id", "Name", "State"), rows) + "\n")
    return 0


def cmd_dumpxml(args: argparse.Namespace, ctx: Context) -> int:
    sys.stdout.write(_manager(ctx, query=True).dumpxml(args.domain, inactive=args.inactive))
    return 0


def cmd_domiflist(args: argparse.Namespace, ctx: Context) -> int:
    rows = [
        (r.interface, r.type, r.source, r.model, r.mac)
        for r in _manager(ctx, query=True).interfaces(args.domain)
    ]
    headers = ("Interface", "Type", "Source", "Model", "MAC")
    sys.stdout.write(format_table(headers, rows) + "\n")
    return 0


def cmd_domstate(args: argparse.Namespace, ctx: Context) -> int:
    summary = _manager(ctx, query=True).state(args.domain)
    text = summary.state.value + (f" ({summary.reason})" if args.reason else "")
    print(text + "\n")
    return 0


def cmd_autostart(args: argparse.Namespace, ctx: Context) -> int:
    _manager(ctx).set_autostart(args.domain, not args.disable)
    verb = "unmarked" if args.disable else "marked"
    print(f"Domain '{args.domain}' {verb} as autostarted\n")
    return 0
