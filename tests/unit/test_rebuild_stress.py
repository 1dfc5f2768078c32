"""Stress: two drivers' domains change state while their filters change.

Threads start, stop, suspend and resume domains of two test-hypervisor
drivers while others redefine the filters those domains use, define and
undefine filters, and try to undefine filters in use.  With the lock-order
checker on, the run must end in bounded time with no deadlock, no
inversion, no job timeout, and with every running domain's recorded rules
equal to what its current filters compile to.
"""

from __future__ import annotations

import random
import sys
import threading
import time
import traceback
from collections.abc import Callable
from pathlib import Path

from nwfilter.compile import Compiler
from nwfilter.conf.model import BindingDef
from nwfilter.domain.objects import DomainState
from nwfilter.errors import InUseError, JobTimeoutError, NwfilterError, StateError
from nwfilter.ir import Ruleset
from nwfilter.locks import CHECKER, Level
from tests.unit.domain.conftest import World, domain_xml, filter_xml, make_world

DURATION = 8.0
DOMAINS = 12
FILTERS = ("web", "db", "app", "base")


def _dump_threads() -> str:
    frames = sys._current_frames()
    out = []
    for thread in threading.enumerate():
        frame = frames.get(thread.ident or 0)
        if frame is not None:
            out.append(f"--- {thread.name}\n" + "".join(traceback.format_stack(frame)))
    return "\n".join(out)


PortCheck = Callable[[BindingDef, Ruleset], None]


def test_lifecycle_and_filter_changes_race_without_deadlock(tmp_path: Path) -> None:
    world = make_world(tmp_path)

    def recorded_rules_match(binding: BindingDef, want: Ruleset) -> None:
        assert world.backend.rulesets[binding.portdev] == want, binding.portdev

    race(world, DURATION, recorded_rules_match)


def race(world: World, duration: float, check_port: PortCheck, *,
         types: tuple[str, ...] = ("ns", "test")) -> None:
    """Run the race on `world` for `duration` seconds, then check that no
    thread is stuck, no lock was taken out of order, and (through
    `check_port`) that each running domain's port holds what its current
    filters compile to.  The domains' types take turns from `types`."""
    CHECKER.reset_observed()
    engine, manager = world.engine, world.manager
    engine.define_filter(filter_xml("base", 22))
    engine.define_filter(filter_xml("app", 8000, ref="base"))
    for hv in (world.hv_a, world.hv_b):
        hv.set_delay("prepare", 0.001)
        hv.set_delay("stop", 0.001)
    names = []
    for i in range(DOMAINS):
        dtype = types[i % len(types)]
        filters = (FILTERS[i % 3], FILTERS[(i + 1) % 3]) if i % 4 else ("app",)
        manager.define_xml(domain_xml(f"vm{i}", dtype, filters=filters))
        names.append(f"vm{i}")
    # A domain the lifecycle threads never touch keeps 'app' (and through it
    # 'base') in use, so every attempt to undefine them must be refused.
    manager.define_xml(domain_xml("pinned", "test", filters=("app",)))
    manager.run("start", "pinned")

    deadline = time.monotonic() + duration
    errors: list[str] = []
    counts = {"ops": 0, "filter_changes": 0, "in_use_refusals": 0}
    count_lock = threading.Lock()

    def bump(key: str) -> None:
        with count_lock:
            counts[key] += 1

    def lifecycle(seed: int) -> None:
        rng = random.Random(seed)
        while time.monotonic() < deadline:
            name = rng.choice(names)
            op = rng.choice(("start", "start", "destroy", "shutdown", "suspend", "resume"))
            try:
                manager.run(op, name)
                bump("ops")
            except StateError:
                bump("ops")  # wrong state for that operation: expected
            except JobTimeoutError as exc:
                errors.append(f"job timeout: {exc}")
            except NwfilterError as exc:
                errors.append(f"{op} {name}: {exc}")

    def filter_changes(seed: int) -> None:
        rng = random.Random(seed)
        n = 0
        while time.monotonic() < deadline:
            n += 1
            choice = rng.random()
            try:
                if choice < 0.6:
                    name = rng.choice(FILTERS)
                    ref = "base" if name == "app" else None
                    engine.define_filter(filter_xml(name, rng.randrange(1, 65000), ref=ref))
                elif choice < 0.8:
                    tmp = f"tmp{seed}-{n}"
                    engine.define_filter(filter_xml(tmp, 99))
                    engine.undefine_filter(tmp)
                else:
                    try:
                        engine.undefine_filter(rng.choice(("base", "app")))
                        errors.append("a filter in use was undefined")
                    except InUseError:
                        bump("in_use_refusals")
                bump("filter_changes")
            except NwfilterError as exc:
                errors.append(f"filter change: {exc}")

    threads = [threading.Thread(target=lifecycle, args=(i,), name=f"life{i}", daemon=True)
               for i in range(4)]
    threads += [
        threading.Thread(target=filter_changes, args=(100 + i,), name=f"filt{i}", daemon=True)
        for i in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(max(0.1, deadline + 10 - time.monotonic()))
    stuck = [t.name for t in threads if t.is_alive()]
    assert not stuck, f"deadlock: {stuck} still running\n{_dump_threads()}"
    assert not errors, "\n".join(errors[:10])
    assert counts["ops"] > 100 and counts["filter_changes"] > 20, counts

    # every running domain's rules are what its current filters compile to
    compiler = Compiler(engine.pool.snapshot())
    expected_ports: set[str] = set()
    running = 0
    for row in manager.list_domains():
        assert row.state in (DomainState.RUNNING, DomainState.PAUSED)
        running += 1
        for binding in [b for b in engine.list_bindings() if b.owner_name == row.name]:
            expected_ports.add(binding.portdev)
            check_port(binding, compiler.compile(binding, None))
    assert set(world.backend.ports()) == expected_ports
    assert set(world.backend.ports()) == {b.portdev for b in manager.binding_defs()}
    # nothing but the documented order was ever used
    for held, held_level, taken, taken_level in CHECKER.observed_order():
        assert held_level < taken_level or (
            held_level == taken_level == Level.DRIVER
        ), (held, taken)
    print(f"\nstress: {counts}, running at end: {running}")
    manager.stop_all()
    assert world.backend.ports() == ()
