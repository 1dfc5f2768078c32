"""Benchmark of the filter pool at scale.

Builds a pool of N filters (default 10,000) whose references form a random
forest (each filter references its children; a few extra references across
branches keep it a DAG rather than a tree), then times per operation:
define (with its atomic, fsynced file write), lookup by name and by UUID,
the loop check of a define (`find_loop`, with and without a loop), the
affected-set query (`reached_by`) and a reload of the whole directory.

    .venv/bin/python tools/bench_pool.py [--filters 10000] [--dir DIR]

The targets: loop check and affected-set query under 1 ms at 10,000.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

from nwfilter.conf.model import Action, Direction, FilterDef, FilterRef, Rule
from nwfilter.pool import FilterPool


def make_forest(n: int, rng: random.Random) -> list[list[int]]:
    """children[i]: the filters filter i references (all > i, so no loop)."""
    children: list[list[int]] = [[] for _ in range(n)]
    for i in range(1, n):
        if rng.random() < 0.99:  # else i starts a new tree
            children[rng.randrange(i)].append(i)
    for _ in range(n // 10):
        a = rng.randrange(n - 1)
        b = rng.randrange(a + 1, n)
        if b not in children[a]:
            children[a].append(b)
    return children


def make_def(i: int, refs: list[int]) -> FilterDef:
    name = f"f{i:05d}"
    entries: tuple[Rule | FilterRef, ...] = (
        Rule(Action.ACCEPT, Direction.OUT, priority=100),
        Rule(Action.DROP, Direction.INOUT, priority=1000),
        *(FilterRef(f"f{r:05d}") for r in refs),
    )
    return FilterDef(name, uuid.uuid5(uuid.NAMESPACE_OID, name), "ipv4", -700, entries)


def timed(samples: list[float], fn: Callable[[], object]) -> object:
    start = time.perf_counter_ns()
    out = fn()
    samples.append((time.perf_counter_ns() - start) / 1e6)
    return out


def report(label: str, samples: list[float]) -> None:
    ordered = sorted(samples)
    p99 = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
    print(
        f"{label:<34} n={len(samples):>6}  median {statistics.median(samples):8.4f} ms"
        f"  p99 {p99:8.4f} ms  max {ordered[-1]:8.4f} ms"
    )


def run(n: int, directory: Path, seed: int) -> None:
    rng = random.Random(seed)
    children = make_forest(n, rng)
    stock = directory / "stock"
    stock.mkdir()
    pool = FilterPool(directory / "cfg", stock_dir=stock)
    pool.load()

    define: list[float] = []
    for i in reversed(range(n)):  # leaves first, as an admin would
        timed(define, lambda i=i: pool.define(make_def(i, children[i])))  # type: ignore[misc]

    names = [f"f{i:05d}" for i in range(n)]
    by_name: list[float] = []
    by_uuid: list[float] = []
    for _ in range(5000):
        name = rng.choice(names)
        timed(by_name, lambda name=name: pool.lookup(name))  # type: ignore[misc]
        key = str(uuid.uuid5(uuid.NAMESPACE_OID, name))
        timed(by_uuid, lambda key=key: pool.lookup(key))  # type: ignore[misc]

    loop_yes: list[float] = []
    loop_no: list[float] = []
    for _ in range(5000):
        a, b = rng.randrange(n), rng.randrange(n)
        candidate = make_def(a, [*children[a], b])
        samples: list[float] = []
        found = timed(samples, lambda c=candidate: pool.find_loop(c))  # type: ignore[misc]
        (loop_yes if found is not None else loop_no).extend(samples)
    # loops on purpose: a filter given a reference to one of its ancestors
    nested = [i for i in range(n) if pool.referrers(f"f{i:05d}")]
    for _ in range(1000):
        d = rng.choice(nested)
        ancestor = int(rng.choice(sorted(pool.reached_by(f"f{d:05d}") - {f"f{d:05d}"}))[1:])
        candidate = make_def(d, [*children[d], ancestor])
        found = timed(loop_yes, lambda c=candidate: pool.find_loop(c))  # type: ignore[misc]
        assert found is not None
    # the worst shapes: a root given a reference to a deep leaf and back
    roots = [i for i in range(n) if not pool.referrers(f"f{i:05d}")]
    biggest = max(roots, key=lambda r: len(pool.reaches(f"f{r:05d}")))
    deep = max(pool.reaches(f"f{biggest:05d}"))
    worst: list[float] = []
    for _ in range(200):
        timed(worst, lambda: pool.find_loop(make_def(int(deep[1:]), [biggest])))
        timed(worst, lambda: pool.find_loop(make_def(biggest, [*children[biggest], int(deep[1:])])))

    affected: list[float] = []
    sizes: list[int] = []
    for _ in range(5000):
        name = rng.choice(names)
        got = timed(affected, lambda name=name: pool.reached_by(name))  # type: ignore[misc]
        assert isinstance(got, frozenset)
        sizes.append(len(got))

    check: list[float] = []
    for _ in range(1000):
        i = rng.randrange(n)
        timed(check, lambda i=i: pool.check_define(make_def(i, children[i])))  # type: ignore[misc]

    reload: list[float] = []
    fresh = FilterPool(pool.config_dir, stock_dir=stock)
    timed(reload, fresh.load)
    assert len(fresh) == n

    print(f"pool of {n} filters, {sum(map(len, children))} references, {len(roots)} trees")
    report("define (write + fsync)", define)
    report("lookup by name", by_name)
    report("lookup by uuid", by_uuid)
    report("loop check, no loop", loop_no)
    report("loop check, loop found", loop_yes)
    report("loop check, biggest tree root/leaf", worst)
    report("affected set (reached_by)", affected)
    report("check_define (dry run, incl. XML)", check)
    report("reload of the directory", reload)
    print(f"affected-set size: median {statistics.median(sizes)}, max {max(sizes)}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--filters", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--dir", type=Path, default=None, help="work directory (default: temp)")
    args = parser.parse_args(argv)
    if args.dir is not None:
        args.dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
            run(args.filters, Path(tmp), args.seed)
    else:
        with tempfile.TemporaryDirectory() as tmp:
            run(args.filters, Path(tmp), args.seed)
    return 0


if __name__ == "__main__":
    sys.exit(main())
