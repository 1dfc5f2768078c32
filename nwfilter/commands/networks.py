"""The network subcommands, named and worded like virsh's.

`net-define`, `net-undefine`, `net-start`, `net-destroy`, `net-list`,
`net-dumpxml`, `net-autostart` and `net-info`: one API call each, answered
by nwfilterd or the embedded engine.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from nwfilter.commands.inputs import input_source, read_document
from nwfilter.commands.table import format_table
from nwfilter.printable import printable

if TYPE_CHECKING:
    from nwfilter.commands.context import Context

_NET_HELP = "network name"
_VERBS = (
    ("net-undefine", "undefine", "undefine a network", "has been undefined"),
    ("net-start", "start", "start a defined network", "started"),
    ("net-destroy", "destroy", "stop a network (its bridge, rules and dnsmasq go)",
     "destroyed"),
)


COMMANDS = ("net-define", *(command for command, _verb, _help, _done in _VERBS), "net-list",
            "net-dumpxml", "net-autostart", "net-info")


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("net-define", help="define or update a network from an XML file")
    p.add_argument("file", metavar="FILE", help="file holding the network's XML ('-': stdin)")
    p.set_defaults(handler=cmd_define)

    for command, verb, helptext, done in _VERBS:
        p = subparsers.add_parser(command, help=helptext)
        p.add_argument("network", metavar="NETWORK", help=_NET_HELP)
        p.set_defaults(handler=cmd_verb, verb=verb, done=done)

    p = subparsers.add_parser("net-list", help="list networks (active ones unless --all)")
    p.add_argument("--all", action="store_true", help="active and inactive networks")
    p.add_argument("--inactive", action="store_true", help="inactive networks only")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=cmd_list)

    p = subparsers.add_parser("net-dumpxml", help="print a network's XML")
    p.add_argument("network", metavar="NETWORK", help=_NET_HELP)
    p.add_argument("--inactive", action="store_true",
                   help="the persistent definition, not the running one")
    p.set_defaults(handler=cmd_dumpxml)

    p = subparsers.add_parser("net-autostart", help="start a network when nwfilterd starts")
    p.add_argument("network", metavar="NETWORK", help=_NET_HELP)
    p.add_argument("--disable", action="store_true", help="do not autostart it any more")
    p.set_defaults(handler=cmd_autostart)

    p = subparsers.add_parser("net-info", help="print a network's basic information")
    p.add_argument("network", metavar="NETWORK", help=_NET_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_info)


def cmd_define(args: argparse.Namespace, ctx: Context) -> int:
    result = ctx.call(
        "network.define", {"xml": read_document(args.file), "source": input_source(args.file)}
    )
    ctx.info(f"Network {result['name']} defined from {args.file}\n")
    return 0


def cmd_verb(args: argparse.Namespace, ctx: Context) -> int:
    result = ctx.call(f"network.{args.verb}", {"network": args.network})
    ctx.info(f"Network {result['name']} {args.done}\n")
    return 0


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def cmd_list(args: argparse.Namespace, ctx: Context) -> int:
    rows = [
        r for r in ctx.call("network.list")
        if (args.all or (args.inactive and not r["active"]) or
            (not args.inactive and r["active"]))
    ]
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [
        (r["name"], "active" if r["active"] else "inactive", _yes(r["autostart"]),
         _yes(r["persistent"]))
        for r in rows
    ]
    sys.stdout.write(format_table(("Name", "State", "Autostart", "Persistent"), table) + "\n")
    return 0


def cmd_dumpxml(args: argparse.Namespace, ctx: Context) -> int:
    sys.stdout.write(ctx.call("network.dumpxml",
                              {"network": args.network, "inactive": args.inactive}))
    return 0


def cmd_autostart(args: argparse.Namespace, ctx: Context) -> int:
    name = ctx.call("network.autostart",
                    {"network": args.network, "enable": not args.disable})["name"]
    ctx.info(f"Network {name} {'unmarked' if args.disable else 'marked'} as autostarted\n")
    return 0


def cmd_info(args: argparse.Namespace, ctx: Context) -> int:
    row = ctx.call("network.info", {"network": args.network})
    if args.json:
        print(json.dumps(row, indent=2))
        return 0
    for label, value in (
        ("Name", row["name"]), ("UUID", row["uuid"]), ("Active", _yes(row["active"])),
        ("Persistent", _yes(row["persistent"])), ("Autostart", _yes(row["autostart"])),
        ("Bridge", row["bridge"] or "-"), ("Forward", row["forward"] or "isolated"),
    ):
        print(f"{label + ':':<16}{printable(str(value))}")
    print()
    return 0
