"""Tap devices and bridge ports through netlink in process (pyroute2).

`Links(netns)` opens one rtnetlink socket inside namespace `netns` (None:
the caller's own) for a batch of changes: create a persistent tap, enslave
it to a bridge, set it up, delete it.  The socket (and the tap's
`/dev/net/tun` file) are opened from the calling thread while it sits in
the namespace (`nwfilter.netns.in_netns`), so the devices are made there.
Errors name the device and the namespace.
"""

from __future__ import annotations

import threading
from types import TracebackType
from typing import Any

from nwfilter.errors import BackendError, ConflictError, StateError
from nwfilter.netns import check_ifname, in_netns


class Links:
    """Link changes in one network namespace; use as a context manager."""

    def __init__(self, netns: str | None) -> None:
        self.netns = netns
        self._ipr: Any = None
        self._thread = threading.get_ident()

    def __enter__(self) -> Links:
        from pyroute2 import IPRoute

        with in_netns(self.netns):
            self._ipr = IPRoute()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if self._ipr is not None:
            self._ipr.close()
            self._ipr = None

    def _where(self) -> str:
        return f"namespace '{self.netns}'" if self.netns else "the host namespace"

    def index(self, ifname: str) -> int | None:
        found = self._ipr.link_lookup(ifname=ifname)
        return int(found[0]) if found else None

    def kind(self, ifname: str) -> str | None:
        """The link's kind ('tun', 'bridge', 'veth', ...), None if it does not exist."""
        index = self.index(ifname)
        if index is None:
            return None
        links = self._ipr.get_links(index)
        info = links[0].get_attr("IFLA_LINKINFO") if links else None
        kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
        return str(kind) if kind is not None else ""

    def add_tap(self, ifname: str, mac: str | None = None) -> None:
        """A persistent tap device (down); `ConflictError` if the name is taken."""
        check_ifname(ifname)
        if self.index(ifname) is not None:
            raise ConflictError(f"device '{ifname}' already exists in {self._where()}")
        try:
            # The tun ioctl acts in the namespace of the calling thread.
            with in_netns(self.netns):
                self._ipr.link("add", ifname=ifname, kind="tuntap", mode="tap",
                               ifr={"no_pi": True, "vnet_hdr": True})
            if mac is not None:
                self._ipr.link("set", index=self._must(ifname), address=mac)
        except Exception as exc:
            raise BackendError(
                f"cannot create tap device '{ifname}' in {self._where()}: {exc}"
            ) from exc

    def set_master(self, ifname: str, bridge: str) -> None:
        master = self.index(bridge)
        if master is None or self.kind(bridge) != "bridge":
            raise StateError(f"bridge '{bridge}' does not exist in {self._where()}")
        try:
            self._ipr.link("set", index=self._must(ifname), master=master)
        except Exception as exc:
            raise BackendError(
                f"cannot attach '{ifname}' to bridge '{bridge}' in {self._where()}: {exc}"
            ) from exc

    def set_up(self, ifname: str, up: bool = True) -> None:
        try:
            self._ipr.link("set", index=self._must(ifname), state="up" if up else "down")
        except StateError:
            raise
        except Exception as exc:
            raise BackendError(
                f"cannot set '{ifname}' {'up' if up else 'down'} in {self._where()}: {exc}"
            ) from exc

    def delete_tap(self, ifname: str) -> None:
        """Delete `ifname` if it is a tap; anything else of that name is left."""
        if self.kind(ifname) != "tun":
            return
        index = self.index(ifname)
        try:
            self._ipr.link("del", index=index)
        except Exception as exc:
            if self.index(ifname) is None:
                return
            raise BackendError(
                f"cannot delete tap device '{ifname}' in {self._where()}: {exc}"
            ) from exc

    def _must(self, ifname: str) -> int:
        index = self.index(ifname)
        if index is None:
            raise StateError(f"device '{ifname}' does not exist in {self._where()}")
        return index
