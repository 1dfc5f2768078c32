"""`nwfilter host-move`: move a state root to another backend or namespace, on purpose.

A root records its host at first use (`nwfilter.hostrecord`) and refuses
commands naming another.  Moving it: with the root's lock held, check that
no other root owns the new host's tables, delete this root's tables in the
old host (only if they carry this root's marker), record the new host
(keeping the root id), then start the engine there, which applies every
binding.
"""

from __future__ import annotations

import argparse
import logging
from typing import TYPE_CHECKING, Any

from nwfilter.commands.context import Context
from nwfilter.errors import ConflictError, NwfilterError, ValidationError

if TYPE_CHECKING:
    from nwfilter.hostrecord import HostRecord

log = logging.getLogger(__name__)


COMMANDS = ("host-move",)


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "host-move",
        help="move the state root to another backend or network namespace",
        description="Remove this root's tables from the namespace it manages, record "
        "the new backend/namespace and apply every binding there.",
    )
    p.add_argument("--backend", dest="move_backend", default=None, metavar="NAME",
                   help="the new backend (default: keep)")
    where = p.add_mutually_exclusive_group()
    where.add_argument("--netns", dest="move_netns", default=None, metavar="NAME",
                       help="the new network namespace")
    where.add_argument("--host-netns", dest="move_host", action="store_true",
                       help="the host's own network namespace")
    p.set_defaults(handler=move_handler)


def move_handler(args: argparse.Namespace, ctx: Context) -> int:
    from nwfilter import hostrecord
    from nwfilter.backends import get_backend
    from nwfilter.netns import check_netns_name
    from nwfilter.rootlock import RootLock

    root = ctx.root_path
    old = hostrecord.load(root)
    if args.move_netns is not None:
        check_netns_name(args.move_netns)
    if args.move_backend is None and args.move_netns is None and not args.move_host:
        raise ValidationError("host-move needs --backend, --netns or --host-netns")
    backend = args.move_backend or (old.backend if old else hostrecord.DEFAULT_BACKEND)
    netns = None if args.move_host else args.move_netns
    if args.move_netns is None and not args.move_host and old is not None:
        netns = old.netns
    get_backend(backend, netns)  # an unknown name is refused before anything changes
    lock = RootLock(root, "nwfilter host-move")
    lock.acquire(30.0)
    try:
        if old is not None and (old.backend, old.netns) == (backend, netns):
            print(f"State root {root} already manages {old.where()}")
            return 0
        if old is not None:
            owner = old.owner(root)
            target = get_backend(backend, netns)
            target.set_owner(owner)
            held = target.owner()
            if held is not None and not held.same_root(owner):
                raise ConflictError(
                    f"{hostrecord.describe(backend, netns)} is owned by {held.describe()}; "
                    "nothing was changed"
                )
            _release(old, owner)
        record = hostrecord.move(root, backend, netns)
    finally:
        lock.release()
    print(f"State root {root} now manages {record.where()}")
    moved = Context(ctx.root, backend, netns)
    try:
        engine = moved.engine()
        moved.warn(moved.start_warnings)
        moved.warn(
            f"port {port} is not enforced: {reason}"
            for port, reason in sorted(engine.enforcement().items())
        )
    finally:
        moved.close()
    return 0


def _release(old: HostRecord, owner: Any) -> None:
    """Delete this root's tables in its old host, if they are there and ours."""
    from nwfilter.backends import get_backend

    previous = get_backend(old.backend, old.netns)
    previous.set_owner(owner)
    try:
        held = previous.owner()
        if held is not None and held.same_root(owner):
            previous.clear_all()
    except NwfilterError as exc:
        log.warning("the tables in %s were not removed: %s", old.where(), exc)
