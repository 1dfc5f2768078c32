"""libvirt 9.0's own canonical documents, recorded by
tools/record_libvirt_dumps.py: tests/golden/libvirt/dumps/NAME.in.xml is
what was defined, NAME.libvirt.xml what `virsh nwfilter-dumpxml` printed
(NAME.libvirt.err: libvirt's refusal).

* every document libvirt printed parses here and prints back unchanged;
* the input formats to exactly what libvirt printed, except where
  docs/filter-language.md lists a deliberate difference (`DIFFERENT`);
* what libvirt refused is refused here too."""

from __future__ import annotations

from pathlib import Path

import pytest

from nwfilter.conf import format_filter, parse_filter
from nwfilter.errors import NwfilterError

DUMPS = Path(__file__).resolve().parents[2] / "golden" / "libvirt" / "dumps"
INPUTS = sorted(DUMPS.glob("*.in.xml"))
PRINTED = sorted(DUMPS.glob("*.libvirt.xml"))
REFUSED = sorted(DUMPS.glob("*.libvirt.err"))

#: Inputs whose canonical form differs from libvirt's on purpose, and why.
DIFFERENT: dict[str, str] = {
    "negated-port": "libvirt gives dstportstart/srcportend/dstportend the match of"
    " srcportstart, dropping match='no' where srcportstart is absent or positive;"
    " we keep the negation as written",
}


def _stem(path: Path) -> str:
    return path.name.split(".")[0]


def test_corpus_present() -> None:
    assert len(INPUTS) >= 15
    assert {_stem(p) for p in PRINTED} | {_stem(p) for p in REFUSED} == {
        _stem(p) for p in INPUTS
    }


@pytest.mark.parametrize("path", PRINTED, ids=_stem)
def test_libvirt_output_is_a_fixed_point(path: Path) -> None:
    text = path.read_text()
    fdef = parse_filter(text, source=path.name)
    assert format_filter(fdef) == text


@pytest.mark.parametrize(
    "path",
    [p for p in INPUTS
     if _stem(p) not in DIFFERENT and p.with_name(_stem(p) + ".libvirt.xml").exists()],
    ids=_stem,
)
def test_input_formats_as_libvirt(path: Path) -> None:
    expected = path.with_name(_stem(path) + ".libvirt.xml")
    assert format_filter(parse_filter(path.read_bytes(), source=path.name)) == (
        expected.read_text()
    )


@pytest.mark.parametrize("stem", sorted(DIFFERENT))
def test_deliberate_differences_still_differ(stem: str) -> None:
    ours = format_filter(parse_filter(DUMPS.joinpath(stem + ".in.xml").read_bytes()))
    assert ours != DUMPS.joinpath(stem + ".libvirt.xml").read_text()


@pytest.mark.parametrize("path", REFUSED, ids=_stem)
def test_refused_by_both(path: Path) -> None:
    source = path.with_name(_stem(path) + ".in.xml")
    with pytest.raises(NwfilterError):
        parse_filter(source.read_bytes(), source=source.name)
