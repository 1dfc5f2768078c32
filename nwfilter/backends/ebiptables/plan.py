"""What to write: the difference between two `Tables` as restore-file text,
and `*-save` output read back into `Tables`.  Pure: no kernel access.

One restore file per table is one kernel transaction (`ebtables-restore
--noflush`, `iptables-restore --noflush`: the nf_tables variants commit the
batch at once; the legacy ones replace the table blob at once), so a port's
chains are rewritten without a gap: a chain line (`:NAME ...`) creates the
chain or flushes it, its rules follow, links are added and removed, and the
chains nobody needs any more are flushed and deleted last, all in the
same commit.  Other programs' chains and rules are never named.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .render import BASE_JUMPS, EB, IP4, IP6, OWNER_CHAIN, SHARED_CHAINS, TABLES, Tables

_EB_CHAIN = re.compile(r"(libvirt-[IO]-\S+|[IO]-\S+-\S+)")
_IP_CHAIN = re.compile(r"(FI|FO|HI)-\S+")
_EB_LINK = {"PREROUTING": re.compile(r"-i (\S+) -j libvirt-I-\1"),
            "POSTROUTING": re.compile(r"-o (\S+) -j libvirt-O-\1")}
_IP_LINK = re.compile(r"-m physdev --physdev-(in|out) \S+( --physdev-is-bridged)? "
                      r"(-g (FI|FO|HI)-\S+|-j ACCEPT)")
_OWNER_RULE = re.compile(r'-m comment --comment "?(.*?)"?$')


class Saved:
    """One table as `*-save` printed it: every chain (ours and others') with
    its rules in order."""

    def __init__(self, text: str) -> None:
        self.chains: dict[str, list[str]] = {}
        for line in text.splitlines():
            if line.startswith(":"):
                self.chains.setdefault(line[1:].split(" ", 1)[0], [])
            elif line.startswith("-A "):
                name, _, spec = line[3:].partition(" ")
                self.chains.setdefault(name, []).append(spec)

    def owner_label(self) -> str | None:
        for spec in self.chains.get(OWNER_CHAIN, ()):
            m = _OWNER_RULE.search(spec)
            if m:
                return m.group(1)
        return None


_COUNTED = re.compile(r"\[(\d+):(\d+)\] -A (\S+) ?(.*)\Z")


def counted(text: str) -> dict[str, list[tuple[str, int, int]]]:
    """Per chain, its rules as `*-save -c` prints them: (spec, packets, bytes)."""
    out: dict[str, list[tuple[str, int, int]]] = {}
    for line in text.splitlines():
        if line.startswith(":"):
            out.setdefault(line[1:].split(" ", 1)[0], [])
            continue
        found = _COUNTED.match(line)
        if found is not None:
            out.setdefault(found.group(3), []).append(
                (found.group(4), int(found.group(1)), int(found.group(2))))
    return out


def ours(table: str, saved: Saved) -> Tables:
    """The chains and links of ours in a saved table (by libvirt's names)."""
    out = Tables()
    for name, rules in saved.chains.items():
        if table == EB:
            if _EB_CHAIN.fullmatch(name) and name not in ("PREROUTING", "POSTROUTING", "OUTPUT"):
                out.chains[table][name] = tuple(rules)
            for spec in rules:
                pattern = _EB_LINK.get(name)
                if pattern is not None and pattern.fullmatch(spec):
                    out.links[table].append((name, spec))
        else:
            if _IP_CHAIN.fullmatch(name):
                out.chains[table][name] = tuple(rules)
            if name in SHARED_CHAINS:
                out.links[table].extend((name, s) for s in rules if _IP_LINK.fullmatch(s))
    return out


def shared_ready(saved: Saved) -> bool:
    """Whether the shared layer-3 chains and the base jumps to them are all there."""
    if any(name not in saved.chains for name in SHARED_CHAINS):
        return False
    return all(spec in saved.chains.get(base, ()) for base, spec in BASE_JUMPS)


def shared_lines(saved: Saved | None) -> list[str]:
    """Create the shared chains and the base jumps that are missing (all of
    them when `saved` is None), jumps first in INPUT/FORWARD as libvirt has them."""
    chains = {} if saved is None else saved.chains
    lines = [f":{name} - [0:0]" for name in SHARED_CHAINS if name not in chains]
    for base, spec in reversed(BASE_JUMPS):
        if spec not in chains.get(base, ()):
            lines.append(f"-I {base} 1 {spec}")
    return lines


def diff(table: str, held: Tables, want: Tables) -> list[str]:
    """Restore lines turning what `held` has of ours in `table` into `want`
    (both may be a subset: the chains and links of some ports)."""
    old, new = held.chains[table], want.chains[table]
    decl = "ACCEPT" if table == EB else "- [0:0]"
    heads: list[str] = []
    body: list[str] = []
    for name, rules in new.items():
        if old.get(name) != rules or name not in old:
            heads.append(f":{name} {decl}")
            body.extend(f"-A {name} {spec}" for spec in rules)
    old_links, new_links = held.links[table], want.links[table]
    new_set, old_set = set(new_links), set(old_links)
    drop = [f"-D {c} {s}" for c, s in old_links if (c, s) not in new_set]
    add = [f"-A {c} {s}" for c, s in new_links if (c, s) not in old_set]
    gone = [name for name in old if name not in new]
    tail = [f"-F {name}" for name in gone] + [f"-X {name}" for name in gone]
    return heads + drop + body + add + tail


def restore_text(table: str, lines: Iterable[str]) -> str:
    if table == EB:
        return "*nat\n" + "".join(line + "\n" for line in lines)
    return "*filter\n" + "".join(line + "\n" for line in lines) + "COMMIT\n"


def l3_tables() -> tuple[str, str]:
    return (IP4, IP6)


__all__ = ["TABLES", "Saved", "counted", "diff", "l3_tables", "ours", "restore_text",
           "shared_lines", "shared_ready"]
