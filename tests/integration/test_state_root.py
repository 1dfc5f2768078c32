"""A state root that another local user can touch is refused.

The other user is the real account `nobody`: it pre-creates roots,
directories and symbolic links the way an attacker on the host could (in
`/tmp`, which anyone may write), and the engine, running as root, must
refuse with the offending path named and write nothing through a link.
"""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from nwfilter.backends.memory import MemoryBackend
from nwfilter.conf.model import BindingDef, FilterRef, Parameter
from nwfilter.domain.manager import DomainManager
from nwfilter.engine import Engine
from nwfilter.errors import StorageError

pytestmark = pytest.mark.root

REPO = Path(__file__).resolve().parents[2]
STOCK = REPO / "filters"
OTHER = "nobody"


def other_uid() -> int:
    return pwd.getpwnam(OTHER).pw_uid


def as_other(script: str) -> str:
    """Run a shell script as the other user; return its output."""
    proc = subprocess.run(
        ["runuser", "-u", OTHER, "--", "/bin/sh", "-euc", script],
        check=True, capture_output=True, text=True, cwd="/",
    )
    return proc.stdout.strip()


@pytest.fixture
def scratch() -> Iterator[list[Path]]:
    """Paths under /tmp to remove when the test ends."""
    paths: list[Path] = []
    yield paths
    for path in paths:
        if path.is_symlink() or path.is_file():
            path.unlink()
        elif path.exists():
            shutil.rmtree(path)


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    path = tmp_path / "victim"  # root's, out of the other user's reach
    path.write_text("precious\n")
    return path


def binding() -> BindingDef:
    return BindingDef("vm1", uuid.UUID(int=1), "vnet0", "52:54:00:00:00:01",
                      FilterRef("clean-traffic", (Parameter("IP", "10.0.0.1"),)))


def test_a_root_precreated_by_another_user_is_refused(
    scratch: list[Path], victim: Path
) -> None:
    uid = other_uid()
    root = Path(as_other("mktemp -d /tmp/nwf-attack.XXXXXX"))
    drop = Path(as_other("mktemp -d /tmp/nwf-drop.XXXXXX"))
    scratch.extend([root, drop])
    as_other(f"chmod 755 {root}; chmod 777 {drop}; mkdir -m 777 {root}/run; "
             f"ln -s {victim} {root}/run/engine.lock; ln -s {drop} {root}/run/bindings")
    engine = Engine(root, MemoryBackend(), stock_dir=STOCK)
    with pytest.raises(StorageError) as info:
        engine.start()
    assert info.value.message == (
        f"state root '{root}': directory '{root}' is owned by uid {uid}, not by uid 0"
    )
    # The command line says the same and exits with the storage status.
    proc = subprocess.run(
        [sys.executable, "-m", "nwfilter.cli", "--root", str(root), "--backend", "memory",
         "nwfilter-binding-list"],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)},
    )
    assert proc.returncode == 7
    assert f"directory '{root}' is owned by uid {uid}" in proc.stderr
    assert victim.read_text() == "precious\n"
    assert os.listdir(drop) == []
    assert sorted(os.listdir(root / "run")) == ["bindings", "engine.lock"]


def test_a_directory_inside_a_root_owned_by_another_user_is_refused(
    tmp_path: Path, scratch: list[Path]
) -> None:
    uid = other_uid()
    for subdir in ("run", "run/bindings", "nwfilter", "domains", "run/domains",
                   "run/hypervisor/test"):
        root = Path(tempfile.mkdtemp(dir="/tmp", prefix="nwf-root."))
        scratch.append(root)
        engine = Engine(root, MemoryBackend(), stock_dir=STOCK)
        engine.start()
        manager = DomainManager.for_engine(engine)
        manager.start()
        manager.driver("test")
        engine.close()
        # e.g. left from a time the root was writable by anyone
        os.chown(root / subdir, uid, -1)
        engine = Engine(root, MemoryBackend(), stock_dir=STOCK)
        with pytest.raises(StorageError) as info:
            engine.start()
            manager = DomainManager.for_engine(engine)
            manager.start()
            manager.driver("test")
        engine.close()
        assert f"directory '{root}/{subdir}' is owned by uid {uid}, not by uid 0" in (
            info.value.message), subdir
        if subdir == "run":
            assert info.value.message.startswith(f"state root '{root}': "), info.value.message


def test_a_parent_owned_by_another_user_is_refused_before_anything_is_made(
    scratch: list[Path]
) -> None:
    uid = other_uid()
    parent = Path(as_other("mktemp -d /tmp/nwf-parent.XXXXXX"))
    scratch.append(parent)
    as_other(f"chmod 755 {parent}")
    engine = Engine(parent / "st", MemoryBackend(), stock_dir=STOCK)
    with pytest.raises(StorageError) as info:
        engine.start()
    assert info.value.message == (
        f"state root '{parent}/st': directory '{parent}' is owned by uid {uid}, not by uid 0"
    )
    assert not (parent / "st").exists()


def test_a_link_owned_by_another_user_is_not_followed(
    tmp_path: Path, scratch: list[Path]
) -> None:
    uid = other_uid()
    good = Path(tempfile.mkdtemp(dir="/tmp", prefix="nwf-good."))
    name = Path(tempfile.mktemp(dir="/tmp", prefix="nwf-link."))
    scratch.extend([good, name])
    as_other(f"ln -s {good} {name}")
    engine = Engine(name, MemoryBackend(), stock_dir=STOCK)
    with pytest.raises(StorageError) as info:
        engine.start()
    assert info.value.message == (
        f"state root '{name}': symbolic link '{name}' is owned by uid {uid}, not by uid 0"
    )
    assert os.listdir(good) == []


def test_a_root_made_by_root_under_tmp_is_fine(scratch: list[Path]) -> None:
    root = Path(tempfile.mkdtemp(dir="/tmp", prefix="nwf-root."))
    link = Path(tempfile.mktemp(dir="/tmp", prefix="nwf-link."))
    scratch.extend([root, link])
    link.symlink_to(root)  # root's own link is followed
    engine = Engine(link / "st", MemoryBackend(), stock_dir=STOCK)
    engine.start()
    engine.create_bindings([binding()])
    engine.close()
    assert (root / "st" / "run" / "bindings" / "vnet0.xml").is_file()
    assert (root / "st").stat().st_mode & 0o777 == 0o700
    # and the other user can neither see nor change it
    with pytest.raises(subprocess.CalledProcessError):
        as_other(f"ls {root}/st")
