"""The nft tables of a NAT network: masquerade and forward rules.

Each started NAT network owns one table ``ip nwnet_<tag>`` (kept apart from
the filter tables ``nwfilter``), holding libvirt's rules for it:

* ``postrouting`` (nat, priority srcnat): traffic of the network to
  multicast and broadcast is left alone, everything else leaving the
  network is masqueraded;
* ``forward`` (filter, priority 0, policy accept): traffic between ports of
  the bridge passes, replies come back in, the network's own addresses go
  out, anything else through the bridge is rejected.

Like the filter tables, the table says which root owns it (a rule in its
chain ``owner``), and a table another root owns is never touched.
Rendering is pure (`table_batch`); `NatTables` applies it in one
libnftables transaction inside the root's namespace.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable
from typing import Any

from nwfilter.backends.base import Owner
from nwfilter.errors import BackendError, ConflictError
from nwfilter.netns import in_netns
from nwfilter.network.model import NetworkDef

Json = dict[str, Any]
FAMILY = "ip"
PREFIX = "nwnet_"
OWNER_CHAIN = "owner"
_PLAIN = re.compile(r"[A-Za-z0-9_]{1,48}\Z")


def table_name(network: str) -> str:
    """The table of network `network`: its name when plain, else its hex."""
    tag = network if _PLAIN.match(network) else "x" + network.encode().hex()[:96]
    return PREFIX + tag


def _payload(field: str) -> Json:
    return {"payload": {"protocol": "ip", "field": field}}


def _prefix(net: ipaddress.IPv4Network) -> Json:
    return {"prefix": {"addr": str(net.network_address), "len": net.prefixlen}}


def _match(left: Json, right: Any, op: str = "==") -> Json:
    return {"match": {"op": op, "left": left, "right": right}}


def _meta(key: str) -> Json:
    return {"meta": {"key": key}}


def table_batch(net: NetworkDef, owner: Owner) -> list[Json]:
    """The commands that (re)create `net`'s table: its rules are replaced whole."""
    assert net.bridge is not None and net.address is not None
    table = table_name(net.name)
    sub = net.address.network
    br = net.bridge

    def rule(chain: str, *expr: Json, comment: str | None = None) -> Json:
        body: Json = {"family": FAMILY, "table": table, "chain": chain, "expr": list(expr)}
        if comment is not None:
            body["comment"] = comment
        return {"add": {"rule": body}}

    base = {"family": FAMILY, "table": table}
    tbl = {"family": FAMILY, "name": table}
    cmds: list[Json] = [
        {"add": {"table": tbl}},
        {"delete": {"table": tbl}},
        {"add": {"table": tbl}},
        {"add": {"chain": {**base, "name": OWNER_CHAIN}}},
        rule(OWNER_CHAIN, {"counter": None}, comment=owner.label()),
        {"add": {"chain": {**base, "name": "postrouting", "type": "nat", "hook": "postrouting",
                           "prio": 100, "policy": "accept"}}},
        {"add": {"chain": {**base, "name": "forward", "type": "filter", "hook": "forward",
                           "prio": 0, "policy": "accept"}}},
    ]
    src = _match(_payload("saddr"), _prefix(sub))
    for dst in (_prefix(ipaddress.IPv4Network("224.0.0.0/24")), "255.255.255.255"):
        cmds.append(rule("postrouting", src, _match(_payload("daddr"), dst), {"return": None}))
    cmds.append(rule("postrouting", src, _match(_payload("daddr"), _prefix(sub), "!="),
                     {"masquerade": None}))
    cmds += [
        rule("forward", _match(_meta("iifname"), br), _match(_meta("oifname"), br),
             {"accept": None}),
        rule("forward", _match(_meta("oifname"), br), _match(_payload("daddr"), _prefix(sub)),
             _match({"ct": {"key": "state"}}, {"set": ["established", "related"]}, "in"),
             {"accept": None}),
        rule("forward", _match(_meta("iifname"), br), _match(_payload("saddr"), _prefix(sub)),
             {"accept": None}),
        rule("forward", _match(_meta("iifname"), br),
             {"reject": {"type": "icmp", "expr": "port-unreachable"}}),
        rule("forward", _match(_meta("oifname"), br),
             {"reject": {"type": "icmp", "expr": "port-unreachable"}}),
    ]
    return cmds


class NatTables:
    """Applies and removes NAT tables in one namespace."""

    def __init__(self, netns: str | None, nft_factory: Callable[[], Any] | None = None) -> None:
        self.netns = netns
        self._factory = nft_factory

    def _ctx(self) -> Any:
        if self._factory is not None:
            return self._factory()
        from nwfilter.backends.nft.backend import default_nft_factory

        return default_nft_factory()

    def _run(self, commands: list[Json], what: str) -> Any:
        with in_netns(self.netns):
            ctx = self._ctx()
            rc, out, err = ctx.json_cmd({"nftables": commands})
        if rc != 0:
            first = str(err).strip().splitlines()[:1]
            raise BackendError(f"{what}: nft refused: {first[0] if first else rc}")
        return out

    def owner(self, network: str) -> Owner | bool | None:
        """The owner of `network`'s table; None if it has none; False if no table."""
        cmd = {"list": {"chain": {"family": FAMILY, "table": table_name(network),
                                  "name": OWNER_CHAIN}}}
        with in_netns(self.netns):
            ctx = self._ctx()
            rc, out, _err = ctx.json_cmd({"nftables": [cmd]})
        if rc != 0:
            return False if not self.exists(network) else None
        for item in (out or {}).get("nftables", []):
            found = item.get("rule", {}).get("comment") if isinstance(item, dict) else None
            if isinstance(found, str):
                return Owner.from_label(found)
        return None

    def exists(self, network: str) -> bool:
        cmd = {"list": {"table": {"family": FAMILY, "name": table_name(network)}}}
        with in_netns(self.netns):
            rc, _out, _err = self._ctx().json_cmd({"nftables": [cmd]})
        return bool(rc == 0)

    def _check_owner(self, network: str, owner: Owner) -> None:
        held = self.owner(network)
        if held is False:
            return
        if not isinstance(held, Owner) or not held.same_root(owner):
            who = held.describe() if isinstance(held, Owner) else "no nwfilter root"
            raise ConflictError(
                f"network '{network}': table {FAMILY} {table_name(network)} exists and "
                f"belongs to {who}; nothing was changed"
            )

    def apply(self, net: NetworkDef, owner: Owner) -> None:
        self._check_owner(net.name, owner)
        self._run(table_batch(net, owner), f"network '{net.name}'")

    def remove(self, network: str, owner: Owner) -> None:
        """Delete `network`'s table if this root owns it; idempotent."""
        held = self.owner(network)
        if held is False:
            return
        if not isinstance(held, Owner) or not held.same_root(owner):
            raise ConflictError(f"network '{network}': its table belongs to another root")
        self._run([{"delete": {"table": {"family": FAMILY, "name": table_name(network)}}}],
                  f"network '{network}'")
