"""Which state root owns the nwfilter tables of a namespace, said by the tables.

Each of our tables holds a chain ``owner`` (no hook, never jumped to: it
costs no packet anything) with one rule whose comment is the owner's label
(`Owner.label`: tag, root id, root path).  libnftables 1.0.6 neither takes
nor prints table comments in JSON, so the chain is the cheap readable
place: reading it is one ``list chain`` per table.

Claiming uses ``create chain``, which the kernel refuses with EEXIST when
the chain exists: of two roots claiming a namespace at once, exactly one
transaction commits.  Port chains are named ``<tag>/<hook>[/<chain>]`` and
base chains ``pre``/``fwd``/``out``, so ``owner`` collides with none.
"""

from __future__ import annotations

from typing import Any

from nwfilter.backends.base import Owner

from .render import BRIDGE, INET, TABLE, Batch

OWNER_CHAIN = "owner"
FAMILIES = (BRIDGE, INET)


def marker(owner: Owner, *, claim: bool = True) -> Batch:
    """The owner chain and its rule in both tables.  The chain is created
    with `create`, so the batch fails if an owner chain exists already; with
    `claim` the tables are added first if missing (without it they must
    exist, or have been added earlier in the same batch)."""
    batch = Batch()
    for family in FAMILIES:
        if claim:
            batch.add({"add": {"table": {"family": family, "name": TABLE}}})
        batch.add({"create": {"chain": {"family": family, "table": TABLE,
                                        "name": OWNER_CHAIN}}})
        batch.add({"add": {"rule": {"family": family, "table": TABLE, "chain": OWNER_CHAIN,
                                    "expr": [{"counter": None}],
                                    "comment": owner.label()}}})
    return batch


def list_commands(family: str) -> dict[str, Any]:
    return {"nftables": [{"list": {"chain": {"family": family, "table": TABLE,
                                             "name": OWNER_CHAIN}}}]}


def owner_in(listing: Any) -> Owner | None:
    """The owner named by the first owner rule of a `list chain` answer."""
    if not isinstance(listing, dict):
        return None
    for item in listing.get("nftables", ()):
        rule = item.get("rule") if isinstance(item, dict) else None
        if isinstance(rule, dict) and isinstance(rule.get("comment"), str):
            found = Owner.from_label(rule["comment"])
            if found is not None:
                return found
    return None
