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
from collections.abc import Callable
from typing import TYPE_CHECKING

from nwfilter.commands.inputs import input_source, read_input
from nwfilter.commands.table import format_table
from nwfilter.conf import parse_domain

if TYPE_CHECKING:
    from nwfilter.commands.context import Context
    from nwfilter.domain.driver import DomainManager


# command, help, the manager's call, what virsh prints after the name
_LIFECYCLE: tuple[tuple[str, str, Callable[[DomainManager, str], object], str], ...] = (
    ("undefine", "undefine a domain", lambda m, n: m.undefine(n), "has been undefined"),
    ("start", "start a defined domain (its filters are applied first)",
     lambda m, n: m.start_domain(n), "started"),
    ("shutdown", "gracefully shut a domain down", lambda m, n: m.shutdown(n),
     "is being shutdown"),
    ("destroy", "stop a domain at once", lambda m, n: m.destroy(n), "destroyed"),
    ("suspend", "pause a domain", lambda m, n: m.suspend(n), "suspended"),
    ("resume", "continue a paused domain", lambda m, n: m.resume(n), "resumed"),
)
_LIFECYCLE_BY_NAME = {entry[0]: entry for entry in _LIFECYCLE}


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("define", help="define or update a domain from an XML file")
    p.add_argument("file", metavar="FILE", help="file holding the domain's XML ('-': stdin)")
    p.set_defaults(handler=cmd_define)

    for name, helptext, _verb, _done in _LIFECYCLE:
        p = subparsers.add_parser(name, help=helptext)
        p.add_argument("domain", metavar="NAME")
        p.set_defaults(handler=cmd_lifecycle)

    p = subparsers.add_parser("domiflist", help="list a domain's interfaces")
    p.add_argument("domain", metavar="NAME")
    p.set_defaults(handler=cmd_domiflist)

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

    engine = ctx.engine(read_only=query)
    manager = DomainManager.for_engine(engine, netns=engine.backend.netns)
    manager.start(autostart=False, take_over=not query)
    return manager


def cmd_define(args: argparse.Namespace, ctx: Context) -> int:
    # Parsed here, from the bytes, so encoding errors name the file.
    parsed = parse_domain(read_input(args.file), source=input_source(args.file))
    definition = _manager(ctx).define(parsed)
    print(f"Domain '{definition.name}' defined from {args.file}\n")
    return 0


def cmd_lifecycle(args: argparse.Namespace, ctx: Context) -> int:
    """undefine, start, shutdown, destroy, suspend, resume: one call each."""
    _name, _help, call, done = _LIFECYCLE_BY_NAME[args.command]
    manager = _manager(ctx)
    call(manager, args.domain)
    print(f"Domain '{args.domain}' {done}\n")
    if args.command in ("start", "resume"):
        engine = ctx.engine()
        ports = [b.portdev for b in engine.list_bindings() if b.owner_name == args.domain]
        if ports:
            ctx.warn_unenforced(engine, ports)
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
