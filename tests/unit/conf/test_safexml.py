"""Hostile XML fails fast with XMLError."""

from __future__ import annotations

import time

import pytest

from nwfilter.conf import parse_binding, parse_domain, parse_filter
from nwfilter.conf.safexml import Limits, parse_xml
from nwfilter.errors import XMLError

BILLION_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE lolz [<!ENTITY lol "lol">'
    + "".join(
        f'<!ENTITY lol{i} "{("&lol" + (str(i - 1) if i > 1 else "") + ";") * 10}">'
        for i in range(1, 10)
    )
    + ']><filter name="&lol9;"/>'
)
EXTERNAL = (
    '<?xml version="1.0"?><!DOCTYPE f [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
    '<filter name="&x;"/>'
)
NETWORK_DTD = '<!DOCTYPE filter SYSTEM "http://127.0.0.1:9/evil.dtd"><filter name="f"/>'
PARAM_ENTITY = '<!DOCTYPE f [<!ENTITY % p SYSTEM "http://127.0.0.1:9/x">%p;]><filter name="f"/>'


@pytest.mark.parametrize(
    "doc",
    [
        BILLION_LAUGHS,
        EXTERNAL,
        NETWORK_DTD,
        PARAM_ENTITY,
        "<filter name='&undefined;'/>",
        "<a>" * 100 + "</a>" * 100,
        "<a>" * 100_000 + "</a>" * 100_000,
        "<filter name='" + "x" * 5000 + "'/>",
        "<filter " + " ".join(f"a{i}='1'" for i in range(100)) + "/>",
        "<filter name='f'>" + "<rule/>" * 60_000 + "</filter>",
        "<filter name='f'>" + " " * (1024 * 1024) + "</filter>",
        "<filter name='f'><uuid>" + "0" * 5000 + "</uuid></filter>",
    ],
    ids=[
        "billion-laughs",
        "external-entity",
        "network-dtd",
        "parameter-entity",
        "undefined-entity",
        "deep",
        "very-deep",
        "huge-attribute",
        "many-attributes",
        "many-elements",
        "over-size",
        "huge-text",
    ],
)
def test_hostile_documents_fail_fast(doc: str) -> None:
    start = time.monotonic()
    for parse in (parse_filter, parse_binding, parse_domain):
        with pytest.raises(XMLError):
            parse(doc)
    assert time.monotonic() - start < 2.0


def test_limits_are_configurable() -> None:
    with pytest.raises(XMLError, match="deeper"):
        parse_xml("<a><b><c/></b></a>", limits=Limits(max_depth=2))
    assert parse_xml("<a><b/></a>", limits=Limits(max_depth=2)).tag == "a"


def test_source_is_named() -> None:
    with pytest.raises(XMLError, match=r"^/etc/x\.xml: "):
        parse_xml("<a>", source="/etc/x.xml")


def test_wrong_input_type() -> None:
    with pytest.raises(XMLError):
        parse_xml(123)  # type: ignore[arg-type]
