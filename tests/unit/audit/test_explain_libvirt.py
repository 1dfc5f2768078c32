"""The explainer against libvirt's recorded verdicts (no root needed).

tests/golden/libvirt/verdicts.json holds frames and which of them libvirt
delivered through a binding of vnet0 (the kernel test
tests/integration/test_libvirt_verdicts.py shows both backends deliver
the same).  Each frame walks vnet0's compiled rules here, out of the port
for frames guest 0 sent, into it for the others; conntrack state follows
the frames in the order the replay sends them.  Walked as the ebiptables
backend has the rules (libvirt's own), the verdicts are libvirt's
exactly; walked as nft has them, but for the frames `DIFFERS` names.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from nwfilter.audit.explain import Explainer, default_ct_state
from nwfilter.audit.packet import Frame
from nwfilter.compile import Compiler
from nwfilter.conf import parse_binding, parse_filter
from nwfilter.errors import NwfilterError
from nwfilter.ir import CtState, Hook
from tests.integration.test_libvirt_verdicts import DIFFERS

ROOT = Path(__file__).resolve().parents[3]
CASES: list[dict[str, Any]] = json.loads(
    (ROOT / "tests" / "golden" / "libvirt" / "verdicts.json").read_text())["cases"]


def _stock() -> dict[str, Any]:
    out = {}
    for path in sorted((ROOT / "filters").glob("*.xml")):
        fdef = parse_filter(path.read_bytes(), source=str(path))
        out[fdef.name] = fdef
    return out


def _flow(frame: Frame) -> tuple[object, ...] | None:
    ip = frame.ip
    if ip is None or ip[4] not in (6, 17):
        return None
    return (ip[1], ip[2], ip[4], frame.transport(0, 2), frame.transport(2, 2))


@pytest.mark.parametrize("backend", ["nft", "ebiptables"])
@pytest.mark.parametrize("case", [c for c in CASES if "refused" not in c],
                         ids=[c["id"] for c in CASES if "refused" not in c])
def test_explain_gives_libvirts_verdicts(case: dict[str, Any], backend: str) -> None:
    filters = _stock()
    for doc in case["filters"]:
        fdef = parse_filter(doc)
        filters[fdef.name] = fdef
    parameters = "".join(f"<parameter name='{k}' value='{v}'/>" for k, v in case["params"])
    binding = parse_binding(
        f"<filterbinding><owner><name>vm0</name><uuid>{uuid.UUID(int=1)}</uuid></owner>"
        f"<portdev name='vnet0'/><mac address='52:54:00:00:00:00'/>"
        f"<filterref filter='{case['bind']}'>{parameters}</filterref></filterbinding>")
    try:
        ruleset = Compiler(filters).compile(binding)
    except NwfilterError:
        pytest.skip("refused by the compiler")
    explainer = Explainer(ruleset, backend=backend)
    delivered: set[str] = set()
    seen: set[tuple[object, ...]] = set()
    # The replay sends every outbound frame first, then every inbound one.
    for inbound in (False, True):
        for f in case["frames"]:
            if f["inbound"] != inbound:
                continue
            frame = Frame(bytes.fromhex(f["hex"]))
            flow = _flow(frame)
            state, direction = default_ct_state(frame), "original"
            if flow is not None and (flow[1], flow[0], flow[2], flow[4], flow[3]) in seen:
                state, direction = CtState.ESTABLISHED, "reply"
            hook = Hook.TO_VM if inbound else Hook.FROM_VM
            result = explainer.explain(hook, frame, ct_state=state, ct_dir=direction)
            if result.verdict == "ACCEPT":
                delivered.add(f["label"])
                if flow is not None:
                    seen.add(flow)
    expected = set(case["libvirt_delivered"])
    for label in DIFFERS.get(case["id"], {}) if backend == "nft" else {}:
        expected ^= {label}
    assert delivered == expected
