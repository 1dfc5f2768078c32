"""The lifecycle/filter-change race of tests/unit/test_rebuild_stress.py on
the real kernel: the same threads, with the nft backend in a throwaway
namespace and real QEMU processes on taps among the domains; at the end
every running domain's port must hold in the kernel exactly what its
current filters compile to.  Then a filter that several QEMU domains use
is redefined over and over while they start and stop."""

from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

from nwfilter.backends.nft import NftBackend
from nwfilter.compile import Compiler
from nwfilter.conf.model import BindingDef
from nwfilter.domain.objects import DomainState
from nwfilter.domain.qemuvm import QEMU_BINARY, QemuHypervisor
from nwfilter.errors import NwfilterError, StateError
from nwfilter.ir import Changes, Ruleset
from nwfilter.locks import CHECKER, Level
from nwfilter.netlab import NetLab
from tests.nft_rulesets import uncounted
from tests.unit.domain.conftest import domain_xml, filter_xml, make_world
from tests.unit.test_rebuild_stress import race

pytestmark = [pytest.mark.root, pytest.mark.netns, pytest.mark.slow]

# The port's numeric id (in its packet-mark rule and that rule's comment and
# digest, and in the port's stamp) depends on the order ports were added, so
# it is the one thing allowed to differ, with counter values (QEMU's own
# frames move them).
_MARK_ID = re.compile(r"0x[0-9a-f]{8}")
_ID_COMMENT = re.compile(r"port id \d+ #d=[0-9a-f]+")
_STAMP = re.compile(r"nwfilter stamp [0-9a-f]+\.[0-9a-f]+ #d=[0-9a-f]+")


def _normalized(text: str) -> str:
    text = _STAMP.sub("nwfilter stamp STAMP", uncounted(text))
    return _ID_COMMENT.sub("port id ID", _MARK_ID.sub("0xID", text))


QEMU = shutil.which(QEMU_BINARY) is not None


def _qemu(root: Path, netns: str) -> QemuHypervisor:
    # No guest OS answers the power button: a shutdown kills QEMU soon.
    return QemuHypervisor("qemu", root / "run" / "hypervisor" / "qemu", netns,
                          command_timeout=5, shutdown_timeout=0.2)


def _kill_qemus(root: Path) -> None:
    """QEMU processes a failed test left (their records name their pids)."""
    for record in root.glob("run/hypervisor/*/*.json"):
        for word in record.read_text().replace(",", " ").replace("}", " ").split():
            cmdline = Path(f"/proc/{word}/cmdline")
            with contextlib.suppress(OSError):
                if word.isdigit() and QEMU_BINARY.encode() in cmdline.read_bytes():
                    os.kill(int(word), signal.SIGKILL)


class _Reference:
    """What a ruleset looks like in the kernel: applied alone in a namespace
    of its own, read back, normalised."""

    def __init__(self, netns: str) -> None:
        self.backend = NftBackend(netns=netns)
        self.backend.probe()

    def matches(self, actual: NftBackend, binding: BindingDef, want: Ruleset) -> None:
        self.backend.apply(Changes(set=(want,), replace_all=True))
        expected = _normalized(self.backend.read_back(binding.portdev))
        got = _normalized(actual.read_back(binding.portdev))
        assert expected and got == expected, binding.portdev


def _lock_order_held() -> None:
    """Nothing but the documented order was ever used."""
    assert not CHECKER.violations
    for held, held_level, taken, taken_level in CHECKER.observed_order():
        assert held_level < taken_level or (
            held_level == taken_level == Level.DRIVER
        ), (held, taken)


@pytest.mark.parametrize("types", [
    ("ns", "test"),
    pytest.param(("ns", "test", "qemu"), marks=pytest.mark.skipif(
        not QEMU, reason=f"{QEMU_BINARY} is not installed"), id="with-qemu"),
])
def test_race_on_the_kernel_leaves_exactly_the_compiled_rules(
    tmp_path: Path, types: tuple[str, ...]
) -> None:
    with NetLab() as lab:
        stressed_ns, reference_ns = lab.add_ns("stress"), lab.add_ns("reference")
        lab.add_bridge(stressed_ns, "br0")
        more = {"qemu": _qemu(tmp_path, stressed_ns)} if "qemu" in types else {}
        world = make_world(tmp_path, NftBackend(netns=stressed_ns), more=more,
                           netns=stressed_ns)
        reference = _Reference(reference_ns)
        checked: list[str] = []

        def kernel_rules_match(binding: BindingDef, want: Ruleset) -> None:
            reference.matches(world.engine.backend, binding, want)
            checked.append(binding.portdev)

        try:
            race(world, 6.0, kernel_rules_match, types=types)
        finally:
            with contextlib.suppress(NwfilterError):
                world.manager.stop_all()
            for hv in more.values():
                hv.close()
            _kill_qemus(tmp_path)
            world.engine.close()
        assert checked, "no domain was running at the end"
        if "qemu" in types:  # QEMU itself ran: each launch is logged
            logs = (tmp_path / "run" / "hypervisor" / "qemu").glob("*.log")
            launches = sum(log.read_text().count("starting: ") for log in logs)
            print(f"QEMU launches: {launches}")
            assert launches >= 4
        ruleset = lab.run(stressed_ns, ["nft", "list", "ruleset"]).stdout
        assert "nwfilter" not in ruleset  # the last domain stopped took our tables
        assert "tun type tap" not in lab.run(stressed_ns, ["ip", "-d", "link"]).stdout


@pytest.mark.skipif(not QEMU, reason=f"{QEMU_BINARY} is not installed")
def test_a_filter_redefined_while_qemu_domains_start_and_stop(tmp_path: Path) -> None:
    """Six QEMU domains share filter 'web' (three of them on two NICs).  q0
    runs throughout; three threads start and destroy q1-q5 at random, then
    each leaves its own share started or destroyed, while another thread
    redefines 'web' with a new port each time until they are all done.  At
    the end each running domain's ports hold exactly the last definition's
    rules, stopped ones hold nothing, and no lock was taken out of order."""
    CHECKER.reset_observed()
    with NetLab() as lab:
        host, reference_ns = lab.add_ns("host"), lab.add_ns("reference")
        lab.add_bridge(host, "br0")
        hv = _qemu(tmp_path, host)
        world = make_world(tmp_path, NftBackend(netns=host), more={"qemu": hv}, netns=host)
        engine, manager = world.engine, world.manager
        reference = _Reference(reference_ns)
        names = [f"q{i}" for i in range(6)]
        nics = {name: 1 + i % 2 for i, name in enumerate(names)}
        for name in names:
            manager.define_xml(domain_xml(name, "qemu", filters=("web",) * nics[name]))
        manager.run("start", "q0")
        # The share each thread leaves as it finishes: (started, destroyed).
        finish = [(("q1",), ("q2",)), (("q3",), ("q4",)), ((), ("q5",))]
        deadline = time.monotonic() + 5.0
        lifecycle_done = threading.Event()
        errors: list[str] = []
        ports_used: list[int] = []
        count_lock = threading.Lock()
        counts = {"start": 0, "destroy": 0}

        def act(op: str, name: str) -> None:
            try:
                manager.run(op, name)
                with count_lock:
                    counts[op] += 1
            except StateError:
                pass  # already in that state
            except NwfilterError as exc:
                errors.append(f"{op} {name}: {exc}")

        def lifecycle(seed: int) -> None:
            rng = random.Random(seed)
            while time.monotonic() < deadline:
                act(rng.choice(("start", "start", "destroy")), rng.choice(names[1:]))
            started, destroyed = finish[seed]
            for name in started:
                act("start", name)
            for name in destroyed:
                act("destroy", name)

        def redefine() -> None:
            port = 1000
            while not lifecycle_done.is_set():
                port += 1
                try:
                    engine.define_filter(filter_xml("web", port))
                    ports_used.append(port)
                except NwfilterError as exc:
                    errors.append(f"define web: {exc}")
                time.sleep(0.02)

        lifecycles = [threading.Thread(target=lifecycle, args=(i,), name=f"life{i}",
                                       daemon=True) for i in range(3)]
        redefiner = threading.Thread(target=redefine, name="redefine", daemon=True)
        try:
            for t in (*lifecycles, redefiner):
                t.start()
            for t in lifecycles:
                t.join(max(0.1, deadline + 30 - time.monotonic()))
            lifecycle_done.set()
            redefiner.join(30)
            stuck = [t.name for t in (*lifecycles, redefiner) if t.is_alive()]
            assert not stuck, f"deadlock: {stuck}"
            assert not errors, "\n".join(errors[:10])
            assert counts["start"] >= 6 and counts["destroy"] >= 3, counts
            assert len(ports_used) >= 20, len(ports_used)

            last = ports_used[-1]
            compiler = Compiler(engine.pool.snapshot())
            running = {r.name for r in manager.list_domains()}
            assert running == {"q0", "q1", "q3"}, running
            ruleset = lab.run(host, ["nft", "list", "ruleset"]).stdout
            links = lab.run(host, ["ip", "-d", "link"]).stdout
            bound: set[str] = set()
            for name in names:
                mine = [b for b in engine.list_bindings() if b.owner_name == name]
                if name not in running:
                    assert mine == [] and manager.state(name).state is DomainState.SHUTOFF
                    continue
                assert len(mine) == nics[name]
                for binding in mine:
                    bound.add(binding.portdev)
                    reference.matches(engine.backend, binding, compiler.compile(binding, None))
                    rules = engine.backend.read_back(binding.portdev)
                    assert f"tcp dport {last} " in rules
                    assert not [p for p in ports_used[:-1] if f"tcp dport {p} " in rules]
            # Stopped domains have neither rules nor taps: the kernel holds
            # exactly the running domains' ports.
            assert set(engine.backend.ports()) == bound
            taps = {ln.split(": ")[1].split("@")[0] for ln in
                    lab.run(host, ["ip", "-o", "link", "show", "type", "tun"]).stdout.splitlines()}
            assert taps == bound, (taps, bound, links)
            assert all(port in ruleset for port in bound)
            _lock_order_held()
            print(f"\nqemu rebuild stress: {counts}, {len(ports_used)} "
                  f"definitions of 'web', {len(running)} of {len(names)} running at the end")
        finally:
            with contextlib.suppress(NwfilterError):
                manager.stop_all()
            hv.close()
            _kill_qemus(tmp_path)
            engine.close()


@pytest.mark.skipif(not QEMU, reason=f"{QEMU_BINARY} is not installed")
def test_the_end_of_a_qemu_killed_by_destroy_is_no_guest_event(tmp_path: Path) -> None:
    """A destroy kills QEMU before it waits for the domain's job (so a hung
    monitor call ends at once), and stops the domain itself once it has the
    job.  The killed process's monitor closes meanwhile; reporting that as
    the guest exiting by itself (as libvirt does not: its EOF handler skips
    a domain being destroyed) let the event handler race the destroy: it
    either stopped the domain first, and the destroy failed with 'not
    running', or ran after a start that followed the destroy, found the new
    process alive and held the new domain's job while waiting to see whether
    it went away too (found by the race above: a start that timed out)."""
    with NetLab() as lab:
        host = lab.add_ns("host")
        lab.add_bridge(host, "br0")
        hv = _qemu(tmp_path, host)
        world = make_world(tmp_path, NftBackend(netns=host), more={"qemu": hv}, netns=host)
        manager = world.manager
        reported: list[tuple[str, str, str]] = []
        seen = threading.Event()
        to_driver = hv._sink
        assert to_driver is not None

        def sink(name: str, kind: str, reason: str) -> None:
            if kind == "exited":
                reported.append((name, kind, reason))
                seen.set()
            to_driver(name, kind, reason)

        hv.set_event_sink(sink)
        try:
            manager.define_xml(domain_xml("q", "qemu"))
            manager.run("start", "q")
            dom = manager.driver("qemu").get("q")[1]
            pid = hv.pid(dom)
            hv.kill(dom)  # what a destroy does before it waits for the job
            assert not seen.wait(1.0), reported
            assert not hv.is_alive(dom) and pid is not None
            manager.run("destroy", "q")  # and then, with the job, this
            assert manager.state("q").state is DomainState.SHUTOFF
            assert manager.state("q").reason == "destroyed"
            # A QEMU that dies by itself is still reported.
            manager.run("start", "q")
            pid = hv.pid(manager.driver("qemu").get("q")[1])
            assert pid is not None
            os.kill(pid, signal.SIGKILL)
            assert seen.wait(10.0)
            assert reported == [("q", "exited", "crashed")]
        finally:
            with contextlib.suppress(NwfilterError):
                manager.stop_all()
            hv.close()
            _kill_qemus(tmp_path)
            world.engine.close()
