"""The nf_tables generation request and its answers, as bytes (no root)."""

from __future__ import annotations

import struct

import pytest

from nwfilter.backends.nft import generation
from nwfilter.errors import BackendError

NEWGEN = generation.NFNL_SUBSYS_NFTABLES << 8 | generation.NFT_MSG_NEWGEN


def message(kind: int, seq: int, body: bytes) -> bytes:
    data = struct.pack("=IHHII", 16 + len(body), kind, 0, seq, 0) + body
    return data + b"\0" * (-len(data) % 4)


def attr(kind: int, value: bytes) -> bytes:
    data = struct.pack("=HH", 4 + len(value), kind) + value
    return data + b"\0" * (-len(data) % 4)


def test_the_request_asks_for_the_generation() -> None:
    raw = generation.request(7)
    length, kind, flags, seq, _pid = struct.unpack_from("=IHHII", raw)
    assert (length, kind, flags, seq) == (len(raw), 10 << 8 | 16, 1, 7)


def test_the_answer_gives_the_id() -> None:
    body = struct.pack("=BBH", 0, 0, 0) + attr(3, b"nft\0") + attr(1, struct.pack(">I", 4242))
    other = message(NEWGEN, 6, struct.pack("=BBH", 0, 0, 0) + attr(1, struct.pack(">I", 1)))
    assert generation.parse_reply(other + message(NEWGEN, 7, body), 7) == 4242
    assert generation.parse_reply(other, 7) is None
    assert generation.parse_reply(b"\0\0", 7) is None


def test_an_error_answer_is_a_backend_error() -> None:
    with pytest.raises(BackendError, match="error 1"):
        generation.parse_reply(message(generation.NLMSG_ERROR, 7, struct.pack("=i", -1)), 7)
