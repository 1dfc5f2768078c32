"""The lifecycle/filter-change race of tests/unit/test_rebuild_stress.py on
the real kernel: the same threads, with the nft backend in a throwaway
namespace; at the end every running domain's port must hold in the kernel
exactly what its current filters compile to."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from nwfilter.backends.nft import NftBackend
from nwfilter.conf.model import BindingDef
from nwfilter.ir import Changes, Ruleset
from nwfilter.netlab import NetLab
from tests.unit.domain.conftest import make_world
from tests.unit.test_rebuild_stress import race

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.slow]

# The port's numeric id (in its packet-mark rule and that rule's comment and
# digest, and in the port's stamp) depends on the order ports were added, so
# it is the one thing allowed to differ.
_MARK_ID = re.compile(r"0x[0-9a-f]{8}")
_ID_COMMENT = re.compile(r"port id \d+ #d=[0-9a-f]+")
_STAMP = re.compile(r"nwfilter stamp [0-9a-f]+\.[0-9a-f]+ #d=[0-9a-f]+")


def _normalized(text: str) -> str:
    text = _STAMP.sub("nwfilter stamp STAMP", text)
    return _ID_COMMENT.sub("port id ID", _MARK_ID.sub("0xID", text))


def test_race_on_the_kernel_leaves_exactly_the_compiled_rules(tmp_path: Path) -> None:
    with NetLab() as lab:
        stressed_ns, reference_ns = lab.add_ns("stress"), lab.add_ns("reference")
        world = make_world(tmp_path, NftBackend(netns=stressed_ns))
        reference = NftBackend(netns=reference_ns)
        reference.probe()
        checked: list[str] = []

        def kernel_rules_match(binding: BindingDef, want: Ruleset) -> None:
            reference.apply(Changes(set=(want,), replace_all=True))
            expected = _normalized(reference.read_back(binding.portdev))
            actual = _normalized(world.engine.backend.read_back(binding.portdev))
            assert expected and actual == expected, binding.portdev
            checked.append(binding.portdev)

        try:
            race(world, 6.0, kernel_rules_match)
        finally:
            world.engine.close()
        assert checked, "no domain was running at the end"
        ruleset = lab.run(stressed_ns, ["nft", "list", "ruleset"]).stdout
        assert "nwfilter" not in ruleset  # the last domain stopped took our tables
