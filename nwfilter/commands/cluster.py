"""`nwfilter cluster status`: the hosts sharing this root's filter pool.

Answered by the nwfilterd serving the root (`cluster.status`), which
reads the hosts' published state from etcd; when etcd cannot be reached
it says so and shows its own state only.
"""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from nwfilter.commands.table import format_table

if TYPE_CHECKING:
    from nwfilter.commands.context import Context

COMMANDS = ("cluster",)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = subparsers.add_parser(
        "cluster", help="the cluster sharing this root's filter pool (needs nwfilterd)",
        description="Hosts that share the filter pool through etcd (nwfilterd --cluster).",
    )
    sub = p.add_subparsers(dest="cluster_command", metavar="COMMAND", required=True)
    status = sub.add_parser("status", help="hosts, their applied revision, lag and liveness")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(handler=cmd_status)


def _cell(value: Any) -> str:
    return "-" if value is None else str(value)


def format_status(data: dict[str, Any]) -> str:
    """The table `cluster status` prints, with a heading and the errors."""
    lines = [
        f"Cluster {data.get('endpoints')} (prefix {data.get('prefix')}), seen from host "
        f"{data.get('host')}: pool revision {_cell(data.get('head'))}",
    ]
    if data.get("error"):
        lines.append(f"warning: {data['error']}")
    rows: list[list[str]] = []
    bad_lines: list[str] = []
    for host in data.get("hosts", []):
        alive = host.get("alive")
        rows.append([
            str(host.get("host")),
            "unknown" if alive is None else ("alive" if alive else "gone"),
            _cell(host.get("applied")), _cell(host.get("lag")), str(len(host.get("bad", []))),
        ])
        bad_lines.extend(
            f"host {host.get('host')} refused revision {b.get('revision')} of "
            f"{b.get('key')}: {b.get('reason')}"
            for b in host.get("bad", [])
        )
    table = format_table(["Host", "State", "Applied", "Lag", "Refused"], rows)
    return "\n".join(lines) + "\n" + table + "".join(f"{line}\n" for line in bad_lines)


def cmd_status(args: argparse.Namespace, ctx: Context) -> int:
    with ctx.daemon(purpose="cluster commands") as client:
        data = client.call("cluster.status")
    if args.json:
        print(json.dumps(data, indent=2, sort_keys=True))
    else:
        print(format_status(data), end="")
    return 0
