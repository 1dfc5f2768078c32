"""`nwfilter.conf` loads its public names at their first use: importing a
light module of the package (the size limit the command line reads with)
loads no XML parser, and every public name is still found on the package."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

import nwfilter
import nwfilter.conf as conf

TREE = Path(nwfilter.__file__).resolve().parent.parent


def test_the_size_limit_loads_no_parser(tmp_path: Path) -> None:
    code = (
        "import sys, nwfilter.conf.limits\n"
        "print(sorted(m for m in sys.modules if m.startswith(('lxml', 'nwfilter.conf.'))))"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": str(TREE)},
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=True,
    )
    assert proc.stdout.strip() == "['nwfilter.conf.limits']"


@pytest.mark.parametrize("name", conf.__all__)
def test_every_public_name_is_its_home_modules(name: str) -> None:
    home = importlib.import_module(f"nwfilter.conf.{conf._HOMES[name]}")
    assert getattr(conf, name) is getattr(home, name)


def test_the_public_names_are_the_lazy_ones() -> None:
    assert sorted(conf.__all__) == sorted(conf._HOMES)
    assert set(conf.__all__) <= set(dir(conf))
    with pytest.raises(AttributeError, match="no attribute 'nosuch'"):
        conf.nosuch  # noqa: B018
