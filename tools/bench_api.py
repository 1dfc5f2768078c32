"""Benchmark of the control paths: binding creates one port per call, and
`nwfilter-list` throughput, with the nft backend in throwaway namespaces.

Prints figures, it asserts nothing.  Needs root.  Each phase gets its own
network namespace (made by `NetLab`, deleted at the end) and its own state
root (a directory made under /var/tmp, mode 0700, removed at the end); the
daemons and the `nft monitor` it starts are stopped even on Ctrl-C.

Phases (`--calls N` ports each, default 1000):
  a. `nwfilter nwfilter-binding-create FILE` as a process per call, no
     daemon: the command line runs the engine embedded (`--embedded-calls`
     cuts this phase alone; it is the slow one);
  b. the same command with nwfilterd serving the root (`--cli-calls`);
  c. `binding.create` through the API (`nwfilter.client.Client`, in this
     process) from one client;
  d. the same from `--clients` concurrent clients (default 16), which the
     daemon's group commit batches: ms per port and the number of kernel
     transactions (nf_tables generations the daemon made, read with
     `nft monitor`);
  e. `filter.list` (what `nwfilter-list` calls) through the daemon from 1,
     8 and 64 concurrent clients for `--seconds` each: requests per second;
  f. phase d without the daemon: `Engine.create_bindings` from `--clients`
     threads in this process, to show what the commit itself costs.

For a-c it prints the time of the 1st, 100th, 500th and 1,000th call (the
ones there are) and the mean, to show whether a call's cost grows with the
number of bindings.  `--skip` leaves phases out (e.g. `--skip acdef` runs b
alone).

The processes it starts run this tree's package (from the top of the tree,
whatever the current directory) with compiled bytecode, as an installed
package has it: PYTHONDONTWRITEBYTECODE is not passed on, so the first
run writes the __pycache__ directories.

Usage: python tools/bench_api.py [--calls N] [--embedded-calls N] [--cli-calls N]
           [--clients N] [--seconds S] [--workers N] [--skip PHASES]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nwfilter.client import Client  # noqa: E402
from nwfilter.netlab import NetLab  # noqa: E402

MARKS = (1, 100, 500, 1000)
_GENERATION = re.compile(r"^# new generation \d+ by process (\d+) ")


def binding_xml(i: int) -> str:
    return (
        f"<filterbinding><owner><name>vm{i}</name>"
        f"<uuid>00000000-0000-4000-8000-{i + 1:012x}</uuid></owner>"
        f"<portdev name='tap{i}'/><mac address='52:54:01:00:{i // 256:02x}:{i % 256:02x}'/>"
        f"<filterref filter='clean-traffic'>"
        f"<parameter name='IP' value='10.{100 + i // 65536}.{(i // 256) % 256}.{i % 256}'/>"
        f"</filterref></filterbinding>\n"
    )


class Bench:
    """Everything a run made, undone by `close()`."""

    def __init__(self, workers: int) -> None:
        self.lab = NetLab()
        self.workers = workers
        self.dirs: list[Path] = []
        self.procs: list[subprocess.Popen[str]] = []
        self.env = {**os.environ, "PYTHONPATH": str(REPO)}
        for key in ("NWFILTER_ROOT", "NWFILTER_BACKEND", "NWFILTER_NETNS", "NWFILTER_SOCKET",
                    "PYTHONDONTWRITEBYTECODE"):
            self.env.pop(key, None)

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        self.lab.close()  # kills what runs in the namespaces, deletes them
        for path in self.dirs:
            shutil.rmtree(path, ignore_errors=True)

    def stop(self, proc: subprocess.Popen[str]) -> None:
        """Stop a daemon whose phase is over (so it takes no CPU from the next)."""
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def tempdir(self, what: str) -> Path:
        path = Path(tempfile.mkdtemp(prefix=f"nwbench-{what}-", dir="/var/tmp"))
        self.dirs.append(path)
        return path

    def host(self, name: str) -> tuple[str, Path]:
        """A fresh namespace and an empty state root for one phase."""
        ns = self.lab.add_ns(name)
        self.lab.enable_bridge_netfilter(ns)
        return ns, self.tempdir(name) / "root"

    def cli(self, root: Path, ns: str, *args: str) -> None:
        argv = [sys.executable, "-m", "nwfilter.cli", "--root", str(root),
                "--backend", "nft", "--netns", ns, "-q", *args]
        proc = subprocess.run(argv, env=self.env, cwd=REPO, capture_output=True, text=True,
                              check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{' '.join(args)}: exit {proc.returncode}: {proc.stderr.strip()}")

    def daemon(self, root: Path, ns: str) -> tuple[subprocess.Popen[str], Path]:
        sock = root / "run" / "nwfilterd.sock"
        # Its log goes to a file: a pipe nobody reads would stop it once full.
        log_path = root.parent / "nwfilterd.log"
        with log_path.open("w") as log_file:
            proc = subprocess.Popen(
                [sys.executable, "-m", "nwfilter.daemon", "--root", str(root), "--backend",
                 "nft", "--netns", ns, "--workers", str(self.workers)],
                env=self.env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=log_file, text=True,
                start_new_session=True,  # Ctrl-C reaches this tool only; close() stops it
            )
        self.procs.append(proc)
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"nwfilterd exited: {log_path.read_text()[-2000:]}")
            if sock.is_socket():
                with contextlib.suppress(Exception), Client(sock, connect_timeout=1) as c:
                    c.call("filter.list")
                    return proc, sock
            if time.monotonic() > deadline:
                raise RuntimeError("nwfilterd did not answer within 60 s")
            time.sleep(0.05)


class Generations:
    """Counts nf_tables transactions in a namespace through `nft monitor`
    (one '# new generation N by process ID' line each; the ID is the
    kernel's task id, a thread's own for a threaded program), leaving out
    the marker transactions `sync` makes."""

    def __init__(self, bench: Bench, ns: str) -> None:
        self._bench = bench
        self._ns = ns
        self._lines: list[str] = []
        self._markers: set[int] = set()
        self._cond = threading.Condition()
        self._proc = subprocess.Popen(
            ["ip", "netns", "exec", ns, "nft", "monitor"], stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL, text=True, start_new_session=True,
        )
        bench.procs.append(self._proc)
        threading.Thread(target=self._read, daemon=True).start()
        self.sync()

    def _read(self) -> None:
        assert self._proc.stdout is not None
        for line in self._proc.stdout:
            with self._cond:
                self._lines.append(line)
                self._cond.notify_all()

    def sync(self) -> None:
        """Return once the monitor has printed every transaction made so far:
        make a marker transaction and wait for it (again while the monitor
        is not yet listening)."""
        deadline = time.monotonic() + 10
        while True:
            proc = subprocess.Popen(["ip", "netns", "exec", self._ns, "nft", "add table netdev "
                                     "nwbench_sync; delete table netdev nwbench_sync"])
            proc.wait()
            self._markers.add(proc.pid)
            retry = time.monotonic() + 0.2
            with self._cond:
                while not any(_by(line) == proc.pid for line in self._lines):
                    if time.monotonic() > deadline:
                        raise RuntimeError("nft monitor shows no event")
                    if not self._cond.wait(max(0.0, retry - time.monotonic())):
                        break
                else:
                    return

    def count(self) -> int:
        """Transactions seen so far, the markers left out."""
        with self._cond:
            return sum(1 for line in self._lines
                       if _by(line) is not None and _by(line) not in self._markers)


def _by(line: str) -> int | None:
    found = _GENERATION.match(line)
    return int(found.group(1)) if found else None


def timed_calls(n: int, call: Callable[[int], None]) -> list[float]:
    times = []
    for i in range(n):
        t0 = time.perf_counter()
        call(i)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def series_row(label: str, times: list[float]) -> str:
    marks = [f"{times[m - 1]:8.1f}" if m <= len(times) else f"{'-':>8}" for m in MARKS]
    return f"{label:<34} {len(times):>6} {' '.join(marks)} {statistics.fmean(times):8.1f}"


def phase_embedded(bench: Bench, n: int) -> list[float]:
    ns, root = bench.host("a")
    files = bench.tempdir("a-xml")
    for i in range(n):
        (files / f"tap{i}.xml").write_text(binding_xml(i))
    return timed_calls(n, lambda i: bench.cli(root, ns, "nwfilter-binding-create",
                                              str(files / f"tap{i}.xml")))


def phase_cli_daemon(bench: Bench, n: int) -> list[float]:
    ns, root = bench.host("b")
    files = bench.tempdir("b-xml")
    for i in range(n):
        (files / f"tap{i}.xml").write_text(binding_xml(i))
    proc, _sock = bench.daemon(root, ns)
    times = timed_calls(n, lambda i: bench.cli(root, ns, "nwfilter-binding-create",
                                               str(files / f"tap{i}.xml")))
    bench.stop(proc)
    return times


def phase_api_one(bench: Bench, n: int) -> tuple[list[float], Path]:
    ns, root = bench.host("c")
    _proc, sock = bench.daemon(root, ns)
    with Client(sock) as client:
        times = timed_calls(n, lambda i: client.call("binding.create", {"xml": [binding_xml(i)]}))
    return times, sock  # its daemon serves the nwfilter-list runs too


def together(clients: int, work: Callable[[int, Callable[[], None]], None],
             while_running: Callable[[], None] | None = None) -> float:
    """Run `work(k, go)` in `clients` threads; each calls `go()` once it is
    set up, and the clock starts when all have.  Seconds until every thread
    ended (after `while_running()`, run meanwhile, returns); the first
    failure of any thread is raised."""
    barrier = threading.Barrier(clients + 1)
    failures: list[BaseException] = []

    def go() -> None:
        barrier.wait(60)

    def run(k: int) -> None:
        try:
            work(k, go)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=run, args=(k,), daemon=True) for k in range(clients)]
    for t in threads:
        t.start()
    barrier.wait(60)
    t0 = time.perf_counter()
    if while_running is not None:
        while_running()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if failures:
        raise RuntimeError(f"{len(failures)} of {clients} threads failed: {failures[0]!r}")
    return elapsed


def phase_api_many(bench: Bench, n: int, clients: int) -> tuple[float, int, int]:
    """Seconds for n creates from `clients` clients, kernel transactions, requests."""
    ns, root = bench.host("d")
    _proc, sock = bench.daemon(root, ns)
    generations = Generations(bench, ns)
    before = generations.count()

    def work(k: int, go: Callable[[], None]) -> None:
        with Client(sock) as client:
            go()
            for i in range(k, n, clients):
                client.call("binding.create", {"xml": [binding_xml(i)]})

    elapsed = together(clients, work)
    generations.sync()
    return elapsed, generations.count() - before, n


def phase_engine_many(
    bench: Bench, n: int, clients: int, name: str = "f"
) -> tuple[float, int, int]:
    """Phase d without the daemon: `Engine.create_bindings` from `clients`
    threads in this process (what the commit itself costs)."""
    from nwfilter.backends.nft import NftBackend
    from nwfilter.conf import parse_binding
    from nwfilter.engine import Engine

    ns, root = bench.host(name)
    engine = Engine(root, NftBackend(netns=ns), stock_dir=REPO / "filters")
    engine.start()
    try:
        defs = [parse_binding(binding_xml(i)) for i in range(n)]

        def work(k: int, go: Callable[[], None]) -> None:
            go()
            for i in range(k, n, clients):
                engine.create_bindings([defs[i]])

        elapsed = together(clients, work)
        return elapsed, engine.create_queue.batches, engine.create_queue.requests
    finally:
        engine.backend.clear_all()
        engine.close()


def throughput(sock: Path, clients: int, seconds: float) -> float:
    counts = [0] * clients
    stop = threading.Event()

    def work(k: int, go: Callable[[], None]) -> None:
        with Client(sock) as client:
            go()
            while not stop.is_set():
                client.call("filter.list")
                counts[k] += 1

    def measure() -> None:
        time.sleep(seconds)
        stop.set()

    elapsed = together(clients, work, measure)
    return sum(counts) / elapsed

@contextlib.contextmanager
def cleaned_up(bench: Bench) -> Iterator[None]:
    """Run the body; clean up on return, error, Ctrl-C or SIGTERM."""
    def terminate(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    except KeyboardInterrupt:
        print("interrupted; cleaning up", file=sys.stderr)
        raise
    finally:
        bench.close()
        signal.signal(signal.SIGTERM, old)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=1000, help="ports per phase")
    parser.add_argument("--embedded-calls", type=int, default=None,
                        help="ports for the embedded command line (default: --calls)")
    parser.add_argument("--cli-calls", type=int, default=None,
                        help="ports for the command line through nwfilterd (default: --calls)")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--seconds", type=float, default=3.0,
                        help="length of each nwfilter-list run")
    parser.add_argument("--workers", type=int, default=8, help="nwfilterd --workers")
    parser.add_argument("--skip", default="", help="phases to skip, e.g. 'ab' or 'acdef'")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("needs root (network namespaces)", file=sys.stderr)
        return 2
    n = args.calls
    bench = Bench(args.workers)
    rows: list[str] = []
    with cleaned_up(bench):
        head = f"{'binding-create, one port per call':<34} {'calls':>6} " + " ".join(
            f"{f'#{m} ms':>8}" for m in MARKS) + f" {'mean ms':>8}"
        if "a" not in args.skip:
            rows.append(series_row("a. CLI, embedded engine",
                                   phase_embedded(bench, args.embedded_calls or n)))
            print(rows[-1], flush=True)
        if "b" not in args.skip:
            times = phase_cli_daemon(bench, args.cli_calls or n)
            rows.append(series_row("b. CLI, through nwfilterd", times))
            print(rows[-1], flush=True)
        sock: Path | None = None
        if "c" not in args.skip:
            times, sock = phase_api_one(bench, n)
            rows.append(series_row("c. API, 1 client", times))
            print(rows[-1], flush=True)
        lines: list[str] = []
        if "d" not in args.skip:
            elapsed, transactions, requests = phase_api_many(bench, n, args.clients)
            lines.append(
                f"d. API, {args.clients} clients: {requests} ports in {elapsed * 1000:.0f} ms = "
                f"{elapsed * 1000 / requests:.2f} ms per port, {transactions} kernel "
                f"transactions (nwfilterd --workers {args.workers})")
            print(lines[-1], flush=True)
        rates: list[tuple[int, float]] = []
        if "e" not in args.skip:
            if sock is None:  # phase c's daemon serves it when c runs
                ns, root = bench.host("e")
                _proc, sock = bench.daemon(root, ns)
            rates = [(c, throughput(sock, c, args.seconds)) for c in (1, 8, 64)]
        if "f" not in args.skip:
            elapsed, batches, requests = phase_engine_many(bench, n, args.clients)
            lines.append(
                f"f. Engine.create_bindings in process, {args.clients} threads: {requests} "
                f"ports in {elapsed * 1000:.0f} ms = {elapsed * 1000 / requests:.2f} ms per "
                f"port, {batches} kernel transactions")
            print(lines[-1], flush=True)
        print()
        if rows:
            print(head)
            for row in rows:
                print(row)
        for line in lines:
            print(line)
        if rates:
            print()
            print(f"{'e. nwfilter-list (filter.list) via nwfilterd':<46} {'req/s':>8}")
            for clients, rate in rates:
                print(f"   {clients:>2} concurrent client(s){'':<23} {rate:8.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
