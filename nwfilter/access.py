"""Who may use nwfilterd's admin socket: root and one admin group.

The kernel records a connecting process's credentials on the socket
(`SO_PEERCRED`: pid, uid, gid; `SO_PEERGROUPS`: supplementary groups, read
by `nwfilter.connserver.Peer.of`).  Those are what is checked: they cannot
change after the connect.  Only where the kernel does not report the
groups are they read from `/proc/PID/status` (used only if that process
still has the peer's uid, so a reused pid cannot lend its groups) and
else from the group database.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd
from dataclasses import dataclass
from pathlib import Path

from nwfilter.connserver import Peer
from nwfilter.errors import PermissionDeniedError, ValidationError

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Group:
    name: str
    gid: int

    @classmethod
    def named(cls, name: str) -> Group:
        """The group called `name`; `ValidationError` if there is none."""
        try:
            return cls(name, grp.getgrnam(name).gr_gid)
        except (KeyError, ValueError):
            raise ValidationError(f"admin group {name[:64]!r} does not exist") from None


def _proc_groups(peer: Peer) -> frozenset[int] | None:
    try:
        text = Path(f"/proc/{peer.pid}/status").read_text(errors="replace")
    except OSError:
        return None
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    try:
        uids = {int(uid) for uid in fields["Uid"].split()}
        groups = frozenset(int(gid) for gid in fields["Groups"].split())
    except (KeyError, ValueError):
        return None
    return groups if uids == {peer.uid} else None


def peer_groups(peer: Peer) -> frozenset[int]:
    """The peer's primary and supplementary groups."""
    if peer.groups is not None:
        return frozenset((peer.gid, *peer.groups))
    found = _proc_groups(peer)
    if found is not None:
        return found | {peer.gid}
    try:
        return frozenset(os.getgrouplist(pwd.getpwuid(peer.uid).pw_name, peer.gid))
    except (KeyError, OSError):
        return frozenset((peer.gid,))


@dataclass(frozen=True)
class AdminAccess:
    """The admission rule of one admin socket."""

    socket: Path
    group: Group | None = None

    def refusal(self, peer: Peer) -> PermissionDeniedError | None:
        """None if `peer` may use the socket, else the error to answer it."""
        if peer.uid >= 0 and peer.uid in (0, os.geteuid()):
            return None
        if self.group is not None and peer.uid >= 0 and self.group.gid in peer_groups(peer):
            return None
        return PermissionDeniedError(
            f"pid {peer.pid} uid {peer.uid} may not use the admin socket '{self.socket}': "
            f"only {self.allowed} may"
        )

    @property
    def allowed(self) -> str:
        if self.group is None:
            return "root"
        return f"root and members of group '{self.group.name}'"
