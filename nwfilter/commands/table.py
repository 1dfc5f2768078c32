"""virsh's table layout, shared by the list commands."""

from __future__ import annotations

from collections.abc import Sequence

from nwfilter.printable import printable


def format_table(
    headers: Sequence[str],
    rows: Sequence[Sequence[str]],
    min_widths: Sequence[int] = (),
) -> str:
    """A leading space, columns three spaces apart, a dashed rule as wide as
    the table; a column is at least as wide as its `min_widths` entry.
    Control characters in cells are escaped (`nwfilter.printable`)."""
    rows = [[printable(c) for c in row] for row in rows]
    widths = [len(h) for h in headers]
    for i, minimum in enumerate(min_widths):
        widths[i] = max(widths[i], minimum)
    for row in rows:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]

    def line(cells: Sequence[str]) -> str:
        return (" " + "   ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))).rstrip()

    total = 1 + sum(widths) + 3 * (len(widths) - 1) + 2
    out = [line(headers), "-" * total]
    out.extend(line(r) for r in rows)
    return "\n".join(out) + "\n"
