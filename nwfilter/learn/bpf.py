"""The classic BPF program of a learning socket, run by the kernel.

Only frames learning can use reach the listener: DHCPv4 (UDP port 67 or
68, first fragment), DHCPv6 replies and neighbour advertisements; while a
port in 'any' mode has no address yet, also ARP and every IPv4 packet.
Everything else is dropped in the kernel, so a busy guest costs the
listener nothing.
"""

from __future__ import annotations

import ctypes
import socket
import struct
from dataclasses import dataclass

SO_ATTACH_FILTER = 26
_LD_H_ABS, _LD_B_ABS, _LDX_B_MSH, _LD_H_IND = 0x28, 0x30, 0xB1, 0x48
_JEQ, _JSET, _RET = 0x15, 0x45, 0x06
ACCEPT, DROP = 0xFFFF, 0


@dataclass(frozen=True)
class _Ins:
    code: int
    k: int
    jt: str | None = None
    jf: str | None = None
    label: str | None = None


def program(*, any_ipv4: bool, arp: bool, ipv6: bool) -> list[tuple[int, int, int, int]]:
    """(code, jt, jf, k) instructions of the filter."""
    ins: list[_Ins] = [
        _Ins(_LD_H_ABS, 12),
        _Ins(_JEQ, 0x0800, None, "not4"),
    ]
    if any_ipv4:
        ins.append(_Ins(_RET, ACCEPT))
    ins += [
        _Ins(_LD_H_ABS, 20),
        _Ins(_JSET, 0x1FFF, "drop", None),
        _Ins(_LD_B_ABS, 23),
        _Ins(_JEQ, 17, None, "drop"),
        _Ins(_LDX_B_MSH, 14),
        _Ins(_LD_H_IND, 14),
        _Ins(_JEQ, 67, "accept", None),
        _Ins(_JEQ, 68, "accept", None),
        _Ins(_LD_H_IND, 16),
        _Ins(_JEQ, 67, "accept", None),
        _Ins(_JEQ, 68, "accept", "drop"),
        _Ins(_JEQ, 0x0806, "accept" if arp else "drop", None, label="not4"),
    ]
    if ipv6:
        ins += [
            _Ins(_JEQ, 0x86DD, None, "drop"),
            _Ins(_LD_B_ABS, 20),
            _Ins(_JEQ, 58, None, "udp6"),
            _Ins(_LD_B_ABS, 54),
            _Ins(_JEQ, 136, "accept", "drop"),
            _Ins(_JEQ, 17, None, "drop", label="udp6"),
            _Ins(_LD_H_ABS, 56),
            _Ins(_JEQ, 546, "accept", "drop"),
        ]
    ins += [_Ins(_RET, DROP, label="drop"), _Ins(_RET, ACCEPT, label="accept")]
    where = {i.label: n for n, i in enumerate(ins) if i.label is not None}
    out = []
    for n, i in enumerate(ins):
        def rel(label: str | None, n: int = n) -> int:
            if label is None:
                return 0
            offset = where[label] - n - 1
            assert 0 <= offset < 256
            return offset
        out.append((i.code, rel(i.jt), rel(i.jf), i.k))
    return out


def attach(sock: socket.socket, instructions: list[tuple[int, int, int, int]]) -> None:
    """Attach (or replace) the socket's filter."""
    raw = b"".join(struct.pack("HBBI", c, jt, jf, k) for c, jt, jf, k in instructions)
    buf = ctypes.create_string_buffer(raw)
    fprog = struct.pack("HL", len(instructions), ctypes.addressof(buf))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)
