"""Port stamps: a start proves a port in force from its stamp and the
listed rule digests, without rendering; anything else renders it."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwfilter.backends.nft import readback, render
from nwfilter.backends.nft.render import BRIDGE, INET, Capabilities, PortRecord
from nwfilter.ir import CtState, Field, Hook, IntRange, Match, Ruleset, TcpFlag, TcpFlags, Verdict
from nwfilter.ir_digest import ruleset_digest
from tests.nft_rulesets import clean_traffic, l3_rule, with_l3
from tests.unit.backends.test_nft_readback import _base

CAPS = Capabilities()
REPO = Path(__file__).resolve().parents[3]


def _ruleset(ip: str = "10.0.0.1", limit: int = 3) -> Ruleset:
    return with_l3(clean_traffic("vnet0", "52:54:00:00:00:01", ip), to_vm=(
        l3_rule([Match(Field.CT_STATE, frozenset({CtState.ESTABLISHED, CtState.RELATED}))],
                Verdict.ACCEPT),
        l3_rule([Match(Field.IP_PROTO, 6), Match(Field.L4_DPORT, IntRange.single(8080)),
                 Match(Field.CONNLIMIT_ABOVE, limit)], Verdict.DROP, idx=2),
    ))


def _set_refs(value: object) -> list[str]:
    """The '@set' names a rendered rule's expressions hold."""
    if isinstance(value, str):
        return [value] if value.startswith("@") else []
    if isinstance(value, dict):
        return [ref for item in value.values() for ref in _set_refs(item)]
    if isinstance(value, list):
        return [ref for item in value for ref in _set_refs(item)]
    return []


def _listing_text(records: list[PortRecord], comments: dict[tuple[str, str], list[str]],
                  family: str) -> str:
    """Our table as `nft list table` prints it, holding what was rendered."""
    lines = [f"table {family} nwfilter {{"]
    if family == BRIDGE:
        for hook, vmap in render.L2_MAP.items():
            items = [f'"{r.portdev}" : jump {render.l2_chain_name(r.portdev, hook, "root")}'
                     for r in records if hook in r.l2_hooks]
            lines.append(f"\tmap {vmap} {{\n\t\ttype ifname : verdict")
            if items:
                lines.append("\t\telements = { " + ", ".join(items) + " }")
            lines.append("\t}")
    else:
        for hook, vmap in render.L3_MAP.items():
            items = [f"0x{r.port_id << render.shift(hook):08x} : jump "
                     f"{render.l3_chain_name(r.portdev, hook)}"
                     for r in records if hook in r.l3_hooks]
            lines.append(f"\tmap {vmap} {{\n\t\ttype mark : verdict")
            if items:
                lines.append("\t\telements = { " + ", ".join(items) + " }")
            lines.append("\t}")
        for record in records:
            for name in sorted(record.sets):
                lines.append(f"\tset {name} {{\n\t\ttype ipv4_addr\n\t\tsize 65535\n"
                             "\t\tflags dynamic\n\t}")
    lines.append(_base(family).rstrip("\n"))
    for (fam, name), texts in sorted(comments.items()):
        if fam != family:
            continue
        lines.append(f"\tchain {name} {{")
        lines.extend(f'\t\tx {text}' if text.startswith("@") else f'\t\tx comment "{text}"'
                     for text in texts)
        lines.append("\t}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _kernel(ruleset: Ruleset, port_id: int = 7,
            edit: dict[tuple[str, str], list[str]] | None = None) -> tuple[readback.Listing,
                                                                            PortRecord]:
    """What the kernel lists after `ruleset` was applied (and `edit` replaced
    the comments of some chains), and the record `render_port` made."""
    batch, made = render.render_port(ruleset, port_id, None, CAPS)
    comments: dict[tuple[str, str], list[str]] = {}
    for command in batch.commands:
        body = command.get("add", {})
        if "chain" in body:
            comments.setdefault((body["chain"]["family"], body["chain"]["name"]), [])
        if "rule" in body:
            rule = body["rule"]
            refs = " ".join(_set_refs(rule["expr"]))
            line = f'{refs} comment "{rule["comment"]}"' if refs else rule["comment"]
            comments.setdefault((rule["family"], rule["chain"]), []).append(line)
    comments.update(edit or {})
    listing = readback.parse({fam: _listing_text([made], comments, fam)
                              for fam in (BRIDGE, INET)})
    return listing, made


def _proven(listing: readback.Listing, ruleset: Ruleset) -> PortRecord | None:
    port_id = readback.port_ids(listing, [ruleset.port.portdev])[ruleset.port.portdev]
    record = readback.port_record(listing, ruleset.port.portdev, port_id)
    return readback.proven_record(listing, record, ruleset_digest(ruleset), CAPS)


@pytest.fixture
def fresh_salt() -> Iterator[None]:
    render.renderer_salt.cache_clear()
    yield
    render.renderer_salt.cache_clear()


def test_an_unchanged_port_is_proven_with_the_record_a_render_makes() -> None:
    ruleset = _ruleset()
    listing, made = _kernel(ruleset)
    proven = _proven(listing, ruleset)
    assert proven is not None
    assert proven == made  # chains, hooks, port id, own sets
    assert proven.digests == made.digests
    assert proven.chain_sets == made.chain_sets and any(made.chain_sets.values())


def test_a_chain_edited_under_an_intact_stamp_is_not_proven() -> None:
    ruleset = _ruleset()
    mac = (BRIDGE, "vnet0/from/mac")
    _, rules_of = _comments(ruleset)
    for edit in (rules_of[mac][:-1], rules_of[mac][::-1], [*rules_of[mac], "someone else"], []):
        listing, _ = _kernel(ruleset, edit={mac: edit})
        assert _proven(listing, ruleset) is None, edit
    stamp = (BRIDGE, "vnet0/stamp")
    for edit in ([], [*rules_of[stamp], *rules_of[stamp]],
                 [rules_of[stamp][0].replace(" #d=", "x #d=")]):
        listing, _ = _kernel(ruleset, edit={stamp: edit})
        assert _proven(listing, ruleset) is None, edit


def test_a_distrusted_chain_is_not_proven() -> None:
    ruleset = _ruleset()
    for chain in ((INET, "vnet0/to"), (BRIDGE, "vnet0/stamp")):
        listing, _ = _kernel(ruleset)
        readback.distrust(listing, [chain])
        assert _proven(listing, ruleset) is None


def test_another_ruleset_or_port_id_is_not_proven() -> None:
    listing, _ = _kernel(_ruleset())
    assert _proven(listing, _ruleset(ip="10.0.0.2")) is None
    assert _proven(listing, _ruleset(limit=4)) is None
    ruleset = _ruleset()
    record = readback.port_record(listing, "vnet0", 8)
    assert readback.proven_record(listing, record, ruleset_digest(ruleset), CAPS) is None


def test_a_port_without_layer_3_rules_is_proven_under_any_port_id() -> None:
    # Its rules never name the id, and a start gives such a port whatever id
    # is free (the kernel holds none for it): the id is no part of its stamp.
    ruleset = clean_traffic("vnet0", "52:54:00:00:00:01", "10.0.0.1")
    listing, made = _kernel(ruleset)
    assert readback.port_ids(listing, ["vnet0"]) == {}
    for port_id in (1, 7, 300):
        record = readback.port_record(listing, "vnet0", port_id)
        proven = readback.proven_record(listing, record, ruleset_digest(ruleset), CAPS)
        assert proven is not None and proven.port_id == port_id
        assert proven.bridge_chains == made.bridge_chains


def test_a_renderer_salt_change_proves_nothing(
    monkeypatch: pytest.MonkeyPatch, fresh_salt: None
) -> None:
    ruleset = _ruleset()
    listing, _ = _kernel(ruleset)
    assert _proven(listing, ruleset) is not None
    monkeypatch.setattr(render, "RENDER_VERSION", render.RENDER_VERSION + 1)
    render.renderer_salt.cache_clear()
    assert _proven(listing, ruleset) is None
    assert _proven(listing, ruleset) is None  # the cached salt is the new one
    assert _proven(*_kernel(ruleset)[:1], ruleset) is not None  # rendered again: proven


def _comments(ruleset: Ruleset) -> tuple[PortRecord, dict[tuple[str, str], list[str]]]:
    batch, made = render.render_port(ruleset, 7, None, CAPS)
    out: dict[tuple[str, str], list[str]] = {}
    for command in batch.commands:
        rule = command.get("add", {}).get("rule")
        if rule is not None:
            out.setdefault((rule["family"], rule["chain"]), []).append(rule["comment"])
    return made, out


def test_the_ruleset_digest_covers_what_renders_and_ignores_set_order() -> None:
    base = _ruleset()
    assert ruleset_digest(base) == ruleset_digest(_ruleset())
    others = [_ruleset(ip="10.0.0.2"), _ruleset(limit=4),
              Ruleset(port=base.port, l2=base.l2, l3={Hook.FROM_VM: base.l3[Hook.TO_VM]}),
              Ruleset(port=base.port, l2=base.l2)]
    assert len({ruleset_digest(r) for r in [base, *others]}) == 1 + len(others)
    flags = l3_rule([Match(Field.IP_PROTO, 6), Match(Field.TCP_FLAGS, TcpFlags(
        frozenset({TcpFlag.SYN, TcpFlag.ACK, TcpFlag.RST}), frozenset({TcpFlag.SYN})))],
        Verdict.ACCEPT)
    one = with_l3(base, from_vm=(flags,))
    swapped = with_l3(base, from_vm=(l3_rule([Match(Field.IP_PROTO, 6), Match(
        Field.TCP_FLAGS, TcpFlags(frozenset({TcpFlag.SYN}), frozenset({TcpFlag.SYN})))],
        Verdict.ACCEPT),))
    assert ruleset_digest(one) != ruleset_digest(swapped)


SCRIPT = """
from nwfilter.ir_digest import ruleset_digest
from tests.unit.backends.test_nft_stamp import _ruleset
print(ruleset_digest(_ruleset()))
"""


def test_the_ruleset_digest_is_the_same_in_every_process() -> None:
    seen = set()
    for seed in ("1", "2", "3", "4"):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(REPO)}
        done = subprocess.run([sys.executable, "-c", SCRIPT], env=env, cwd=REPO,
                              capture_output=True, text=True, check=True)
        seen.add(done.stdout.strip())
    assert seen == {ruleset_digest(_ruleset())}
