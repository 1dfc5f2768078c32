"""The demo's ruleset difference names each changed chain once."""

from __future__ import annotations

from nwfilter.sandbox import ruleset_diff

BEFORE = """table bridge nwfilter {
\tchain vnet0/from/ipv4 {
\t\tip protocol icmp accept
\t}
\tchain vnet1/from/ipv4 {
\t\tip protocol icmp accept
\t}
}
"""


def test_each_port_chain_is_named_once() -> None:
    after = BEFORE.replace("icmp accept", "icmp drop")
    text = ruleset_diff(BEFORE, after)
    assert text.splitlines() == [
        "    chain bridge nwfilter vnet0/from/ipv4:",
        "      -ip protocol icmp accept",
        "      +ip protocol icmp drop",
        "    chain bridge nwfilter vnet1/from/ipv4:",
        "      -ip protocol icmp accept",
        "      +ip protocol icmp drop",
    ]


def test_no_change() -> None:
    assert ruleset_diff(BEFORE, BEFORE) == "    (no change)"
