"""The pure parts of `nwfilter stats`: reading counters out of the nft
listing and the `*-save -c` text, tying ebiptables rules to their origin,
and the per-direction totals."""

from __future__ import annotations

import uuid
from pathlib import Path

from nwfilter.audit import stats
from nwfilter.backends.ebiptables import plan
from nwfilter.backends.ebiptables import render as ebip
from nwfilter.compile import Compiler
from nwfilter.conf.model import BindingDef, FilterRef, Parameter
from nwfilter.pool import FilterPool

STOCK = Path(__file__).resolve().parents[3] / "filters"

NFT = """table bridge nwfilter {
\tchain l2_pre {
\t\ttype filter hook prerouting priority dstnat; policy accept;
\t\tiifname vmap @from_vm comment "nwfilter layout 1 #d=9c51d8670b"
\t}
\tchain vnet0/from/root {
\t\tcounter packets 7 bytes 700 comment "nwfilter: frames entering the port's chains #d=7acd2728a6"
\t\tjump vnet0/from/mac comment "no counter here #d=adbcfa1067"
\t\tether type ip counter packets 4 bytes 400 accept comment "filter 'x' rule 3 #d=4c9bcda26d"
\t\tcounter packets 2 bytes 200 drop comment "filter 'x' rule 9 #d=8634589d14"
\t}
\tchain vnet1/from/root {
\t\tcounter packets 1 bytes 100 drop comment "filter 'y' rule 1 #d=0123456789"
\t}
}
"""


def test_nft_listing_gives_each_rule_its_counts_verdict_and_digest() -> None:
    chains = stats.parse_counters("bridge", NFT)
    assert set(chains) == {"l2_pre", "vnet0/from/root", "vnet1/from/root"}
    root = chains["vnet0/from/root"]
    assert [(r["verdict"], r["packets"], r["bytes"]) for r in root] == [
        ("", 7, 700), ("jump", None, None), ("accept", 4, 400), ("drop", 2, 200)]
    assert root[2]["digest"] == "4c9bcda26d" and root[2]["comment"] == "filter 'x' rule 3"
    assert set(stats.parse_counters("bridge", NFT, {"vnet1"})) == {"vnet1/from/root"}


def test_save_text_with_counters() -> None:
    text = ("*nat\n:PREROUTING ACCEPT\n:libvirt-I-vnet0 ACCEPT\n"
            "[3:180] -A PREROUTING -i vnet0 -j libvirt-I-vnet0\n"
            "[2:120] -A libvirt-I-vnet0 -p IPv4 -j ACCEPT\n"
            "[1:60] -A libvirt-I-vnet0 -j DROP\n")
    assert plan.counted(text) == {
        "PREROUTING": [("-i vnet0 -j libvirt-I-vnet0", 3, 180)],
        "libvirt-I-vnet0": [("-p IPv4 -j ACCEPT", 2, 120), ("-j DROP", 1, 60)]}


def test_ebiptables_origins_line_up_with_the_rendered_rules(tmp_path: Path) -> None:
    pool = FilterPool(tmp_path / "cfg", stock_dir=STOCK)
    pool.load()
    binding = BindingDef("vm", uuid.uuid4(), "vnet0", "52:54:00:00:00:01",
                         FilterRef("clean-traffic", (Parameter("IP", "10.0.0.1"),)))
    ruleset = Compiler(pool.snapshot()).compile(binding)
    tables = ebip.render_port(ruleset)
    origins = ebip.port_origins(ruleset)
    for table in ebip.TABLES:
        assert set(origins[table]) == set(tables.chains[table])
        for chain, specs in tables.chains[table].items():
            assert len(origins[table][chain]) == len(specs)
    root = origins[ebip.EB]["libvirt-I-vnet0"]
    assert root[-1] is not None and root[-1].filter == "no-other-l2-traffic"


def _row(direction: str, verdict: str, packets: int, size: int) -> dict[str, object]:
    return {"direction": direction, "verdict": verdict, "packets": packets, "bytes": size}


def test_totals_accepted_is_what_entered_less_what_was_dropped() -> None:
    rows = [_row("out", "drop", 2, 200), _row("out", "reject", 1, 50),
            _row("out", "accept", 9, 900), _row("in", "drop", 4, 40),
            _row("in", "return", 3, 30)]
    totals = stats._totals(rows, {"out": (10, 1000), "in": (4, 40)})
    assert totals["out"] == {"accepted": {"packets": 7, "bytes": 750},
                             "dropped": {"packets": 3, "bytes": 250}}
    assert totals["in"] == {"accepted": {"packets": 0, "bytes": 0},
                            "dropped": {"packets": 4, "bytes": 40}}
    assert totals["accepted"] == {"packets": 7, "bytes": 750}
    assert totals["dropped"] == {"packets": 7, "bytes": 290}
    unknown = stats._totals(rows, {"out": (10, 1000)})
    assert unknown["in"]["accepted"] is None and unknown["accepted"] is None
    assert stats._totals([], None)["dropped"] is None  # no counters at all
