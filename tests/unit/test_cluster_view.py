"""What a host accepts from the cluster's pool (no etcd needed), and the
cluster options."""

from __future__ import annotations

import pytest

from nwfilter.cluster.config import ClusterConfig, parse_endpoints
from nwfilter.cluster.view import PoolView
from nwfilter.conf import parse_filter
from nwfilter.errors import ConflictError, LoopError, NwfilterError, ValidationError

A = "6f0e5a52-1c11-4c6e-9f3d-00000000000a"
B = "6f0e5a52-1c11-4c6e-9f3d-00000000000b"


def doc(name: str, uuid: str, refs: tuple[str, ...] = ()) -> bytes:
    inner = "".join(f"<filterref filter='{r}'/>" for r in refs)
    return f"<filter name='{name}'><uuid>{uuid}</uuid>{inner}</filter>".encode()


def test_a_good_document_is_taken_in_canonical_form() -> None:
    view = PoolView({})
    view.apply_put("a", doc("a", A), "rev 1")
    change = view.changes["a"]
    assert change is not None and change[0] == parse_filter(change[1])


@pytest.mark.parametrize(("name", "data", "error"), [
    ("a", b"<filter name='a'><rule", NwfilterError),
    ("b", doc("a", A), ValidationError),  # the key names another filter
    ("../x", doc("../x", A), NwfilterError),
    ("b", doc("b", A), ConflictError),  # A is filter a's UUID
    ("b", doc("b", B, ("b",)), LoopError),
    ("b", doc("b", B, ("a",)), LoopError),  # a -> b already
])
def test_a_bad_document_is_refused_and_changes_nothing(
    name: str, data: bytes, error: type[Exception]
) -> None:
    view = PoolView({"a": parse_filter(doc("a", A, ("b",)))})
    with pytest.raises(error):
        view.apply_put(name, data, "rev 2")
    assert view.changes == {} and view.names() == ["a"]


def test_a_delete_frees_the_name_and_the_loop() -> None:
    view = PoolView({"a": parse_filter(doc("a", A, ("b",)))})
    view.delete("a")
    view.apply_put("b", doc("b", B, ("a",)), "rev 3")
    assert view.changes.keys() == {"a", "b"} and view.changes["a"] is None


def test_cluster_options_are_checked() -> None:
    assert [e.url() for e in parse_endpoints("http://127.0.0.1:2379, https://[::1]:2380")] == [
        "http://127.0.0.1:2379", "https://[::1]:2380"]
    for bad in ("", "ftp://h:1", "http://h", "http://h:1/x", "http://u@h:1"):
        with pytest.raises(ValidationError):
            parse_endpoints(bad)
    endpoints = parse_endpoints("http://127.0.0.1:2379")
    for kwargs in ({"host": "a b"}, {"prefix": "nwfilter"}, {"prefix": "/a//b/"}, {"ttl": 1}):
        with pytest.raises(ValidationError):
            ClusterConfig(endpoints, **kwargs)  # type: ignore[arg-type]
