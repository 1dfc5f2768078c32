"""Replay recorded frames between the two guests of a bridge lab.

The differential test against libvirt (`test_libvirt_verdicts.py`) and the
tool that recorded libvirt's verdicts (`tools/record_libvirt_verdicts.py`)
send the same bytes the same way: each frame carries ``nwt-probe:NNN`` in
its payload, frames of one direction go out in one burst from one guest,
and a capture on the other guest tells which arrived.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from nwfilter.conf import parse_binding
from nwfilter.engine import Engine
from tests.integration.conftest import BridgeLab
from tests.integration.nettools import FrameCatcher, send_frames

MARKER = b"nwt-probe:"
_TAG_RE = re.compile(re.escape(MARKER) + rb"(\d{3})")
CAPTURE_S = 0.3


@dataclass(frozen=True)
class Frame:
    """One recorded frame: guest 0 → guest 1, or the reverse when `inbound`."""

    label: str
    inbound: bool
    data: bytes


def quiet_guests(lab: BridgeLab) -> None:
    """ARP and IPv6 off in the guests, so that only the replayed frames cross."""
    for guest in lab.guests:
        lab.run(guest.ns, ["ip", "link", "set", guest.ifname, "arp", "off"])
        lab.lab.sysctl(guest.ns, "net.ipv6.conf.all.disable_ipv6", "1")
        lab.lab.sysctl(guest.ns, f"net.ipv6.conf.{guest.ifname}.disable_ipv6", "1")


def replay(lab: BridgeLab, frames: Sequence[Frame]) -> set[str]:
    """Send every frame and return the labels of those that arrived."""
    g0, g1 = lab.guests[:2]
    arrived: set[str] = set()
    for inbound in (False, True):
        batch = {i: f for i, f in enumerate(frames) if f.inbound == inbound}
        if not batch:
            continue
        src, dst = (g1, g0) if inbound else (g0, g1)
        catcher = FrameCatcher(dst.ns, dst.ifname, lambda frame: MARKER in frame)
        try:
            send_frames(src.ns, src.ifname, [f.data for f in batch.values()])
            got = catcher.collect(CAPTURE_S)
        finally:
            catcher.close()
        for frame in got:
            for match in _TAG_RE.finditer(frame):
                index = int(match.group(1))
                if index in batch:
                    arrived.add(batch[index].label)
    return arrived


def bind_case(engine: Engine, case: dict[str, Any]) -> None:
    """Define a recorded case's filters and bind its filter to `vnet0`
    (guest 0's port) with the case's parameters, as the recording did."""
    for doc in case["filters"]:
        engine.define_filter(doc)
    parameters = "".join(f"<parameter name='{k}' value='{v}'/>" for k, v in case["params"])
    engine.create_bindings([parse_binding(
        f"<filterbinding><owner><name>vm0</name><uuid>{uuid.UUID(int=1)}</uuid></owner>"
        f"<portdev name='vnet0'/><mac address='52:54:00:00:00:00'/>"
        f"<filterref filter='{case['bind']}'>{parameters}</filterref></filterbinding>"
    )])
