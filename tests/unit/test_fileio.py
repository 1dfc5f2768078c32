"""Checked directories and link-free file access (nwfilter.fileio), and what
the engine does with them at start: refusals, leftovers of crashed writes."""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from nwfilter.backends.memory import MemoryBackend
from nwfilter.domain.manager import DomainManager
from nwfilter.engine import Engine
from nwfilter.errors import ConflictError, JobTimeoutError, StorageError
from nwfilter.fileio import SafeDir

REPO = Path(__file__).resolve().parents[2]
STOCK = REPO / "filters"


@pytest.fixture
def victim(tmp_path: Path) -> Path:
    """A file outside every state root that nothing may write through a link."""
    path = tmp_path / "victim"
    path.write_text("precious\n")
    return path


# ------------------------------------------------------------------ SafeDir


def test_write_replaces_a_planted_link_and_leaves_its_target(tmp_path: Path, victim: Path) -> None:
    with SafeDir.open(tmp_path / "d") as d:
        (tmp_path / "d" / "f.xml").symlink_to(victim)
        d.write("f.xml", "new")
        assert victim.read_text() == "precious\n"
        assert not (tmp_path / "d" / "f.xml").is_symlink()
        assert d.read("f.xml") == b"new"
        assert os.listdir(tmp_path / "d") == ["f.xml"]  # no temporary left


def test_links_are_never_read_nor_opened(tmp_path: Path, victim: Path) -> None:
    with SafeDir.open(tmp_path / "d") as d:
        (tmp_path / "d" / "f.xml").symlink_to(victim)
        (tmp_path / "d" / "engine.lock").symlink_to(victim)
        with pytest.raises(StorageError, match=r"f.xml': it is a symbolic link"):
            d.read("f.xml")
        with pytest.raises(StorageError, match=r"engine.lock': it is a symbolic link"):
            d.open_file("engine.lock", os.O_RDWR | os.O_CREAT)
        assert d.names(".xml") == []  # a link is not one of the files
        assert d.remove("f.xml")  # removes the link, not the target
    assert victim.read_text() == "precious\n"


def test_a_link_in_place_of_a_subdirectory_is_refused(tmp_path: Path) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (tmp_path / "root" / "run").mkdir(parents=True)
    (tmp_path / "root" / "run" / "bindings").symlink_to(elsewhere)
    with (
        SafeDir.open(tmp_path / "root") as root,
        pytest.raises(StorageError, match=r"'.*/root/run/bindings' is a symbolic link"),
    ):
        root.subdir("run/bindings")
    assert list(elsewhere.iterdir()) == []


@pytest.mark.parametrize(("mode", "who"), [(0o770, "group"), (0o707, "others"),
                                           (0o777, "group and others")])
def test_a_directory_others_can_write_is_refused(tmp_path: Path, mode: int, who: str) -> None:
    (tmp_path / "root" / "run").mkdir(parents=True)
    os.chmod(tmp_path / "root" / "run", mode)
    with (
        SafeDir.open(tmp_path / "root") as root,
        pytest.raises(StorageError, match=rf"directory '.*/root/run' is writable by {who}"),
    ):
        root.subdir("run")
    # The same rule for the directory opened by path, and for one on its way
    # (no sticky bit): another user could rename it away.
    with pytest.raises(StorageError, match=rf"directory '.*/run' is writable by {who}"):
        SafeDir.open(tmp_path / "root" / "run")
    with pytest.raises(StorageError, match=rf"'.*/run' is writable by {who} .* no sticky"):
        SafeDir.open(tmp_path / "root" / "run" / "deeper")
    assert not (tmp_path / "root" / "run" / "deeper").exists()


def test_a_sticky_directory_on_the_way_is_fine(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # like /tmp
    with SafeDir.open(shared / "st") as d:
        assert d.path == shared / "st"
    assert (shared / "st").stat().st_mode & 0o777 == 0o700


def test_links_on_the_way_owned_by_us_are_followed(tmp_path: Path) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to("real")
    with SafeDir.open(tmp_path / "link" / "st") as d:
        assert d.path == tmp_path / "real" / "st"
        d.write("a", "x")
    assert (tmp_path / "real" / "st" / "a").read_text() == "x"


def test_a_file_on_the_way_names_it(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    with pytest.raises(StorageError, match=r"root '.*/file/st': '.*/file' is not a directory"):
        SafeDir.open(tmp_path / "file" / "st", what="state root")


def test_remove_temporaries_removes_only_them_and_logs(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with SafeDir.open(tmp_path / "d") as d:
        for name in (".a.xml.abcd1234.tmp", ".vnet0.xml.k2_9zq0x.tmp", ".stock-seeded",
                     "a.xml", ".x.tmp"):
            (tmp_path / "d" / name).write_text("")
        with caplog.at_level(logging.INFO, logger="nwfilter.fileio"):
            assert d.remove_temporaries() == []
    assert sorted(os.listdir(tmp_path / "d")) == [".stock-seeded", ".x.tmp", "a.xml"]
    infos = [r.getMessage() for r in caplog.records if r.levelno == logging.INFO]
    assert sum("left by an unfinished write" in m for m in infos) == 2


# ------------------------------------------------------------- the engine


def test_engine_refuses_a_root_others_can_write_and_writes_nothing(tmp_path: Path) -> None:
    root = tmp_path / "st"
    root.mkdir()
    os.chmod(root, 0o777)
    engine = Engine(root, MemoryBackend(), stock_dir=STOCK)
    with pytest.raises(StorageError) as info:
        engine.start()
    assert info.value.message == (
        f"state root '{root}': directory '{root}' is writable by group and others (mode 0777)"
    )
    assert info.value.exit_status == 7
    assert list(root.iterdir()) == []


def test_engine_refuses_a_linked_lock_file(tmp_path: Path, victim: Path) -> None:
    (tmp_path / "st" / "run").mkdir(parents=True)
    (tmp_path / "st" / "run" / "engine.lock").symlink_to(victim)
    engine = Engine(tmp_path / "st", MemoryBackend(), stock_dir=STOCK)
    with pytest.raises(StorageError, match=r"engine.lock': it is a symbolic link"):
        engine.start()
    assert victim.read_text() == "precious\n"


def test_lock_wait_times_out_with_exit_8_and_a_daemon_is_a_conflict(tmp_path: Path) -> None:
    first = Engine(tmp_path, MemoryBackend(), stock_dir=STOCK, owner="nwfilter")
    first.start()
    second = Engine(tmp_path, MemoryBackend(), stock_dir=STOCK, lock_timeout=0.2)
    with pytest.raises(JobTimeoutError, match=r"waiting for state root .* in use by nwfilter \("
                       ) as info:
        second.start()
    assert info.value.exit_status == 8
    first.close()
    daemon = Engine(tmp_path, MemoryBackend(), stock_dir=STOCK, owner="nwfilterd")
    daemon.start()
    with pytest.raises(ConflictError, match=r"in use by nwfilterd \(pid \d+\)") as conflict:
        second.start()
    assert conflict.value.exit_status == 4
    daemon.close()


# A child that runs the real engine and domain manager and is killed half-way
# through one write: `os.rename` (the step that would finish the write) is
# made to announce itself and wait for the kill.
CRASH_CHILD = textwrap.dedent(
    """
    import os, sys, time, uuid
    from pathlib import Path
    from nwfilter.backends.memory import MemoryBackend
    from nwfilter.conf.model import BindingDef, FilterRef, Parameter
    from nwfilter.domain.manager import DomainManager
    from nwfilter.engine import Engine

    root, where = Path(sys.argv[1]), sys.argv[2]
    engine = Engine(root, MemoryBackend(), stock_dir=Path(sys.argv[3]))
    engine.start()
    manager = DomainManager.for_engine(engine)
    manager.start()

    def hang(*args, **kwargs):
        print("writing", flush=True)
        time.sleep(3600)

    os.rename = hang
    if where == "bindings":
        ref = FilterRef("clean-traffic", (Parameter("IP", "10.0.0.1"),))
        engine.create_bindings([BindingDef("vm", uuid.UUID(int=1), "vnet0", "52:54:00:00:00:01",
                                           ref)])
    elif where == "filter":
        engine.define_filter("<filter name='f' chain='root'><rule action='drop' "
                             "direction='in'><all/></rule></filter>")
    elif where == "domain":
        from nwfilter.conf import parse_domain
        manager.define(parse_domain("<domain type='test'><name>vm1</name></domain>"))
    """
)


@pytest.mark.parametrize(("where", "subdir"), [
    ("bindings", "run/bindings"), ("filter", "nwfilter"), ("domain", "domains"),
])
def test_start_removes_what_a_killed_write_left(
    tmp_path: Path, where: str, subdir: str, caplog: pytest.LogCaptureFixture
) -> None:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    child = subprocess.Popen(
        [sys.executable, "-c", CRASH_CHILD, str(tmp_path), where, str(STOCK)],
        stdout=subprocess.PIPE, env=env,
    )
    assert child.stdout is not None
    try:
        assert child.stdout.readline().strip() == b"writing"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
        child.stdout.close()
    debris = [n for n in os.listdir(tmp_path / subdir) if n.endswith(".tmp")]
    assert len(debris) == 1
    # Leftovers of the other directories the engine keeps, as a crash elsewhere
    # would leave them.
    others = ("run", "run/domains", "run/hypervisor/test", "nwfilter", "run/bindings", "domains")
    for other in others:
        (tmp_path / other).mkdir(mode=0o700, parents=True, exist_ok=True)
        (tmp_path / other / ".x.xml.0a1b2c3d.tmp").write_text("<half")

    with caplog.at_level(logging.INFO, logger="nwfilter.fileio"):
        engine = Engine(tmp_path, MemoryBackend(), stock_dir=STOCK)
        assert engine.start() == []
        manager = DomainManager.for_engine(engine)
        manager.start()
        manager.driver("test")  # its directory is checked and cleaned when it loads
    engine.close()
    for other in others:
        assert [n for n in os.listdir(tmp_path / other) if n.endswith(".tmp")] == [], other
    removed = [r.getMessage() for r in caplog.records
               if r.levelno == logging.INFO and "left by an unfinished write" in r.getMessage()]
    assert any(debris[0] in m for m in removed)
    assert len(removed) >= len(others)
    # The write that was killed never happened: the old state stands.
    assert engine.list_bindings() == []
    assert "f" not in engine.pool
