"""`nwfilter event`: wait for events of the root, as `virsh event` does.

Events are seen only through nwfilterd (`events.subscribe`): what other
processes do cannot be seen by an engine embedded in this one.  Without
`--loop` the command prints the first event and exits; with it, it prints
every event until interrupted, the `--timeout` runs out or the daemon goes.
"""

from __future__ import annotations

import argparse
import json
import time
from typing import TYPE_CHECKING

from nwfilter.errors import UnavailableError, ValidationError

if TYPE_CHECKING:
    from nwfilter.commands.context import Context
    from nwfilter.events import Event


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number of seconds, not {text!r}")
    return value


COMMANDS = ("event",)


def register(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from nwfilter.events import SUBSCRIBABLE

    p = subparsers.add_parser(
        "event", help="wait for events of the root (needs nwfilterd)",
        description="Print the next event (every event with --loop) that nwfilterd "
        "publishes: filters, bindings, domain lifecycle, rebuilds, repairs.",
    )
    p.add_argument("--loop", action="store_true",
                   help="print events until interrupted, not just the first")
    p.add_argument("--json", action="store_true", help="print each event as one JSON object")
    p.add_argument("--kind", action="extend", nargs="+", choices=SUBSCRIBABLE, metavar="KIND",
                   help=f"only these kinds ({', '.join(SUBSCRIBABLE)})")
    p.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                   help="stop waiting after this many seconds")
    p.add_argument("--timestamp", action="store_true", help="print when each event happened")
    p.set_defaults(handler=cmd_event)


def _line(event: Event, args: argparse.Namespace) -> str:
    if args.json:
        return json.dumps(event.to_json(), sort_keys=True)
    if args.timestamp:
        from datetime import datetime

        when = datetime.fromtimestamp(event.time).astimezone()
        return f"{when.strftime('%Y-%m-%d %H:%M:%S.%f')[:-3]}{when.strftime('%z')}: " + (
            event.text()
        )
    return event.text()


def cmd_event(args: argparse.Namespace, ctx: Context) -> int:
    from nwfilter.events import EventKind

    client = ctx.daemon(purpose="events")
    count = 0
    ended = ""
    try:
        client.subscribe(args.kind)
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        while True:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            event = client.next_event(left) if left != 0.0 else None
            if event is None:
                ended = "event loop timed out"
                break
            print(_line(event, args), flush=True)
            if event.kind is EventKind.OVERFLOW:
                raise UnavailableError(
                    "nwfilterd dropped this subscription: it fell behind and events were lost"
                )
            count += 1
            if not args.loop:
                break
    except KeyboardInterrupt:
        ended = "event loop interrupted"
    except ValidationError as exc:
        raise UnavailableError(f"nwfilterd sent a malformed event: {exc.message}") from exc
    finally:
        client.close()
    if not args.json:
        if ended:
            ctx.info(ended)
        ctx.info(f"events received: {count}")
    return 0
