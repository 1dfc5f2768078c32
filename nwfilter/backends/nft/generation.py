"""The ruleset generation of a network namespace's nf_tables.

The kernel numbers its committed transactions: every commit, of any table
and by any program, gives the ruleset a new generation id (`NFT_MSG_GETGEN`,
what `nft` itself asks before it trusts its cache).  A listing read while
the id did not move is what the kernel holds for as long as the id stays;
`NftBackend.listing` keeps the last one on that ground, so an audit of an
unchanged ruleset reads no table again.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator

from nwfilter.errors import BackendError
from nwfilter.netns import in_netns

NETLINK_NETFILTER = 12
NFNL_SUBSYS_NFTABLES = 10
NFT_MSG_NEWGEN = 15
NFT_MSG_GETGEN = 16
NFTA_GEN_ID = 1
NLM_F_REQUEST = 1
NLMSG_ERROR = 2
_NLMSG = struct.Struct("=IHHII")
_NFGEN = struct.Struct("=BBH")  # family, version, resource id (big-endian; 0 here)
_NLA = struct.Struct("=HH")


def request(seq: int) -> bytes:
    """The `NFT_MSG_GETGEN` request."""
    body = _NFGEN.pack(socket.AF_UNSPEC, 0, 0)
    return _NLMSG.pack(_NLMSG.size + len(body), NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_GETGEN,
                       NLM_F_REQUEST, seq, 0) + body


def messages(data: bytes) -> Iterator[tuple[int, int, bytes]]:
    """The netlink messages of one datagram: (type, sequence number, body)."""
    pos = 0
    while pos + _NLMSG.size <= len(data):
        length, kind, _flags, seq, _pid = _NLMSG.unpack_from(data, pos)
        if length < _NLMSG.size:
            break
        yield kind, seq, data[pos + _NLMSG.size: pos + length]
        pos += (length + 3) & ~3


def parse_reply(data: bytes, seq: int) -> int | None:
    """The generation id in the answer to request `seq`; None if `data`
    does not hold it; BackendError for an error answer."""
    for kind, got, body in messages(data):
        if got != seq:
            continue
        if kind == NLMSG_ERROR:
            code = struct.unpack_from("=i", body)[0] if len(body) >= 4 else 0
            raise BackendError(f"the kernel refused to tell the nf_tables generation "
                               f"(error {-code})")
        if kind != NFNL_SUBSYS_NFTABLES << 8 | NFT_MSG_NEWGEN:
            continue
        attrs = body[_NFGEN.size:]
        at = 0
        while at + _NLA.size <= len(attrs):
            size, attr = _NLA.unpack_from(attrs, at)
            if size < _NLA.size:
                break
            if attr & 0x3FFF == NFTA_GEN_ID and size >= _NLA.size + 4:
                return int(struct.unpack_from(">I", attrs, at + _NLA.size)[0])
            at += (size + 3) & ~3
    return None


def current(netns: str | None) -> int:
    """The generation id of the ruleset of `netns` (None: this namespace)."""
    with in_netns(netns):
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
    try:
        sock.settimeout(5)
        sock.bind((0, 0))
        sock.send(request(1))
        while True:
            found = parse_reply(sock.recv(65536), 1)
            if found is not None:
                return found
    except OSError as exc:
        raise BackendError(f"cannot read the nf_tables generation: {exc}") from exc
    finally:
        sock.close()
