"""The binding subcommands: nwfilter-binding-create/-delete/-list/-dumpxml."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from nwfilter.commands.context import Context
from nwfilter.commands.domains import lease_text
from nwfilter.commands.inputs import input_source, read_document
from nwfilter.commands.table import format_table
from nwfilter.printable import printable

COMMANDS = ("nwfilter-binding-create", "nwfilter-binding-delete", "nwfilter-binding-list",
            "nwfilter-binding-dumpxml")


def register(subparsers: Any) -> None:
    """Add the binding subcommands to the top-level parser."""
    p = subparsers.add_parser(
        "nwfilter-binding-create",
        help="bind ports to filters from <filterbinding> XML files (one transaction)",
    )
    p.add_argument("files", nargs="+", metavar="FILE", help="binding XML file ('-': stdin)")
    p.add_argument(
        "--validate", action="store_true",
        help="only check the documents (and that they compile); change nothing",
    )
    p.set_defaults(handler=create_handler)

    p = subparsers.add_parser("nwfilter-binding-delete", help="remove a port's binding and rules")
    p.add_argument("portdev", metavar="PORTDEV")
    p.set_defaults(handler=delete_handler)

    p = subparsers.add_parser("nwfilter-binding-list", help="list the active bindings")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(handler=list_handler)

    p = subparsers.add_parser(
        "nwfilter-binding-dumpxml", help="print a binding's XML (and its compiled rules)"
    )
    p.add_argument("portdev", metavar="PORTDEV")
    p.add_argument("--rules", action="store_true", help="also print the rules in force")
    p.set_defaults(handler=dumpxml_handler)


def create_handler(args: argparse.Namespace, ctx: Context) -> int:
    params = {
        "xml": [read_document(name) for name in args.files],
        "sources": [input_source(name) for name in args.files],
    }
    if args.validate:
        for portdev in ctx.call("binding.validate", params)["valid"]:
            ctx.info(f"Network filter binding on {portdev} is valid")
        return 0
    result = ctx.call("binding.create", params)
    for portdev in result["created"]:
        ctx.info(f"Network filter binding on {portdev} created")
    ctx.warn(result["warnings"])
    return 0


def delete_handler(args: argparse.Namespace, ctx: Context) -> int:
    ctx.call("binding.delete", {"portdev": args.portdev})
    ctx.info(f"Network filter binding on {args.portdev} deleted")
    return 0


def list_handler(args: argparse.Namespace, ctx: Context) -> int:
    rows = ctx.call("binding.list")
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    table = [(row["portdev"], row["filter"], "yes" if row["enforced"] else "no") for row in rows]
    sys.stdout.write(format_table(("Port Dev", "Filter", "Enforced"), table) + "\n")
    ctx.warn(
        f"port {row['portdev']} is not enforced: {row['reason']}"
        for row in rows if not row["enforced"]
    )
    return 0


def dumpxml_handler(args: argparse.Namespace, ctx: Context) -> int:
    result = ctx.call("binding.dumpxml", {"portdev": args.portdev, "rules": args.rules})
    text = result["xml"]
    sys.stdout.write(text if text.endswith("\n") else text + "\n")
    # After the root element, where a comment keeps the document valid XML.
    for row in result.get("learnt", []):
        server = f" from {row['server']}" if row["server"] else ""
        lease = "" if row["expires"] is None else f", lease ends {lease_text(row['expires'])}"
        line = f"learnt {row['variable']} {row['address']} ({row['source']}{server}{lease})"
        sys.stdout.write(f"<!-- {printable(line).replace('--', '- -')} -->\n")
    if not result["enforced"]:
        ctx.warn([f"port {args.portdev} is not enforced: {result['reason']}"])
    if args.rules:
        sys.stdout.write(result["rules"])
    return 0
