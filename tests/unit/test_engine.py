"""The engine with the memory backend: bindings, restarts, filter rebuilds."""

from __future__ import annotations

import threading
import uuid
from pathlib import Path

import pytest

from nwfilter.backends.memory import MemoryBackend
from nwfilter.conf.model import BindingDef, FilterRef, Parameter
from nwfilter.engine import Engine
from nwfilter.errors import (
    BackendError,
    ConflictError,
    InUseError,
    LockOrderError,
    NotFoundError,
    StateError,
    StorageError,
    UnresolvedError,
)
from nwfilter.ir import Field, Hook
from nwfilter.locks import Level, LevelledLock
from nwfilter.render_text import render_text

STOCK = Path(__file__).resolve().parents[2] / "filters"

SPOOF = """<filter name='no-ip-spoofing' chain='ipv4-ip' priority='-710'>
  <uuid>ab1fda7b-a5b8-44b1-89d2-9e2ad163ce10</uuid>
  <rule action='return' direction='out' priority='500'>
    <ip srcipaddr='$IP'/>
  </rule>
  <rule action='drop' direction='out' priority='1000'/>
</filter>
"""


def make(portdev: str, ip: str = "10.0.0.5", filter_name: str = "clean-traffic") -> BindingDef:
    n = int(portdev.removeprefix("vnet"))
    return BindingDef(
        f"vm{n}", uuid.UUID(int=n + 1), portdev, f"52:54:00:00:00:{n:02x}",
        FilterRef(filter_name, (Parameter("IP", ip),)),
    )


@pytest.fixture
def engine(tmp_path: Path) -> Engine:
    eng = Engine(tmp_path, MemoryBackend(), stock_dir=STOCK)
    eng.start()
    return eng


def backend(engine: Engine) -> MemoryBackend:
    assert isinstance(engine.backend, MemoryBackend)
    return engine.backend


def test_create_bindings_one_transaction_and_persisted(engine: Engine, tmp_path: Path) -> None:
    be = backend(engine)
    before = be.transactions
    engine.create_bindings([make("vnet0"), make("vnet1", "10.0.0.6")])
    assert be.transactions == before + 1
    assert be.ports() == ("vnet0", "vnet1")
    assert (tmp_path / "run" / "bindings" / "vnet1.xml").exists()
    assert [b.portdev for b in engine.list_bindings()] == ["vnet0", "vnet1"]
    assert "10.0.0.6" in render_text(engine.ruleset("vnet1"))


def test_create_is_all_or_nothing(engine: Engine) -> None:
    backend(engine).fail_on.add("vnet1")
    with pytest.raises(BackendError, match="vnet1"):
        engine.create_bindings([make("vnet0"), make("vnet1")])
    assert engine.list_bindings() == [] and backend(engine).ports() == ()
    with pytest.raises(UnresolvedError, match=r"vnet2.*no-such"):
        engine.create_bindings([make("vnet0"), make("vnet2", filter_name="no-such")])
    assert engine.list_bindings() == []


def test_conflicts(engine: Engine) -> None:
    engine.create_bindings([make("vnet0")])
    with pytest.raises(ConflictError, match="vnet0"):
        engine.create_bindings([make("vnet0")])
    with pytest.raises(ConflictError, match="more than once"):
        engine.create_bindings([make("vnet3"), make("vnet3")])


def test_delete_binding(engine: Engine, tmp_path: Path) -> None:
    engine.create_bindings([make("vnet0")])
    engine.delete_binding("vnet0")
    assert backend(engine).ports() == ()
    assert not (tmp_path / "run" / "bindings" / "vnet0.xml").exists()
    with pytest.raises(NotFoundError):
        engine.delete_binding("vnet0")
    with pytest.raises(NotFoundError):
        engine.ruleset("vnet0")


def test_restart_reapplies_every_binding_in_one_transaction(tmp_path: Path) -> None:
    first = Engine(tmp_path, MemoryBackend(), stock_dir=STOCK)
    first.start()
    first.create_bindings([make("vnet0"), make("vnet1")])
    first.close()
    fresh = MemoryBackend()
    second = Engine(tmp_path, fresh, stock_dir=STOCK)
    assert second.start() == []
    assert fresh.probed and fresh.transactions == 1
    assert fresh.ports() == ("vnet0", "vnet1")
    assert render_text(fresh.rulesets["vnet0"]) == render_text(first.ruleset("vnet0"))


def test_define_rebuilds_affected_bindings_in_one_transaction(engine: Engine) -> None:
    engine.create_bindings([make("vnet0"), make("vnet1")])
    be = backend(engine)
    before = be.transactions
    plan = engine.define_filter(SPOOF, dry_run=True)
    assert be.transactions == before
    outcome = engine.define_filter(SPOOF)
    assert outcome.changed and outcome.rebuilt == ("vnet0", "vnet1") == plan.rebuilt
    assert be.transactions == before + 1
    removed = plan.diffs[0].removed
    assert any("ip-src == 0.0.0.0" in line for line in removed)
    assert "ip-src == 0.0.0.0" not in render_text(be.rulesets["vnet0"])
    assert "0.0.0.0 ip-proto" not in (engine.root / "nwfilter" / "no-ip-spoofing.xml").read_text()
    again = engine.define_filter(SPOOF)
    assert not again.changed and again.rebuilt == ()
    assert be.transactions == before + 1
    assert "unchanged" in again.describe()


def test_define_refused_by_kernel_changes_nothing(engine: Engine) -> None:
    engine.create_bindings([make("vnet0"), make("vnet1")])
    be = backend(engine)
    old = {p: render_text(rs) for p, rs in be.rulesets.items()}
    old_file = (engine.root / "nwfilter" / "no-ip-spoofing.xml").read_text()
    be.fail_on.add("vnet1")
    with pytest.raises(BackendError, match="vnet1"):
        engine.define_filter(SPOOF)
    assert {p: render_text(rs) for p, rs in be.rulesets.items()} == old
    assert (engine.root / "nwfilter" / "no-ip-spoofing.xml").read_text() == old_file
    assert "0.0.0.0" in render_text(engine.ruleset("vnet0"))


def test_define_file_write_failure_restores_old_rules(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.create_bindings([make("vnet0")])
    be = backend(engine)
    old = render_text(be.rulesets["vnet0"])

    def fail(*args: object, **kwargs: object) -> None:
        raise StorageError("disk full")

    monkeypatch.setattr(engine.pool, "define_locked", fail)
    with pytest.raises(StorageError):
        engine.define_filter(SPOOF)
    assert render_text(be.rulesets["vnet0"]) == old


def test_dry_run_changes_nothing(engine: Engine) -> None:
    engine.create_bindings([make("vnet0")])
    be = backend(engine)
    before = (be.transactions, render_text(be.rulesets["vnet0"]))
    outcome = engine.define_filter(SPOOF, dry_run=True)
    assert outcome.dry_run and outcome.rebuilt == ("vnet0",)
    assert (be.transactions, render_text(be.rulesets["vnet0"])) == before
    text = outcome.describe()
    assert "would be redefined" in text and "vnet0" in text and "- from-vm ipv4-ip" in text
    assert "0.0.0.0" in (engine.root / "nwfilter" / "no-ip-spoofing.xml").read_text()


def test_undefine_in_use_is_refused(engine: Engine) -> None:
    engine.create_bindings([make("vnet0", filter_name="allow-arp")])
    with pytest.raises(InUseError, match="binding vnet0"):
        engine.undefine_filter("allow-arp")
    engine.delete_binding("vnet0")
    engine.undefine_filter("allow-arp")


def test_set_learnt_reapplies_the_port(engine: Engine) -> None:
    none = BindingDef("vm", uuid.UUID(int=8), "vnet4", "52:54:00:00:00:04",
                      FilterRef("clean-traffic", (Parameter("CTRL_IP_LEARNING", "none"),)))
    with pytest.raises(UnresolvedError, match="'IP'"):
        engine.create_bindings([none])
    b = BindingDef("vm", uuid.UUID(int=9), "vnet5", "52:54:00:00:00:05", FilterRef("clean-traffic"))
    engine.create_bindings([b])  # held to the learning rules until IP is known
    assert "learning" in render_text(engine.ruleset("vnet5"))
    engine.set_learnt("vnet5", "IP", ["10.9.9.9"])
    arp = [m.value for c in engine.ruleset("vnet5").chains(Hook.FROM_VM) if c.name == "arp-ip"
           for r in c.rules for m in r.matches if m.field is Field.ARP_SPA]
    assert [str(a) for a in arp] == ["10.9.9.9/32"]
    engine.set_learnt("vnet5", "IP", ["10.9.9.8"])
    assert "10.9.9.8" in render_text(backend(engine).rulesets["vnet5"])


def test_filter_change_takes_driver_locks_in_order_and_releases_in_reverse(
    engine: Engine,
) -> None:
    events: list[str] = []
    locks = [LevelledLock(f"driver-{n}", Level.DRIVER, same_level_ok=True) for n in range(2)]
    for n, lock in enumerate(locks):
        engine.coordinator.register_driver(
            f"d{n}",
            lambda n=n, lock=lock: (lock.acquire(), events.append(f"lock {n}")),  # type: ignore[misc]
            lambda n=n, lock=lock: (events.append(f"unlock {n}"), lock.release()),  # type: ignore[misc]
        )
    engine.define_filter(SPOOF)
    assert events == ["lock 0", "lock 1", "unlock 1", "unlock 0"]
    events.clear()
    with pytest.raises(RuntimeError), engine.coordinator.filter_change():
        raise RuntimeError("boom")
    assert events == ["lock 0", "lock 1", "unlock 1", "unlock 0"]
    assert not any(lock.locked() for lock in locks)


def test_filter_change_under_pool_lock_is_an_inversion(engine: Engine) -> None:
    with engine.pool.lock.read(), pytest.raises(LockOrderError):  # noqa: SIM117
        with engine.coordinator.filter_change():
            pass
    from nwfilter.locks import CHECKER

    CHECKER.violations.clear()


def test_concurrent_defines_and_creates(engine: Engine) -> None:
    errors: list[BaseException] = []

    def create(n: int) -> None:
        try:
            engine.create_bindings([make(f"vnet{n}")])
        except BaseException as exc:
            errors.append(exc)

    def define() -> None:
        try:
            for _ in range(5):
                engine.define_filter(SPOOF)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=create, args=(n,)) for n in range(10)]
    threads.append(threading.Thread(target=define))
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert errors == []
    assert len(engine.list_bindings()) == 10
    for rs in backend(engine).rulesets.values():
        assert "ip-src == 0.0.0.0" not in render_text(rs)


def test_start_replaces_backend_state_and_fails_closed(tmp_path: Path) -> None:
    first = Engine(tmp_path, MemoryBackend(), stock_dir=STOCK)
    first.start()
    first.create_bindings([make("vnet0"), make("vnet1", "10.0.0.6")])
    # A binding whose filter cannot be compiled any more (its file is removed
    # behind the engine's back) must drop everything after a restart.
    (tmp_path / "run" / "bindings" / "vnet1.xml").write_text(
        (tmp_path / "run" / "bindings" / "vnet1.xml")
        .read_text()
        .replace("clean-traffic", "no-such-filter")
    )
    stale = first.ruleset("vnet0")
    first.close()
    be = MemoryBackend()
    be.rulesets = {"stale0": stale}  # left by an earlier process
    fresh = Engine(tmp_path, be, stock_dir=STOCK)
    warnings = fresh.start()
    assert be.ports() == ("vnet0", "vnet1")
    assert any("vnet1" in w and "drops all traffic" in w for w in warnings)
    assert "fail closed" in render_text(be.rulesets["vnet1"])


def test_one_engine_per_state_root(tmp_path: Path) -> None:
    first = Engine(tmp_path, MemoryBackend(), stock_dir=STOCK, owner="nwfilterd")
    first.start()
    second = Engine(tmp_path, MemoryBackend(), stock_dir=STOCK, lock_timeout=5)
    with pytest.raises(ConflictError, match=r"in use by nwfilterd \(pid \d+\)"):
        second.start()  # a daemon never lets go: refused at once, not after 5 s
    first.close()
    second.start()
    second.close()


def test_read_only_engine_answers_queries_and_changes_nothing(tmp_path: Path) -> None:
    first = Engine(tmp_path, MemoryBackend(), stock_dir=STOCK)
    first.start()
    first.create_bindings([make("vnet0")])
    first.close()
    be = MemoryBackend()
    ro = Engine(tmp_path, be, stock_dir=STOCK)
    ro.start(read_only=True)
    assert not be.probed and be.attempts == 0
    assert [b.portdev for b in ro.list_bindings()] == ["vnet0"]
    assert "52:54:00" in render_text(ro.ruleset("vnet0"))
    assert ro.define_filter(SPOOF, dry_run=True).rebuilt == ("vnet0",)
    for change in (
        lambda: ro.define_filter(SPOOF),
        lambda: ro.undefine_filter("allow-arp"),
        lambda: ro.create_bindings([make("vnet1")]),
        lambda: ro.delete_binding("vnet0"),
    ):
        with pytest.raises(StateError):
            change()
    assert be.attempts == 0
    ro.close()


def test_refused_learnt_values_are_not_recorded(engine: Engine) -> None:
    engine.create_bindings([make("vnet0", filter_name="no-ip-spoofing")])
    backend(engine).fail_on.add("vnet0")
    with pytest.raises(BackendError):
        engine.set_learnt("vnet0", "IP", ["10.0.0.9"])
    assert engine.learnt("vnet0") == {}


def test_failed_binding_removal_puts_the_rules_back(
    engine: Engine, monkeypatch: pytest.MonkeyPatch
) -> None:
    engine.create_bindings([make("vnet0")])
    before = render_text(backend(engine).rulesets["vnet0"])

    def fail(*args: object, **kwargs: object) -> None:
        raise StorageError("read-only file system")

    monkeypatch.setattr(engine.bindings, "remove_locked", fail)
    with pytest.raises(StorageError):
        engine.delete_binding("vnet0")
    assert render_text(backend(engine).rulesets["vnet0"]) == before
    assert engine.binding("vnet0").portdev == "vnet0"


def test_an_engine_that_is_not_started_changes_nothing(tmp_path: Path) -> None:
    engine = Engine(tmp_path, MemoryBackend(), stock_dir=STOCK)
    with pytest.raises(StateError, match="not started"):
        engine.create_bindings([make("vnet0")])


def test_dry_run_of_a_read_only_engine_shows_removed_rules(engine: Engine, tmp_path: Path) -> None:
    engine.define_filter(SPOOF)
    engine.create_bindings([make("vnet1", "10.0.0.1")])
    engine.close()
    reader = Engine(tmp_path, MemoryBackend(), stock_dir=STOCK)
    reader.start(read_only=True)
    try:
        changed = SPOOF.replace("<ip srcipaddr='$IP'/>", "<ip srcipaddr='$IP' srcipmask='24'/>")
        outcome = reader.define_filter(changed, dry_run=True)
        (diff,) = outcome.diffs
        assert len(diff.removed) == 1 and len(diff.added) == 1
        assert "10.0.0.1" in diff.removed[0] and "10.0.0.0/24" in diff.added[0]
    finally:
        reader.close()
