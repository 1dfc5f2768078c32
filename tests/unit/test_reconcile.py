"""Engine start reconciles (memory backend, no root): an unchanged state
makes no transaction, only what differs is written, and the backend is the
one place that knows what is applied."""

from __future__ import annotations

from pathlib import Path

from nwfilter.backends.memory import MemoryBackend, MemoryHost
from nwfilter.engine import Engine
from nwfilter.ir import drop_all
from nwfilter.render_text import render_text
from tests.unit.test_engine import SPOOF, STOCK, make


def started(root: Path, host: MemoryHost) -> tuple[Engine, MemoryBackend]:
    backend = MemoryBackend(host=host)
    engine = Engine(root, backend, stock_dir=STOCK)
    engine.start()
    return engine, backend


def test_restart_with_nothing_changed_makes_no_transaction(tmp_path: Path) -> None:
    host = MemoryHost()
    first, _ = started(tmp_path, host)
    first.create_bindings([make("vnet0"), make("vnet1")])
    held = dict(host.rulesets)
    first.close()
    second, backend = started(tmp_path, host)
    assert backend.transactions == 0
    assert host.rulesets == held
    # what is applied is read from the backend, as the kernel holds it
    assert backend.recorded() == held
    assert render_text(second.ruleset("vnet0")) == render_text(held["vnet0"])
    second.close()


def test_restart_writes_only_what_differs(tmp_path: Path) -> None:
    host = MemoryHost()
    first, _ = started(tmp_path, host)
    first.create_bindings([make("vnet0"), make("vnet1")])
    first.close()
    kept = host.rulesets["vnet1"]
    host.rulesets["vnet0"] = drop_all(kept.port)  # drift while no engine runs
    host.rulesets["stale9"] = drop_all(kept.port)  # left by an earlier process
    second, backend = started(tmp_path, host)
    assert backend.transactions == 1
    assert sorted(host.rulesets) == ["vnet0", "vnet1"]
    assert host.rulesets["vnet1"] is kept
    assert "fail closed" not in render_text(host.rulesets["vnet0"])
    second.close()


def test_read_only_engine_writes_nothing_and_dry_runs_against_the_kernel(
    tmp_path: Path,
) -> None:
    host = MemoryHost()
    first, _ = started(tmp_path, host)
    first.create_bindings([make("vnet0")])
    first.close()
    backend = MemoryBackend(host=host)
    reader = Engine(tmp_path, backend, stock_dir=STOCK)
    reader.start(read_only=True)
    plan = reader.define_filter(SPOOF, dry_run=True)
    assert backend.attempts == 0 and backend.transactions == 0
    assert plan.rebuilt == ("vnet0",) and plan.diffs[0].removed
    reader.close()


def test_define_diffs_against_what_the_backend_recorded(tmp_path: Path) -> None:
    host = MemoryHost()
    first, _ = started(tmp_path, host)
    first.create_bindings([make("vnet0")])
    first.close()
    second, backend = started(tmp_path, host)
    plan = second.define_filter(SPOOF, dry_run=True)
    assert any("ip-src == 0.0.0.0" in line for line in plan.diffs[0].removed)
    second.define_filter(SPOOF)
    assert backend.recorded()["vnet0"] == host.rulesets["vnet0"]
    assert "ip-src == 0.0.0.0" not in render_text(second.ruleset("vnet0"))
    second.close()
