"""Golden pairs: tests/golden/conf/X.in.xml formats to X.out.xml; each
document under invalid/ is refused with the one-line error in its .err file.
The valid pairs were checked against libvirt 9.0's nwfilter-dumpxml (all but
compat.in.xml, which holds our deliberate differences)."""

from __future__ import annotations

from pathlib import Path

import pytest

from nwfilter.conf import format_filter, parse_filter
from nwfilter.errors import NwfilterError

GOLDEN = Path(__file__).resolve().parents[2] / "golden" / "conf"
VALID = sorted(GOLDEN.glob("*.in.xml"))
INVALID = sorted((GOLDEN / "invalid").glob("*.xml"))


def test_corpus_present() -> None:
    assert len(VALID) >= 10
    assert len(INVALID) >= 50


@pytest.mark.parametrize("path", VALID, ids=lambda p: p.name)
def test_valid_golden(path: Path) -> None:
    expected = path.with_name(path.name.replace(".in.xml", ".out.xml")).read_text()
    fdef = parse_filter(path.read_bytes(), source=path.name)
    out = format_filter(fdef)
    assert out == expected
    # the output is a fixed point, textually and as objects
    again = parse_filter(out)
    assert again == fdef
    assert format_filter(again) == out


@pytest.mark.parametrize("path", INVALID, ids=lambda p: p.name)
def test_invalid_golden(path: Path) -> None:
    expected = path.with_suffix(".err").read_text().strip()
    with pytest.raises(NwfilterError) as info:
        parse_filter(path.read_bytes(), source=path.name)
    assert f"{type(info.value).__name__}: {info.value}" == expected
    assert "\n" not in str(info.value)
