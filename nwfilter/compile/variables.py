"""Variable expansion: which value each `$VAR` access takes in each rule instance.

This module owns libvirt's combination semantics (nwfilter_params.c,
`virNWFilterVarCombIter`):

* `$X` is the same as `$X[@0]`.  All accesses sharing an iterator id advance
  together ("in parallel"), so their lists must be equally long.
* Accesses with different iterator ids advance independently: the instances
  are the cross product of the iterators.  Iterator 0 changes fastest, then
  the others in the order the rule first uses them.
* `$X[N]` picks element N (0-based) and never iterates; a missing element is
  an unresolved variable.
* Within one iterator, a position whose tuple of values already occurred at
  an earlier position is skipped, so duplicate list entries give one rule.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from nwfilter.conf.model import VarRef
from nwfilter.errors import UndefinedVariableError, UnresolvedError, ValidationError

Lookup = Callable[[str], Sequence[str] | None]


@dataclass
class _Group:
    key: tuple[str, int]  # ('iter', id) or ('elem', running number)
    refs: list[VarRef] = field(default_factory=list)
    positions: list[int] = field(default_factory=lambda: [0])


def combinations(
    accesses: Sequence[VarRef], lookup: Lookup, where: str
) -> list[dict[VarRef, str]]:
    """Every assignment of values to `accesses`, in libvirt's order.

    `lookup(name)` returns the values of a variable or None when it is not
    defined; `where` describes the rule for error messages.
    """
    if not accesses:
        return [{}]
    single = _single_values(accesses, lookup)
    if single is not None:
        return [single]
    groups: list[_Group] = [_Group(("iter", 0))]
    by_key: dict[tuple[str, int], _Group] = {groups[0].key: groups[0]}
    values: dict[str, Sequence[str]] = {}
    for n, ref in enumerate(accesses):
        found = values.get(ref.name)
        if found is None:
            found = lookup(ref.name)
            if found is None or not found:
                raise UndefinedVariableError(
                    f"variable '{ref.name}' is not defined for {where}", variable=ref.name
                )
            values[ref.name] = found
        if ref.index is not None:
            if ref.index >= len(found):
                raise UnresolvedError(
                    f"variable '{ref}' has no element {ref.index} (it has {len(found)}"
                    f" value{'s' if len(found) != 1 else ''}) for {where}"
                )
            group = _Group(("elem", n), [ref], [ref.index])
            groups.append(group)
            continue
        key = ("iter", ref.iterator or 0)
        group_or_none = by_key.get(key)
        if group_or_none is None:
            group_or_none = _Group(key)
            by_key[key] = group_or_none
            groups.append(group_or_none)
        group = group_or_none
        if group.refs:
            first = group.refs[0]
            if len(values[first.name]) != len(found):
                raise ValidationError(
                    f"variables '{first}' ({len(values[first.name])} values) and '{ref}'"
                    f" ({len(found)} values) iterate together (iterator @{key[1]}) but"
                    f" have different numbers of values, in {where}"
                )
        else:
            group.positions = _unique_positions(len(found))
        group.refs.append(ref)
    for group in groups:
        if group.key[0] == "iter" and len(group.refs) > 0:
            group.positions = _dedupe(group, values)
    result: list[dict[VarRef, str]] = []
    _product(groups, len(groups) - 1, {}, values, result)
    return result


def _single_values(accesses: Sequence[VarRef], lookup: Lookup) -> dict[VarRef, str] | None:
    """The one assignment when every variable has exactly one value, else None."""
    out: dict[VarRef, str] = {}
    for ref in accesses:
        found = lookup(ref.name)
        if found is None or len(found) != 1 or (ref.index is not None and ref.index != 0):
            return None
        out[ref] = found[0]
    return out


def _unique_positions(count: int) -> list[int]:
    return list(range(count))


def _dedupe(group: _Group, values: dict[str, Sequence[str]]) -> list[int]:
    seen: set[tuple[str, ...]] = set()
    keep: list[int] = []
    for pos in group.positions:
        key = tuple(values[ref.name][pos] for ref in group.refs)
        if key in seen:
            continue
        seen.add(key)
        keep.append(pos)
    return keep


def _product(
    groups: list[_Group],
    level: int,
    current: dict[VarRef, str],
    values: dict[str, Sequence[str]],
    out: list[dict[VarRef, str]],
) -> None:
    # The last group is the outermost loop, group 0 the innermost (fastest).
    if level < 0:
        out.append(dict(current))
        return
    group = groups[level]
    for pos in group.positions:
        for ref in group.refs:
            current[ref] = values[ref.name][pos]
        _product(groups, level - 1, current, values, out)
