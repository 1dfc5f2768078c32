"""The nft monitor's event parser, fed hand-built nfnetlink messages."""

from __future__ import annotations

import struct

from nwfilter.backends.nft import monitor
from nwfilter.backends.nft.monitor import Transaction, parse_events

OWN_TID = 100
OTHER_TID = 200


def _attr(kind: int, data: bytes) -> bytes:
    raw = struct.pack("=HH", 4 + len(data), kind) + data
    return raw + b"\0" * (-len(raw) % 4)


def _msg(kind: int, family: int, *attrs: bytes) -> bytes:
    body = struct.pack("=BBH", family, 0, 0) + b"".join(attrs)
    return struct.pack("=IHHII", 16 + len(body), (monitor.NFNL_SUBSYS_NFTABLES << 8) | kind,
                       0, 0, 0) + body


def _element(kind: int, family: int, table: str, set_name: str) -> bytes:
    return _msg(kind, family, _attr(1, table.encode() + b"\0"),
                _attr(2, set_name.encode() + b"\0"))


def _gen(tid: int) -> bytes:
    return _msg(monitor.NFT_MSG_NEWGEN, 0, _attr(monitor.NFTA_GEN_PROC_PID,
                                                 struct.pack(">I", tid)),
                _attr(monitor.NFTA_GEN_PROC_NAME, b"nft\0"))


def _parse(*messages: bytes) -> list[tuple[Transaction, int, str]]:
    return parse_events(b"".join(messages), "nwfilter", Transaction(), lambda t: t == OWN_TID)


def test_operator_filling_an_ipset_set_is_not_foreign() -> None:
    inet, bridge = monitor.NFPROTO_INET, monitor.NFPROTO_BRIDGE
    new, gone = monitor.NFT_MSG_NEWSETELEM, monitor.NFT_MSG_DELSETELEM
    assert _parse(_element(new, inet, "nwfilter", "ipset4_blocked"), _gen(OTHER_TID)) == []
    assert _parse(_element(gone, inet, "nwfilter", "ipset6_x"), _gen(OTHER_TID)) == []
    # Elements of our other sets and maps are ours alone.
    for family, name in ((inet, "cl4_vnet0_0123456789"), (inet, "l3_from"),
                         (bridge, "from_vm"), (bridge, "ipset4_blocked")):
        (txn, tid, comm), = _parse(_element(new, family, "nwfilter", name), _gen(OTHER_TID))
        assert (txn.touched, tid, comm) == (["new element"], OTHER_TID, "nft")
    # A transaction that also changes anything else is still foreign.
    (txn, _tid, _comm), = _parse(_element(new, inet, "nwfilter", "ipset4_blocked"),
                                 _msg(5, inet, _attr(1, b"nwfilter\0")), _gen(OTHER_TID))
    assert txn.touched == ["delete chain"]
    # Other tables and our own transactions never count.
    assert _parse(_element(new, inet, "filter", "cl4_x"), _gen(OTHER_TID)) == []
    assert _parse(_element(new, inet, "nwfilter", "cl4_x"), _gen(OWN_TID)) == []


def test_a_foreign_transaction_names_the_chains_it_touched() -> None:
    inet, bridge = monitor.NFPROTO_INET, monitor.NFPROTO_BRIDGE
    table = _attr(1, b"nwfilter\0")
    (txn, _tid, _comm), = _parse(
        _msg(monitor.NFT_MSG_DELRULE, bridge, table,
             _attr(monitor.NFTA_RULE_CHAIN, b"vnet0/from/mac\0")),
        _msg(monitor.NFT_MSG_DELCHAIN, inet, table,
             _attr(monitor.NFTA_CHAIN_NAME, b"vnet1/to\0")),
        _element(monitor.NFT_MSG_DELSETELEM, bridge, "nwfilter", "to_vm"),
        _gen(OTHER_TID))
    assert txn.chains == {("bridge", "vnet0/from/mac"), ("inet", "vnet1/to")}
