"""The audit subcommands: audit, stats, explain.

Heavy modules (the explainer, frame building) load inside the handlers, so
the command line starts as fast without them."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from nwfilter.commands.context import Context
from nwfilter.commands.table import format_table
from nwfilter.printable import printable

COMMANDS = ("audit", "stats", "explain")
SEVERITY_CHOICES = ("info", "low", "medium", "high", "critical")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "audit", help="report drift, exposure and hygiene findings of the bound ports")
    p.add_argument("ports", nargs="*", metavar="PORT", help="only these ports (default: all)")
    form = p.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="print the findings as JSON")
    form.add_argument("--sarif", action="store_true", help="print a SARIF 2.1.0 log")
    p.add_argument("--fail-on", choices=SEVERITY_CHOICES, metavar="SEVERITY",
                   help="exit with status 1 when a finding is this severe or worse "
                   f"({', '.join(SEVERITY_CHOICES)})")
    p.add_argument("--fix", action="store_true",
                   help="re-apply the compiled rules (one transaction) and audit again")
    p.set_defaults(handler=audit_handler)

    p = subparsers.add_parser("stats", help="per-rule counters of the bound ports")
    p.add_argument("ports", nargs="*", metavar="PORT", help="only these ports (default: all)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--watch", type=float, nargs="?", const=2.0, metavar="SECONDS",
                   help="refresh every SECONDS (default 2) until interrupted")
    p.set_defaults(handler=stats_handler)

    p = subparsers.add_parser(
        "explain", help="walk a packet through a port's compiled rules and print the verdict")
    p.add_argument("--port", required=True, help="the bound port (host-side device)")
    p.add_argument("--direction", required=True, choices=("out", "in"),
                   help="out: sent by the guest; in: delivered to the guest")
    p.add_argument("--src-mac", help="source MAC (default: the port's MAC going out)")
    p.add_argument("--dst-mac", default="ff:ff:ff:ff:ff:ff", help="destination MAC")
    p.add_argument("--src-ip", help="source IP (ARP: sender address)")
    p.add_argument("--dst-ip", help="destination IP (ARP: target address)")
    p.add_argument("--proto", default="udp",
                   help="tcp, udp, icmp, icmpv6, sctp, ..., an IP protocol number, arp, rarp, "
                   "or ether:0xNNNN")
    p.add_argument("--sport", type=int, default=0, help="source port")
    p.add_argument("--dport", type=int, default=0, help="destination port")
    p.add_argument("--icmp-type", type=int, default=8)
    p.add_argument("--icmp-code", type=int, default=0)
    p.add_argument("--tcp-flags", default="syn", help="comma-separated (default: syn)")
    p.add_argument("--arp-op", type=int, default=1, help="ARP opcode (1 request, 2 reply)")
    p.add_argument("--arp-sha", help="ARP sender MAC (default: the source MAC)")
    p.add_argument("--vlan", type=int, help="802.1Q VLAN id")
    p.add_argument("--ipv6", action="store_true", help="IPv6 even without addresses given")
    p.add_argument("--ct-state", choices=("new", "established", "related", "invalid",
                                          "untracked"),
                   help="conntrack state (default: as if no earlier packet was seen)")
    p.add_argument("--ct-dir", choices=("original", "reply"),
                   help="conntrack direction, which the ebiptables backend's rules test "
                   "(default: reply for --ct-state established, else original)")
    p.add_argument("--pcap", metavar="FILE", help="explain every frame of a pcap file instead")
    p.add_argument("--json", action="store_true", help="print the walk as JSON")
    p.set_defaults(handler=explain_handler)


def _table(findings: list[dict[str, Any]]) -> str:
    rows = [(f["severity"], f["kind"], f["port"] or "-", f["vm"] or "-",
             (f["filter"] + (" " + f["rule"] if f["rule"] else "")).strip() or "-",
             f["message"]) for f in findings]
    return format_table(("Severity", "Check", "Port", "VM", "Filter / rule", "Finding"), rows)


def audit_handler(args: argparse.Namespace, ctx: Context) -> int:
    from nwfilter.audit.findings import sarif, worst_at_least

    params = {"ports": list(args.ports)}
    result = ctx.call("audit.run", params)
    if args.fix and any(f["kind"].startswith("drift.") or f["kind"] == "precondition"
                        for f in result["findings"]):
        fixed = ctx.call("audit.fix")
        ctx.info(f"re-applied the compiled rules ({fixed['commands']} commands)")
        result = ctx.call("audit.run", params)
    findings = result["findings"]
    if args.json:
        print(json.dumps(result, indent=2))
    elif args.sarif:
        print(json.dumps(sarif(findings), indent=2))
    else:
        if findings:
            sys.stdout.write(_table(findings))
            for f in findings:
                if f["fix"]:
                    where = f" ({f['port']})" if f["port"] else ""
                    sys.stdout.write(f"fix{where}: {f['fix']}\n")
        counts = ", ".join(f"{n} {s}" for s, n in result["summary"].items() if n)
        ctx.info(f"{result['ports']} ports audited: "
                 + (counts if counts else "no findings"))
    if args.fail_on and worst_at_least(findings, args.fail_on):
        return 1
    return 0


def _count(value: int | None) -> str:
    return "-" if value is None else str(value)


def _stats_text(result: dict[str, Any]) -> str:
    rows = []
    totals = []
    for port, stats in sorted(result["ports"].items()):
        for r in stats["rules"]:
            chain = r["chain"]
            if chain.startswith(port + "/"):
                chain = chain[len(port) + 1:]
            if r["table"] == "inet":  # nft's layer-3 chains: `from`, `to`
                chain = f"inet {chain}"
            rows.append((port, r["direction"], chain, str(r["index"]), r["verdict"] or "-",
                         _count(r["packets"]), _count(r["bytes"]), r["origin"]))
        t = stats["totals"]
        for direction in ("out", "in"):
            acc, drop = t[direction]["accepted"], t[direction]["dropped"]
            totals.append((port, direction,
                           _count(acc and acc["packets"]), _count(acc and acc["bytes"]),
                           _count(drop and drop["packets"]), _count(drop and drop["bytes"])))
    text = format_table(("Port", "Dir", "Chain", "#", "Action", "Packets", "Bytes", "Origin"),
                        [tuple(printable(c) for c in row) for row in rows])
    text += "\n" + format_table(("Port", "Dir", "Accepted pkts", "Accepted bytes",
                                 "Dropped pkts", "Dropped bytes"), totals)
    if not result["counters"]:
        text += f"(the {result['backend']} backend keeps no counters: shown as '-')\n"
    return text


def stats_handler(args: argparse.Namespace, ctx: Context) -> int:
    params = {"ports": list(args.ports)}
    if args.watch is not None and not 0 < args.watch < 86400:
        from nwfilter.errors import ValidationError

        raise ValidationError(f"--watch: the interval must be a number of seconds above 0 "
                              f"and below 86400, not {args.watch:g}")
    redraw = bool(args.watch) and sys.stdout.isatty() and not args.json
    try:
        while True:
            result = ctx.call("stats.get", params)
            if args.json:
                print(json.dumps(result), flush=True)
            else:
                head = ""
                if args.watch:
                    head = (f"every {args.watch:g}s: nwfilter stats "
                            f"{' '.join(args.ports)}".rstrip()
                            + time.strftime("  %Y-%m-%d %H:%M:%S\n"))
                sys.stdout.write(("\x1b[H\x1b[2J" if redraw else "") + head
                                 + _stats_text(result) + ("" if redraw or not args.watch
                                                          else "\n"))
                sys.stdout.flush()
            if not args.watch:
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        if redraw:
            sys.stdout.write("\n")
        return 0


def explain_handler(args: argparse.Namespace, ctx: Context) -> int:
    from nwfilter.audit.packet import PacketSpec, build_frame, read_pcap

    if args.pcap:
        with open(args.pcap, "rb") as handle:
            frames = list(read_pcap(handle.read()))
    else:
        src_mac = args.src_mac
        if src_mac is None:
            # Going out, the guest's own MAC: what the port's rules expect.
            xml = ctx.call("binding.dumpxml", {"portdev": args.port})["xml"]
            marker = "<mac address='"
            start = xml.find(marker)
            src_mac = xml[start + len(marker):xml.find("'", start + len(marker))] \
                if start >= 0 and args.direction == "out" else "52:54:00:ff:ff:fe"
        spec = PacketSpec(src_mac=src_mac, dst_mac=args.dst_mac, proto=args.proto,
                          src_ip=args.src_ip, dst_ip=args.dst_ip, sport=args.sport,
                          dport=args.dport, icmp_type=args.icmp_type,
                          icmp_code=args.icmp_code, tcp_flags=args.tcp_flags,
                          arp_op=args.arp_op, arp_sha=args.arp_sha, vlan=args.vlan,
                          ipv6=True if args.ipv6 else None)
        frames = [build_frame(spec)]
    result = ctx.call("explain.packet", {"port": args.port, "direction": args.direction,
                                         "frames": [f.hex() for f in frames],
                                         "ct_state": args.ct_state, "ct_dir": args.ct_dir})
    if args.json:
        print(json.dumps(result if args.pcap else result[0], indent=2))
        return 0
    for n, walk in enumerate(result):
        if n:
            print()
        print(_walk_text(walk))
    return 0


def _walk_text(walk: dict[str, Any]) -> str:
    direction = "out (from the VM)" if walk["direction"] == "out" else "in (to the VM)"
    lines = [f"port {walk['port']} direction {direction}, rules of the {walk['backend']} "
             "backend",
             f"packet: {walk['packet']}" + (f" (ct state {walk['ct_state']}, {walk['ct_dir']})"
                                            if walk["ct_state"] else "")]
    for step in walk["steps"]:
        if not step["rule"]:
            lines.append(f"{step['layer']} chain {step['chain']}: entered ({step['why']})")
            continue
        rule = step["rule"].split("  # ")[0]
        mark = "match" if step["matched"] else "no   "
        line = f"  {mark} {step['chain']}#{step['index']}: {rule}"
        if step["origin"]:
            line += f"  [{step['origin']}]"
        lines.append(line)
        lines.append(f"        {step['why']}" + (f" -> {step['action']}" if step["action"]
                                                 else ""))
    lines.append(f"decided by: {walk['decided_by']}"
                 + (f" [{walk['origin']}]" if walk["origin"] else ""))
    lines.append(f"verdict: {walk['verdict']}")
    return "\n".join(printable(line) for line in lines)
