"""The domain subcommands, named and worded like virsh's.

`define`, `undefine`, `start`, `shutdown`, `destroy`, `suspend`, `resume`,
`list`, `dominfo`, `domid`, `domuuid`, `domname`, `dumpxml`, `domiflist`, `domifaddr`,
`domstate` and `autostart`.  Each is one API call (`ctx.call`), answered by
nwfilterd or the embedded engine.  A domain is named by its name, the id of
a running domain, or its UUID, as virsh allows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any

from nwfilter.commands.inputs import input_source, read_document
from nwfilter.commands.table import format_table
from nwfilter.printable import printable

if TYPE_CHECKING:
    from nwfilter.commands.context import Context

_DOMAIN_HELP = "domain name, id or UUID"

# The lifecycle operations (the API's `domain.<verb>`, in the order of
# `nwfilter.domain.operations.VERBS`): command, help, what virsh prints
# after the name, and the progress line of several domains.
_LIFECYCLE: tuple[tuple[str, str, str, str], ...] = (
    ("undefine", "undefine a domain", "has been undefined", "undefining"),
    ("start", "start a defined domain (its filters are applied first)", "started", "starting"),
    ("shutdown", "gracefully shut a domain down", "is being shutdown", "shutting down"),
    ("destroy", "stop a domain at once", "destroyed", "destroying"),
    ("suspend", "pause a domain", "suspended", "suspending"),
    ("resume", "continue a paused domain", "resumed", "resuming"),
    ("reboot", "reboot a running domain (its ports and filters stay)", "is being rebooted",
     "rebooting"),
)
_DONE = {name: done for name, _help, done, _doing in _LIFECYCLE}
_DOING = {name: doing for name, _help, _done, doing in _LIFECYCLE}


_FIELDS = (
    ("domid", "print a domain's id ('-' when inactive)", "id"),
    ("domuuid", "print a domain's UUID", "uuid"),
    ("domname", "print a domain's name", "name"),
)

COMMANDS = (
    "define", *(name for name, *_texts in _LIFECYCLE), "domiflist", "domifaddr", "list",
    "dominfo", *(name for name, _help, _key in _FIELDS), "dumpxml", "domstate", "autostart",
)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser("define", help="define or update a domain from an XML file")
    p.add_argument("file", metavar="FILE", help="file holding the domain's XML ('-': stdin)")
    p.set_defaults(handler=cmd_define)

    for name, helptext, *_texts in _LIFECYCLE:
        p = subparsers.add_parser(name, help=helptext)
        p.add_argument("domains", nargs="+", metavar="DOMAIN",
                       help=f"{_DOMAIN_HELP}; several are done in order, up to the "
                       "first that fails")
        p.set_defaults(handler=cmd_lifecycle)

    p = subparsers.add_parser("domiflist", help="list a domain's interfaces")
    p.add_argument("domain", metavar="DOMAIN", help=_DOMAIN_HELP)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=cmd_domiflist)

    p = subparsers.add_parser(
        "domifaddr", help="list a domain's interface addresses (given or learnt, with leases)")
    p.add_argument("domain", metavar="DOMAIN", help=_DOMAIN_HELP)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=cmd_domifaddr)

    p = subparsers.add_parser("list", help="list domains (active ones unless --all)")
    p.add_argument("--all", action="store_true", help="active and inactive domains")
    p.add_argument("--inactive", action="store_true", help="inactive domains only")
    p.add_argument("--state-running", action="store_true", help="running domains only")
    p.add_argument("--state-paused", action="store_true", help="paused domains only")
    p.add_argument("--state-shutoff", action="store_true", help="shut off domains only")
    p.add_argument("--autostart", action="store_true", help="domains marked autostart only")
    p.add_argument("--no-autostart", action="store_true", help="domains not marked autostart")
    p.add_argument("--name", action="store_true", help="print names only")
    p.add_argument("--uuid", action="store_true", help="print UUIDs only")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=cmd_list)

    p = subparsers.add_parser("dominfo", help="print a domain's basic information")
    p.add_argument("domain", metavar="DOMAIN", help=_DOMAIN_HELP)
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_dominfo)

    for name, helptext, key in _FIELDS:
        p = subparsers.add_parser(name, help=helptext)
        p.add_argument("domain", metavar="DOMAIN", help=_DOMAIN_HELP)
        p.set_defaults(handler=cmd_domfield, field=key)

    p = subparsers.add_parser("dumpxml", help="print a domain's XML")
    p.add_argument("domain", metavar="DOMAIN", help=_DOMAIN_HELP)
    p.add_argument("--inactive", action="store_true",
                   help="the persistent definition, not the running one")
    p.set_defaults(handler=cmd_dumpxml)

    p = subparsers.add_parser("domstate", help="print a domain's state")
    p.add_argument("domain", metavar="DOMAIN", help=_DOMAIN_HELP)
    p.add_argument("--reason", action="store_true", help="also print the reason")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(handler=cmd_domstate)

    p = subparsers.add_parser("autostart", help="start a domain when the daemon starts")
    p.add_argument("domain", metavar="DOMAIN", help=_DOMAIN_HELP)
    p.add_argument("--disable", action="store_true", help="do not autostart it any more")
    p.set_defaults(handler=cmd_autostart)


def cmd_define(args: argparse.Namespace, ctx: Context) -> int:
    result = ctx.call(
        "domain.define", {"xml": read_document(args.file), "source": input_source(args.file)}
    )
    ctx.info(f"Domain '{result['name']}' defined from {args.file}\n")
    return 0


def cmd_lifecycle(args: argparse.Namespace, ctx: Context) -> int:
    """undefine, start, shutdown, destroy, suspend, resume, reboot: one call
    per domain, in order; the first error ends the command."""
    total = len(args.domains)
    for done, domain in enumerate(args.domains):
        if total > 1:
            ctx.progress.update(f"{_DOING[args.command]} domains", done, total)
        result = ctx.call(f"domain.{args.command}", {"domain": domain})
        ctx.info(f"Domain '{result['name']}' {_DONE[args.command]}\n")
        ctx.warn(result.get("warnings", ()))
    return 0


def select_domains(rows: list[dict[str, Any]], args: argparse.Namespace) -> list[dict[str, Any]]:
    """virsh's list filters: active ones by default, --all, --inactive,
    state and autostart filters (each group ORs within, ANDs across)."""
    out = []
    states = {
        s for s, flag in (("running", args.state_running), ("paused", args.state_paused),
                          ("shut off", args.state_shutoff)) if flag
    }
    for row in rows:
        active = row["id"] is not None
        if args.inactive and active:
            continue
        if not (args.all or args.inactive or states) and not active:
            continue
        if states and row["state"] not in states:
            continue
        if args.autostart and not row["autostart"]:
            continue
        if args.no_autostart and row["autostart"]:
            continue
        out.append(row)
    return out


def cmd_list(args: argparse.Namespace, ctx: Context) -> int:
    rows = select_domains(ctx.call("domain.list"), args)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif args.name or args.uuid:
        for row in rows:
            print(" ".join(printable(row[k]) for k, flag in (("uuid", args.uuid),
                                                                ("name", args.name)) if flag))
        print()
    else:
        table = [("-" if r["id"] is None else str(r["id"]), r["name"], r["state"]) for r in rows]
        sys.stdout.write(format_table(("Id", "Name", "State"), table) + "\n")
    return 0


def cmd_dominfo(args: argparse.Namespace, ctx: Context) -> int:
    row = ctx.call("domain.info", {"domain": args.domain})
    if args.json:
        print(json.dumps(row, indent=2))
        return 0
    fields = (
        ("Id", "-" if row["id"] is None else str(row["id"])),
        ("Name", row["name"]),
        ("UUID", row["uuid"]),
        ("Type", row["type"]),
        ("State", row["state"]),
        ("Persistent", "yes" if row["persistent"] else "no"),
        ("Autostart", "enable" if row["autostart"] else "disable"),
    )
    for label, value in fields:
        print(f"{label + ':':<16}{printable(value)}")
    print()
    return 0


def cmd_domfield(args: argparse.Namespace, ctx: Context) -> int:
    row = ctx.call("domain.info", {"domain": args.domain})
    value = row[args.field]
    print(f"{'-' if value is None else printable(str(value))}\n")
    return 0


def cmd_dumpxml(args: argparse.Namespace, ctx: Context) -> int:
    sys.stdout.write(
        ctx.call("domain.dumpxml", {"domain": args.domain, "inactive": args.inactive})
    )
    return 0


def cmd_domiflist(args: argparse.Namespace, ctx: Context) -> int:
    rows = ctx.call("domain.iflist", {"domain": args.domain})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [(r["interface"], r["type"], r["source"], r["model"], r["mac"]) for r in rows]
    headers = ("Interface", "Type", "Source", "Model", "MAC")
    sys.stdout.write(format_table(headers, table) + "\n")
    return 0


def lease_text(expires: float | None) -> str:
    if expires is None:
        return "-"
    left = expires - time.time()
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(expires))
    return f"{stamp} ({int(left)} s left)" if left > 0 else f"{stamp} (ended)"


def cmd_domifaddr(args: argparse.Namespace, ctx: Context) -> int:
    rows = ctx.call("domain.ifaddr", {"domain": args.domain})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [
        (r["interface"], r["mac"], "ipv6" if r["variable"] == "IPV6" else "ipv4", r["address"],
         r["source"], lease_text(r["expires"]))
        for r in rows
    ]
    headers = ("Name", "MAC address", "Protocol", "Address", "Source", "Lease ends")
    sys.stdout.write(format_table(headers, table) + "\n")
    return 0


def cmd_domstate(args: argparse.Namespace, ctx: Context) -> int:
    row = ctx.call("domain.info", {"domain": args.domain})
    if args.json:
        print(json.dumps({"state": row["state"], "reason": row["reason"]}, indent=2))
        return 0
    print(row["state"] + (f" ({printable(row['reason'])})" if args.reason else "") + "\n")
    return 0


def cmd_autostart(args: argparse.Namespace, ctx: Context) -> int:
    name = ctx.call("domain.autostart", {"domain": args.domain, "enable": not args.disable})[
        "name"
    ]
    verb = "unmarked" if args.disable else "marked"
    ctx.info(f"Domain '{name}' {verb} as autostarted\n")
    return 0
