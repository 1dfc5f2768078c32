"""Verdicts equal to libvirt's, on the same frames.

tests/golden/libvirt/verdicts.json holds, per case, filters, a binding of
vnet0, raw frames and which of them libvirt 9.0 delivered
(tools/record_libvirt_verdicts.py recorded them with libvirtd in a lab like
this one).  Here the same filters are defined and bound through `Engine`
with each kernel backend (nft, ebiptables), the same bytes are replayed between the same guests,
and the delivered set must be libvirt's.  Cases whose filter we refuse on
purpose (`refused` in the file) must be refused with that reason, and
`differs` lists frames whose verdict differs from libvirt's on purpose, with
the reason.  libvirt is not needed here.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nwfilter.backends import get_backend
from nwfilter.engine import Engine
from nwfilter.errors import NwfilterError
from nwfilter.netlab import NetLab
from tests.integration.conftest import BridgeLab, build_bridge_lab, kernel_engine
from tests.integration.replay import Frame, bind_case, quiet_guests, replay

pytestmark = [pytest.mark.root, pytest.mark.netns]

RECORDED = Path(__file__).resolve().parents[1] / "golden" / "libvirt" / "verdicts.json"
CASES: list[dict[str, Any]] = json.loads(RECORDED.read_text())["cases"]

#: Frames whose verdict differs from libvirt's on purpose (nft backend; the
#: ebiptables backend writes libvirt's own rules): case -> label -> why.
DIFFERS: dict[str, dict[str, str]] = {
    "stp-type": {
        "tcn": "libvirt's rule '-d BGA --stp-type tcn -j DROP' (ebtables-nft 1.8.9) lets"
               " the TCN BPDU pass on this kernel; nwfilter drops it, as the rule says",
    },
}
#: Filters refused by one backend only: backend -> case -> why it is honoured.
HONOURED: dict[str, dict[str, str]] = {
    "ebiptables": {"arp-gratuitous": "ebtables' --arp-gratuitous compares sender and target"},
}


@pytest.fixture(scope="module")
def vlab() -> Iterator[BridgeLab]:
    with NetLab() as netlab:
        lab = build_bridge_lab(netlab)
        quiet_guests(lab)
        yield lab


@pytest.fixture(params=["nft", "ebiptables"])
def engine(vlab: BridgeLab, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Engine]:
    with kernel_engine(get_backend(request.param, vlab.host), tmp_path) as eng:
        yield eng



def test_recording_covers_the_cases_asked_for() -> None:
    ids = {c["id"] for c in CASES}
    assert {"clean-traffic", "split-match", "l3-udp-srcmac", "ipt-no-macspoof",
            "subchain-fall-through", "arp-gratuitous"} <= ids
    assert all(c["frames"] for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_same_verdicts_as_libvirt(vlab: BridgeLab, engine: Engine, case: dict[str, Any]) -> None:
    frames = [Frame(f["label"], f["inbound"], bytes.fromhex(f["hex"])) for f in case["frames"]]
    if "refused" in case and case["id"] not in HONOURED.get(engine.backend.name, {}):
        # A deliberate difference: refused when defined or bound, with the reason.
        with pytest.raises(NwfilterError, match=case["refused"]):
            bind_case(engine, case)
        return
    bind_case(engine, case)
    expected = set(case["libvirt_delivered"])
    differs = DIFFERS.get(case["id"], {}) if engine.backend.name == "nft" else {}
    for label in differs:
        expected ^= {label}
    assert replay(vlab, frames) == expected
    engine.delete_binding("vnet0")
    assert replay(vlab, frames) == {f.label for f in frames}
