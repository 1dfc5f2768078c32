"""Group commit against nf_tables in a throwaway namespace: binding creates
that arrive together are one kernel transaction, counted at the libnftables
context (every command batch that is not a listing and not a check-mode
run is one kernel transaction)."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from nwfilter.backends.nft import NftBackend
from nwfilter.backends.nft.backend import NftContext, default_nft_factory
from nwfilter.conf.model import BindingDef, FilterRef, Parameter
from nwfilter.engine import Engine
from nwfilter.errors import UnresolvedError
from nwfilter.netlab import NetLab

pytestmark = [pytest.mark.root, pytest.mark.netns]

STOCK = Path(__file__).resolve().parents[2] / "filters"
WAIT = 20.0


class CountingContext:
    """A libnftables context that counts the transactions it sends."""

    def __init__(self, ctx: NftContext) -> None:
        self._ctx = ctx
        self._dry = False
        self.transactions = 0

    def json_cmd(self, json_root: dict[str, Any]) -> tuple[int, Any, str]:
        commands = json_root.get("nftables", [])
        writes = any(key != "list" for command in commands for key in command)
        rc, out, err = self._ctx.json_cmd(json_root)
        if writes and not self._dry and rc == 0:
            self.transactions += 1
        return rc, out, err

    def cmd(self, cmdline: str) -> tuple[int, str, str]:
        return self._ctx.cmd(cmdline)

    def set_json_output(self, value: bool) -> bool:
        return self._ctx.set_json_output(value)

    def set_dry_run(self, onoff: bool) -> bool:
        self._dry = onoff
        return self._ctx.set_dry_run(onoff)


class Setup:
    def __init__(self, engine: Engine, counter: list[CountingContext], ns: str, lab: NetLab):
        self.engine = engine
        self._counter = counter
        self.ns = ns
        self.lab = lab

    @property
    def transactions(self) -> int:
        return sum(c.transactions for c in self._counter)


@pytest.fixture
def setup(tmp_path: Path) -> Iterator[Setup]:
    contexts: list[CountingContext] = []

    def factory() -> NftContext:
        ctx = CountingContext(default_nft_factory())
        contexts.append(ctx)
        return ctx

    with NetLab() as lab:
        host = lab.add_ns("host")
        lab.enable_bridge_netfilter(host)
        engine = Engine(tmp_path / "root", NftBackend(netns=host, nft_factory=factory),
                        stock_dir=STOCK)
        engine.start()
        try:
            yield Setup(engine, contexts, host, lab)
        finally:
            engine.backend.clear_all()
            engine.close()


def make(n: int, filter_name: str = "clean-traffic") -> BindingDef:
    return BindingDef(
        f"vm{n}", uuid.UUID(int=n + 1), f"vnet{n}", f"52:54:00:00:{n // 256:02x}:{n % 256:02x}",
        FilterRef(filter_name, (Parameter("IP", f"10.0.{n // 256}.{n % 256}"),)),
    )


Outcomes = dict[int, BaseException | None]


def run_all(calls: dict[int, Any]) -> tuple[list[threading.Thread], Outcomes]:
    errors: Outcomes = {}

    def run(key: int) -> None:
        try:
            calls[key]()
            errors[key] = None
        except BaseException as exc:
            errors[key] = exc

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in calls]
    for t in threads:
        t.start()
    return threads, errors


def join(threads: list[threading.Thread]) -> None:
    for t in threads:
        t.join(WAIT)
        assert not t.is_alive(), "a create never returned"


def test_creates_that_arrive_together_are_one_kernel_transaction(setup: Setup) -> None:
    engine = setup.engine
    engine.create_bindings([make(100)])  # the tables exist from here on
    before = setup.transactions
    n = 32
    calls: dict[int, Any] = {i: (lambda i=i: engine.create_bindings([make(i)])) for i in range(n)}
    calls[n] = lambda: engine.create_bindings([make(n, filter_name="no-such-filter")])
    with engine.pool.lock.write():  # the commit's first lock: every request queues
        threads, errors = run_all(calls)
        deadline = time.monotonic() + WAIT
        while engine.create_queue.pending() < n + 1:
            assert time.monotonic() < deadline, "the requests did not queue"
            time.sleep(0.005)
    join(threads)
    assert {k for k, e in errors.items() if e is not None} == {n}
    assert isinstance(errors[n], UnresolvedError) and f"vnet{n}" in str(errors[n])
    assert setup.transactions - before == 1  # 33 requests, one kernel transaction
    assert set(engine.backend.ports()) == {f"vnet{i}" for i in [*range(n), 100]}
    ruleset = setup.lab.run(setup.ns, ["nft", "list", "ruleset"], timeout=30).stdout
    for i in range(n):
        assert f'"vnet{i}"' in ruleset
    assert f'"vnet{n}"' not in ruleset


def test_a_burst_of_creates_takes_fewer_transactions_than_requests(setup: Setup) -> None:
    engine = setup.engine
    engine.create_bindings([make(100)])
    before = setup.transactions
    n = 48
    barrier = threading.Barrier(n)

    def create(i: int) -> None:
        barrier.wait(WAIT)
        engine.create_bindings([make(i)])

    threads, errors = run_all({i: (lambda i=i: create(i)) for i in range(n)})
    join(threads)
    assert errors == dict.fromkeys(range(n))
    used = setup.transactions - before
    assert used == engine.create_queue.batches - 1 <= n  # one per batch
    assert len(engine.backend.ports()) == n + 1
    print(f"\n{n} concurrent creates on nft: {used} kernel transactions")
