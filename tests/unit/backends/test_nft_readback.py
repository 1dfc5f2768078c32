"""Reading our tables back from `nft list table` text (no kernel needed)."""

from __future__ import annotations

from nwfilter.backends.nft import readback, render
from nwfilter.ir import Hook

D = render.DIGEST_TAG


def _base(family: str) -> str:
    """The base chains and maps as `nft list table` prints them."""
    out = []
    digests = render.base_digests()
    for (fam, name), (hook, prio) in render.base_chains().items():
        if fam != family:
            continue
        named = {(render.BRIDGE, -300): "dstnat", (render.BRIDGE, -200): "filter",
                 (render.INET, 0): "filter"}[(fam, prio)]
        rules = "".join(f'\t\tx comment "{render.BASE_COMMENT}{D}{d}"\n'
                        for d in digests[(fam, name)])
        out.append(f"\tchain {name} {{\n\t\ttype filter hook {hook} priority {named}; "
                   f"policy accept;\n{rules}\t}}\n")
    return "".join(out)


BRIDGE = (
    "table bridge nwfilter {\n"
    "\tmap from_vm {\n\t\ttype ifname : verdict\n"
    '\t\telements = { "vnet0" : jump vnet0/from/root,\n'
    '\t\t\t     "v,}{" : jump _762c7d7b/from/root,\n'
    '\t\t\t     "vnet9" : drop }\n\t}\n'
    "\tmap to_vm {\n\t\ttype ifname : verdict\n\t}\n"
    + _base(render.BRIDGE) +
    "\tchain vnet0/from/root {\n"
    f'\t\tmeta mark set meta mark & 0xffff0000 | 0x00000007 comment "port id 7{D}0123456789"\n'
    f'\t\tether type ip counter packets 12 bytes 3456 drop comment '
    f'"filter \'x\' rule 1 counter packets 9 bytes 9{D}abcdefabcd"\n'
    '\t\tether type arp accept comment "someone else"\n'
    "\t}\n"
    "\tchain vnet0/to/root {\n\t}\n"
    "}\n"
)
INET = (
    "table inet nwfilter {\n"
    "\tmap l3_from {\n\t\ttype mark : verdict\n"
    "\t\telements = { 0x00000007 : jump vnet0/from }\n\t}\n"
    "\tmap l3_to {\n\t\ttype mark : verdict\n\t}\n"
    "\tset cl4_vnet0_0123456789 {\n\t\ttype ipv4_addr\n\t\tsize 65535\n"
    "\t\tflags dynamic\n\t\telements = { 10.0.0.1 ct count over 3 }\n\t}\n"
    "\tset ipset4_blocked {\n\t\ttype ipv4_addr\n\t\tflags interval\n"
    "\t\telements = { 192.0.2.0/24 }\n\t}\n"
    + _base(render.INET) +
    "\tchain vnet0/from {\n\t}\n"
    "}\n"
)


def test_parse_reads_chains_digests_elements_and_sets() -> None:
    listing = readback.parse({render.BRIDGE: BRIDGE, render.INET: INET})
    assert listing.tables == {"bridge", "inet"}
    assert readback.layout_problem(listing) is None
    assert readback.base_drift(listing) == frozenset()
    root = ("bridge", "vnet0/from/root")
    assert listing.digests[root] == ["0123456789", "abcdefabcd", readback.UNKNOWN]
    assert listing.digests[("bridge", "vnet0/to/root")] == []
    # Counter values are read apart from the digests; a comment cannot pass for one.
    assert listing.counts[root] == [None, (12, 3456), None]
    record = readback.port_record(listing, "vnet0", 7)
    assert record.counts[root] == (None, (12, 3456), None)
    assert listing.elements[("bridge", "from_vm")] == {
        "vnet0": "vnet0/from/root", "v,}{": "_762c7d7b/from/root", "vnet9": None}
    assert listing.elements[("inet", "l3_from")] == {7: "vnet0/from"}
    assert sorted(listing.sets) == ["cl4_vnet0_0123456789", "ipset4_blocked"]
    assert readback.port_ids(listing, ["vnet0"]) == {"vnet0": 7}
    record = readback.port_record(listing, "vnet0", 7)
    assert record.bridge_chains == {"vnet0/from/root", "vnet0/to/root"}
    assert record.inet_chains == {"vnet0/from"}
    assert record.l2_hooks == {Hook.FROM_VM} and record.l3_hooks == {Hook.FROM_VM}
    assert record.sets == {"cl4_vnet0_0123456789"}


def test_layout_problems_replace_and_drift_repairs() -> None:
    other = BRIDGE.replace(render.BASE_COMMENT, "nwfilter layout 0")
    assert "another layout" in (readback.layout_problem(
        readback.parse({"bridge": other, "inet": INET})) or "")
    foreign = BRIDGE.replace("\tchain vnet0/to/root {\n", "\tchain extra {\n\t\ttype filter "
                             "hook input priority filter; policy drop;\n")
    assert "unknown base chain" in (readback.layout_problem(
        readback.parse({"bridge": foreign, "inet": INET})) or "")
    assert "missing" in (readback.layout_problem(
        readback.parse({"bridge": BRIDGE, "inet": None})) or "")
    flushed = readback.parse({"bridge": BRIDGE, "inet": INET})
    flushed.digests[("inet", "l3_fwd")] = []
    assert readback.base_drift(flushed) == {("inet", "l3_fwd")}


def test_a_distrusted_chain_matches_nothing_rendered() -> None:
    listing = readback.parse({"bridge": BRIDGE, "inet": INET})
    readback.distrust(listing, [("bridge", "vnet0/from/root"), ("inet", "vnet0/from")])
    assert set(listing.digests[("bridge", "vnet0/from/root")]) == {readback.UNKNOWN}
    assert listing.digests[("inet", "vnet0/from")] == [readback.UNKNOWN]


def test_a_comment_ends_with_the_digest_of_its_rule() -> None:
    exprs = [{"drop": None}]
    text = "filter 'n\udcff' rule 1 " + "x" * 200  # a byte that was not UTF-8; too long
    comment = render.rule_comment(text, render.digest(exprs, text))
    assert len(comment.encode()) <= render.MAX_COMMENT_BYTES
    assert render.digest_of(comment) == render.digest(exprs, text)
    assert render.digest(exprs, text) != render.digest([{"accept": None}], text)
    assert render.digest_of(comment + " ") is None
