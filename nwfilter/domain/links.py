"""Links through netlink in process (pyroute2): the one module for the
domain drivers' link work.

`Links(netns)` opens one rtnetlink socket inside namespace `netns` (None:
the caller's own) for a batch of changes and queries: persistent taps
(`qemu`), veth pairs whose peer is made directly in another namespace
(`ns`), bridges, bridge ports, addresses, link up/down, deletion, and a
link's state (`LinkState`: kind, up, carrier, alias, master).  The socket
(and a tap's `/dev/net/tun` file) are opened from the calling thread while
it sits in the namespace (`nwfilter.netns.in_netns`), so the devices are
made there; a socket is used by one thread.  Errors name the device and the
namespace.  Namespaces themselves are made and removed by
`nwfilter.netns.Iproute2` (`ip netns`, which also mounts their name).
"""

from __future__ import annotations

import errno
import os
import threading
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from nwfilter.errors import BackendError, ConflictError, StateError
from nwfilter.netns import NETNS_DIR, check_ifname, check_netns_name, in_netns

# Address flag: no duplicate address detection, which would hold an IPv6
# address 'tentative' (unusable) for a second or more.
_IFA_F_NODAD = 0x02


def host_mac(guest_mac: str) -> str:
    """The MAC of a guest's host port (tap or veth host end): the guest's
    with the first octet set to 0xfe, as libvirt does for taps.  A bridge
    takes the lowest port MAC as its own, and 0xfe keeps the port out of
    that race while never equalling the guest's address."""
    return "fe" + guest_mac.lower()[2:]


@dataclass(frozen=True)
class LinkState:
    """What `Links.state` reads of one link."""

    kind: str  # 'veth', 'bridge', 'tun', ...; '' when the kernel names none
    up: bool  # administratively
    oper_up: bool  # carrier: operationally up
    alias: str | None
    master: int | None  # index of the bridge it is a port of


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

    def _link(self, ifname: str) -> Any:
        """The kernel's message for link `ifname`, None if it does not exist.
        One request for that name (a lookup by name would dump every link)."""
        try:
            found = self._ipr.link("get", ifname=ifname)
        except Exception as exc:
            if getattr(exc, "code", None) == errno.ENODEV:
                return None
            raise BackendError(
                f"cannot read device '{ifname}' in {self._where()}: {exc}"
            ) from exc
        return found[0] if found else None

    def index(self, ifname: str) -> int | None:
        link = self._link(ifname)
        return None if link is None else int(link["index"])

    def kind(self, ifname: str) -> str | None:
        """The link's kind ('tun', 'bridge', 'veth', ...), None if it does not exist."""
        state = self.state(ifname)
        return None if state is None else state.kind

    def state(self, ifname: str) -> LinkState | None:
        """The link's state, None if it does not exist."""
        link = self._link(ifname)
        return None if link is None else _state_of(link)

    def ports_of(self, bridge: str) -> list[str]:
        """Names of the links whose master is `bridge` (none if it is gone)."""
        index = self.index(bridge)
        if index is None:
            return []
        return sorted(str(link.get_attr("IFLA_IFNAME")) for link in self._ipr.get_links()
                      if link.get_attr("IFLA_MASTER") == index)

    def add_veth(self, ifname: str, peer: str, peer_netns: str, *, mac: str | None = None,
                 peer_mac: str | None = None) -> None:
        """A veth pair, both ends down: `ifname` here, `peer` made directly
        in namespace `peer_netns` (so its name never meets this one's)."""
        check_ifname(ifname)
        check_ifname(peer)
        target = os.open(NETNS_DIR / check_netns_name(peer_netns), os.O_RDONLY | os.O_CLOEXEC)
        try:
            peer_spec: dict[str, Any] = {"ifname": peer, "net_ns_fd": target}
            if peer_mac is not None:
                peer_spec["address"] = peer_mac
            spec: dict[str, Any] = {"ifname": ifname, "kind": "veth", "peer": peer_spec}
            if mac is not None:
                spec["address"] = mac
            self._ipr.link("add", **spec)
        except Exception as exc:
            raise BackendError(
                f"cannot create veth pair '{ifname}' ({self._where()}) - '{peer}'"
                f" (namespace '{peer_netns}'): {exc}"
            ) from exc
        finally:
            os.close(target)

    def add_bridge(self, ifname: str, *, alias: str | None = None) -> None:
        """A bridge, up, with STP off and no forward delay: otherwise a new
        port spends its first seconds listening and learning, and the first
        frames vanish.  `alias` becomes its interface alias."""
        check_ifname(ifname)
        try:
            self._ipr.link("add", ifname=ifname, kind="bridge", br_stp_state=0,
                           br_forward_delay=0)
            if alias is not None:
                self._ipr.link("set", index=self._must(ifname), ifalias=alias)
        except StateError:
            raise
        except Exception as exc:
            raise BackendError(
                f"cannot create bridge '{ifname}' in {self._where()}: {exc}"
            ) from exc
        self.set_up(ifname)

    def add_address(self, ifname: str, cidr: str) -> None:
        """Add `cidr` (``10.0.0.1/24``, ``fd00::1/64``) to `ifname`; an IPv6
        address is usable at once (no duplicate address detection)."""
        address, _, prefix = cidr.partition("/")
        six = ":" in address
        try:
            self._ipr.addr("add", index=self._must(ifname), address=address,
                           prefixlen=int(prefix) if prefix else (64 if six else 32),
                           **({"flags": _IFA_F_NODAD} if six else {}))
        except StateError:
            raise
        except Exception as exc:
            raise BackendError(
                f"cannot add address {cidr} to '{ifname}' in {self._where()}: {exc}"
            ) from exc

    def delete(self, ifname: str, what: str = "device") -> None:
        """Delete link `ifname` of any kind; one already gone is fine."""
        index = self.index(ifname)
        if index is None:
            return
        try:
            self._ipr.link("del", index=index)
        except Exception as exc:
            if self.index(ifname) is None:
                return
            raise BackendError(
                f"cannot delete {what} '{ifname}' in {self._where()}: {exc}"
            ) from exc

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
        link = self._link(bridge)
        if link is None or _state_of(link).kind != "bridge":
            raise StateError(f"bridge '{bridge}' does not exist in {self._where()}")
        master = int(link["index"])
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
        if self.kind(ifname) == "tun":
            self.delete(ifname, "tap device")

    def _must(self, ifname: str) -> int:
        index = self.index(ifname)
        if index is None:
            raise StateError(f"device '{ifname}' does not exist in {self._where()}")
        return index


def _state_of(link: Any) -> LinkState:
    """A link's state from the kernel's message."""
    info = link.get_attr("IFLA_LINKINFO")
    kind = info.get_attr("IFLA_INFO_KIND") if info is not None else None
    alias = link.get_attr("IFLA_IFALIAS")
    master = link.get_attr("IFLA_MASTER")
    return LinkState(
        kind=str(kind) if kind is not None else "",
        up=bool(link["flags"] & 1),  # IFF_UP
        oper_up=link.get_attr("IFLA_OPERSTATE") == "UP",
        alias=str(alias) if alias else None,
        master=int(master) if master else None,
    )
