"""The rules in the kernel are libvirt's, line for line.

tests/golden/libvirt/ebiptables.json holds, per case, filters, a binding of
vnet0 and what libvirt 9.0 put in `ebtables-save -t nat`, `iptables-save`
and `ip6tables-save` for it (tools/record_libvirt_ebiptables.py recorded it
with libvirtd in a lab like this one).  Here the same filters are bound
through `Engine` with the ebiptables backend, and the port's own lines
(its chains, the rules that lead to them, and the shared `libvirt-*`
chains of a family it uses) must be libvirt's.  libvirt is not needed here.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nwfilter.backends.ebiptables import EbiptablesBackend
from nwfilter.engine import Engine
from nwfilter.netlab import NetLab
from tests.integration.conftest import BridgeLab, build_bridge_lab, kernel_engine
from tests.integration.replay import bind_case

pytestmark = [pytest.mark.root, pytest.mark.netns]

RECORDED = Path(__file__).resolve().parents[1] / "golden" / "libvirt" / "ebiptables.json"
CASES: list[dict[str, Any]] = json.loads(RECORDED.read_text())["cases"]
_PORT = re.compile(r"(^|[\s:-])vnet0($|[\s-])")
_SHARED = re.compile(r"^(:libvirt-(in|out|in-post|host-in) |-A (INPUT|FORWARD) -j libvirt-)")


def port_lines(lines: list[str]) -> dict[str, list[str]]:
    """The port's lines, per chain (declarations under ':'), in order."""
    mine = [line for line in lines if _PORT.search(line)]
    if mine:
        mine += [line for line in lines if _SHARED.match(line)]
    out: dict[str, list[str]] = {}
    for line in mine:
        if line.startswith(":"):
            out.setdefault(":", []).append(line)
        else:
            out.setdefault(line.split()[1], []).append(line)
    out.get(":", []).sort()
    return out


@pytest.fixture(scope="module")
def glab() -> Iterator[BridgeLab]:
    with NetLab() as netlab:
        yield build_bridge_lab(netlab)


@pytest.fixture
def engine(glab: BridgeLab, tmp_path: Path) -> Iterator[Engine]:
    with kernel_engine(EbiptablesBackend(netns=glab.host), tmp_path) as eng:
        yield eng



def saved(lab: BridgeLab, tool: str, table: str) -> list[str]:
    return lab.run(lab.host, [tool, "-t", table]).stdout.splitlines()


@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_same_rules_as_libvirt(glab: BridgeLab, engine: Engine, case: dict[str, Any]) -> None:
    bind_case(engine, case)
    for key, tool, table in (("ebtables_nat", "ebtables-save", "nat"),
                             ("iptables", "iptables-save", "filter"),
                             ("ip6tables", "ip6tables-save", "filter")):
        assert port_lines(saved(glab, tool, table)) == port_lines(case[key]), tool
    engine.delete_binding("vnet0")
    for tool, table in (("ebtables-save", "nat"), ("iptables-save", "filter"),
                        ("ip6tables-save", "filter")):
        assert not port_lines(saved(glab, tool, table)), tool
