"""Where the explainer's walk depends on the backend, and the first-packet
conntrack state it derives (no root needed).

Each case is what the kernel was seen to do (tests/integration/
test_explain_kernel.py sends such frames through both backends): ebt_stp
reads a BPDU one byte early, ebt_ip6 skips AH, ebt_ip gives the protocol
of any fragment, libvirt's implicit states test the conntrack direction on
ebiptables, and conntrack opens an SCTP flow only for some first packets.
"""

from __future__ import annotations

import struct
import uuid

import pytest

from nwfilter.audit.explain import Explainer, default_ct_state, semantics_of
from nwfilter.audit.packet import Frame, PacketSpec, build_frame, sctp_checksum
from nwfilter.compile import Compiler
from nwfilter.conf import parse_binding, parse_filter
from nwfilter.errors import ValidationError
from nwfilter.ir import CtState, Hook, Ruleset

MAC = "52:54:00:00:00:01"
PEER = "52:54:00:00:00:00"


def ruleset(rules: str) -> Ruleset:
    fdef = parse_filter(f"<filter name='t' chain='root'>{rules}</filter>")
    return Compiler({"t": fdef}).compile(parse_binding(
        f"<filterbinding><owner><name>vm</name><uuid>{uuid.UUID(int=1)}</uuid></owner>"
        f"<portdev name='vnet1'/><mac address='{MAC}'/><filterref filter='t'>"
        f"<parameter name='IP' value='10.0.0.1'/></filterref></filterbinding>"))


def verdicts(rs: Ruleset, hook: Hook, data: bytes, *, ct_state: CtState | None = None,
             ct_dir: str | None = None) -> tuple[str, str]:
    """The verdicts walked as nft and as ebiptables have the rules."""
    nft, ebt = (Explainer(rs, backend=b).explain(hook, data, ct_state=ct_state, ct_dir=ct_dir)
                for b in ("nft", "ebiptables"))
    return nft.verdict, ebt.verdict


def bpdu(raw: bytes) -> bytes:
    body = b"\x42\x42\x03" + raw
    frame = bytes.fromhex("0180c2000000") + bytes.fromhex(MAC.replace(":", "")) \
        + struct.pack("!H", len(body)) + body
    return frame + b"\0" * max(0, 60 - len(frame))


def test_a_tcn_bpdu_is_never_one_to_ebt_stp() -> None:
    rs = ruleset("<rule action='drop' direction='out'><stp type='0x80'/></rule>")
    tcn = bpdu(bytes([0, 0, 0, 0x80]))
    assert verdicts(rs, Hook.FROM_VM, tcn) == ("DROP", "ACCEPT")


def test_ebt_stp_reads_the_configuration_one_byte_early() -> None:
    rs = ruleset("<rule action='drop' direction='out'><stp flags='0x02'/></rule>"
                 "<rule action='drop' direction='out'><stp root-priority='272'/></rule>")
    # A configuration BPDU with flags 1 and root priority 0x1000: to ebt_stp
    # the flags are 0 (the type byte) and the root priority 0x0110 (272).
    config = bpdu(bytes([0, 0, 0, 0, 1, 0x10, 0]) + bytes(40))
    assert verdicts(rs, Hook.FROM_VM, config) == ("ACCEPT", "DROP")
    walk = Explainer(rs, backend="ebiptables").explain(Hook.FROM_VM, config)
    assert walk.decided_by.split()[0].endswith("#2")


def test_ebt_stp_never_matches_an_rstp_bpdu() -> None:
    rs = ruleset("<rule action='drop' direction='out'><stp type='0'/></rule>")
    rstp = bpdu(bytes([0, 0, 2, 2, 0x3C]) + bytes(40))
    config = bpdu(bytes([0, 0, 0, 0, 0]) + bytes(40))
    assert verdicts(rs, Hook.FROM_VM, rstp) == ("ACCEPT", "ACCEPT")
    assert verdicts(rs, Hook.FROM_VM, config) == ("DROP", "DROP")


def _ah6_udp(dport: int) -> bytes:
    payload = struct.pack("!BBHII", 17, 1, 0, 0x100, 1) + struct.pack("!HHHH", 1, dport, 8, 0)
    return build_frame(PacketSpec(src_mac=MAC, dst_mac=PEER, proto="ah", src_ip="fd00::1",
                                  dst_ip="fd00::2", payload=payload))


def test_ebtables_ip6_match_skips_an_authentication_header() -> None:
    rs = ruleset("<rule action='drop' direction='out'><ipv6 protocol='udp' "
                 "dstportstart='7000'/></rule>")
    hits = [verdicts(rs, Hook.FROM_VM, _ah6_udp(port)) for port in (7000, 9)]
    assert ("ACCEPT", "DROP") in hits and ("ACCEPT", "ACCEPT") in hits
    assert Frame(_ah6_udp(7000)).ip[4] == 51  # type: ignore[index]
    assert Frame(_ah6_udp(7000)).ebt_l4[0] == 17


def test_layer3_takes_ah_for_the_protocol_on_both() -> None:
    rs = ruleset("<rule action='drop' direction='out'><ah-ipv6/></rule>")
    assert verdicts(rs, Hook.FROM_VM, _ah6_udp(9)) == ("DROP", "DROP")


def test_ebtables_ip_match_gives_the_protocol_of_a_later_fragment() -> None:
    rs = ruleset("<rule action='drop' direction='out'><ip protocol='udp'/></rule>"
                 "<rule action='drop' direction='out'><ip protocol='tcp' "
                 "dstportstart='80'/></rule>")
    frame = bytearray(build_frame(PacketSpec(src_mac=MAC, dst_mac=PEER, proto="udp",
                                             src_ip="10.0.0.1", dst_ip="10.0.0.2", dport=80,
                                             payload=bytes(20))))
    frame[20:22] = struct.pack("!H", 3)  # fragment offset 24 bytes
    assert verdicts(rs, Hook.FROM_VM, bytes(frame)) == ("ACCEPT", "DROP")
    frame[23] = 6  # tcp: no ports in a later fragment, for either
    assert verdicts(rs, Hook.FROM_VM, bytes(frame)) == ("ACCEPT", "ACCEPT")


def test_implicit_states_test_the_conntrack_direction_on_ebiptables() -> None:
    rs = ruleset("<rule action='accept' direction='out'><udp dstportstart='53'/></rule>"
                 "<rule action='drop' direction='inout'><udp/></rule>")
    # An established packet from the guest to port 53 in the reply direction:
    # a flow the peer opened from port 53.
    frame = build_frame(PacketSpec(src_mac=MAC, proto="udp", src_ip="10.0.0.1",
                                   dst_ip="10.0.0.2", sport=1000, dport=53))
    established = CtState.ESTABLISHED
    assert verdicts(rs, Hook.FROM_VM, frame, ct_state=established) == ("ACCEPT", "DROP")
    assert verdicts(rs, Hook.FROM_VM, frame, ct_state=established, ct_dir="original") == (
        "ACCEPT", "ACCEPT")
    walk = Explainer(rs, backend="ebiptables").explain(Hook.FROM_VM, frame,
                                                       ct_state=established)
    assert walk.ct_dir == "reply" and "--ctdir ORIGINAL: fails" in walk.steps[1].why
    assert walk.as_json()["backend"] == "ebiptables"
    assert walk.lines()[0].endswith("rules of the ebiptables backend")


def test_backends_and_directions_are_checked() -> None:
    rs = ruleset("<rule action='drop' direction='out'><all/></rule>")
    with pytest.raises(ValidationError, match="backend must be one of nft, ebiptables"):
        Explainer(rs, backend="iptables")
    with pytest.raises(ValidationError, match="ct_dir must be one of original, reply"):
        Explainer(rs).explain(Hook.FROM_VM, build_frame(PacketSpec()), ct_dir="forward")
    assert [semantics_of(b) for b in ("nft", "ebiptables", "memory")] == [
        "nft", "ebiptables", "nft"]


def _sctp(chunks: bytes, *, vtag: int = 0, crc: bool = True) -> Frame:
    seg = struct.pack("!HHII", 1000, 2905, vtag, 0) + chunks
    if crc:
        seg = seg[:8] + sctp_checksum(seg) + seg[12:]
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(seg), 1, 0, 64, 132, 0,
                       bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2]))
    return Frame(bytes.fromhex("525400000000525400000001") + b"\x08\x00" + head + seg)


def _chunk(kind: int, body: bytes = b"", flags: int = 0) -> bytes:
    raw = struct.pack("!BBH", kind, flags, 4 + len(body)) + body
    return raw + b"\0" * (-len(raw) % 4)


INIT = _chunk(1, struct.pack("!IIHHI", 0x1234, 65535, 1, 1, 1))
HEARTBEAT = _chunk(4, b"\0\1\0\x08abcd")


@pytest.mark.parametrize(("chunks", "vtag", "crc", "state"), [
    (INIT, 0, True, CtState.NEW),
    (INIT, 0, False, CtState.INVALID),  # a wrong CRC32c
    (INIT, 5, True, CtState.INVALID),  # INIT with a tag
    (_chunk(1, b"\0\0\0\1"), 0, True, CtState.INVALID),  # no room for the INIT header
    (INIT + _chunk(0, bytes(16)), 0, True, CtState.INVALID),  # INIT not alone
    (_chunk(0, bytes(16)), 0, True, CtState.INVALID),  # DATA
    (_chunk(3, bytes(12)), 0, True, CtState.INVALID),  # SACK
    (_chunk(6), 0, True, CtState.INVALID),  # ABORT
    (_chunk(11), 0, True, CtState.INVALID),  # COOKIE ACK
    (_chunk(14), 5, True, CtState.INVALID),  # SHUTDOWN COMPLETE
    (HEARTBEAT, 5, True, CtState.NEW),
    (_chunk(9), 0, True, CtState.NEW),  # ERROR
    (_chunk(9), 5, True, CtState.INVALID),
    (_chunk(10, b"abcd"), 0, True, CtState.NEW),  # COOKIE ECHO
    (HEARTBEAT + _chunk(10, b"abcd"), 0, True, CtState.INVALID),  # COOKIE ECHO not first
    (_chunk(7, b"\0\0\0\1"), 0, True, CtState.NEW),  # SHUTDOWN
    (_chunk(8), 0, True, CtState.NEW),  # SHUTDOWN ACK
    (b"", 0, True, CtState.INVALID),  # no chunk
])
def test_sctp_first_packets_as_conntrack_takes_them(chunks: bytes, vtag: int, crc: bool,
                                                    state: CtState) -> None:
    assert default_ct_state(_sctp(chunks, vtag=vtag, crc=crc)) is state


def test_built_sctp_frames_open_a_flow() -> None:
    frame = Frame(build_frame(PacketSpec(proto="sctp", src_ip="10.0.0.1", dst_ip="10.0.0.2",
                                         sport=1, dport=2905, payload=b"hello")))
    assert default_ct_state(frame) is CtState.NEW
    assert frame.transport(2, 2) == 2905
