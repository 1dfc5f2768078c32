#!/usr/bin/env python3
"""Flood a throwaway `nwfilterd` (memory backend) and report what it costs.

    tools/flood_daemon.py idle --count 20000
    tools/flood_daemon.py partial --count 150 --size 4194303
    tools/flood_daemon.py concurrent --count 30

`idle` opens COUNT connections that never send; `partial` opens COUNT
connections that each send SIZE bytes without a newline; `concurrent` runs
COUNT clients at once, each one request.  While the flood holds, a further
client asks for `filter.list`; then the daemon gets SIGTERM.  Printed: the
daemon's peak RSS (VmHWM) and peak thread count, whether the extra client
was served, and how long the daemon took to exit.  `--tree DIR` runs the
daemon from another checkout (for before/after figures).  The daemon and the
flood use only a temporary directory and the socket in it.
"""

from __future__ import annotations

import argparse
import errno
import json
import os
import resource
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path


def proc_status(pid: int) -> dict[str, str]:
    fields: dict[str, str] = {}
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
    except OSError:
        pass
    return fields


class Sampler(threading.Thread):
    """Polls the daemon's thread count and RSS until stopped."""

    def __init__(self, pid: int) -> None:
        super().__init__(daemon=True)
        self.pid = pid
        self.max_threads = 0
        self.max_rss_kb = 0
        self.hwm_kb = 0
        self.stopped = threading.Event()

    def run(self) -> None:
        while not self.stopped.wait(0.05):
            status = proc_status(self.pid)
            if not status:
                return
            self.max_threads = max(self.max_threads, int(status.get("Threads", "0")))
            self.max_rss_kb = max(self.max_rss_kb, int(status.get("VmRSS", "0 kB").split()[0]))
            self.hwm_kb = max(self.hwm_kb, int(status.get("VmHWM", "0 kB").split()[0]))


def ask(path: Path, timeout: float) -> str:
    """One `filter.list` request on a fresh connection: 'ok (N ms)' or the failure."""
    start = time.monotonic()
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            connect_patiently(sock, path, timeout)
            sock.sendall(b'{"id":1,"method":"filter.list","params":{}}\n')
            line = sock.makefile("rb").readline()
        reply = json.loads(line)
    except (OSError, ValueError) as exc:
        return f"failed after {time.monotonic() - start:.1f} s: {exc}"
    if "result" not in reply:
        return f"error reply: {reply.get('error')}"
    return f"ok ({(time.monotonic() - start) * 1000:.0f} ms)"


def start_daemon(tree: Path, tmp: Path) -> tuple[subprocess.Popen[bytes], Path]:
    sock_path = tmp / "d.sock"
    env = dict(os.environ, PYTHONPATH=str(tree))
    with open(tmp / "daemon.log", "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nwfilter.daemon", "--backend", "memory",
             "--root", str(tmp / "root"), "--socket", str(sock_path)],
            env=env, stdout=subprocess.DEVNULL, stderr=log,
        )
    deadline = time.monotonic() + 30
    while not ask(sock_path, 2).startswith("ok"):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"daemon did not start: {(tmp / 'daemon.log').read_text()}")
        time.sleep(0.1)
    return proc, sock_path


def connect_patiently(sock: socket.socket, path: Path, timeout: float) -> None:
    """Connect, waiting while the daemon's listen queue is full."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            sock.connect(str(path))
            return
        except BlockingIOError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.001)


def flood_idle(path: Path, count: int, holders: list[socket.socket]) -> Counter[str]:
    outcome: Counter[str] = Counter()
    # keep descriptors for the extra client and /proc reads of this process
    room = resource.getrlimit(resource.RLIMIT_NOFILE)[0] - 64
    if count > room:
        outcome[f"capped at {room} by this process's RLIMIT_NOFILE"] += 1
    for _ in range(min(count, room)):
        try:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:
            outcome[f"stopped: {exc.strerror} in this process"] += 1
            break
        sock.settimeout(10)
        try:
            connect_patiently(sock, path, 10)
        except OSError as exc:
            sock.close()
            outcome[errno.errorcode.get(exc.errno or 0, str(exc))] += 1
            if exc.errno == errno.EMFILE:
                break
            continue
        outcome["connected"] += 1
        holders.append(sock)
    return outcome


def flood_partial(path: Path, count: int, size: int,
                  holders: list[socket.socket]) -> Counter[str]:
    outcome: Counter[str] = Counter()
    chunk = b" " * 65536
    for _ in range(count):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(10)
        try:
            connect_patiently(sock, path, 10)
            sent = 0
            while sent < size:
                sent += sock.send(chunk[: size - sent])
        except OSError as exc:
            outcome[f"send: {errno.errorcode.get(exc.errno or 0, str(exc))}"] += 1
        else:
            outcome["sent whole"] += 1
        holders.append(sock)
    return outcome


def concurrent(path: Path, count: int) -> Counter[str]:
    results: list[str] = []
    barrier = threading.Barrier(count)

    def one() -> None:
        barrier.wait()
        results.append(ask(path, 30).split(" ")[0])

    threads = [threading.Thread(target=one) for _ in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return Counter(results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("mode", choices=["idle", "partial", "concurrent"])
    parser.add_argument("--count", type=int, required=True)
    # 4 MiB - 1: the longest partial line a daemon must hold (4 MiB with
    # its newline is the line limit)
    parser.add_argument("--size", type=int, default=4 * 1024 * 1024 - 1)
    parser.add_argument("--tree", type=Path, default=Path(__file__).resolve().parent.parent)
    parser.add_argument("--exit-wait", type=float, default=120.0)
    args = parser.parse_args()
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    old_umask = os.umask(0o077)
    with tempfile.TemporaryDirectory(prefix="nwfilter-flood-") as name:
        os.umask(old_umask)
        tmp = Path(name)
        proc, path = start_daemon(args.tree, tmp)
        base = proc_status(proc.pid)
        sampler = Sampler(proc.pid)
        sampler.start()
        holders: list[socket.socket] = []
        start = time.monotonic()
        try:
            if args.mode == "idle":
                outcome = flood_idle(path, args.count, holders)
            elif args.mode == "partial":
                outcome = flood_partial(path, args.count, args.size, holders)
            else:
                outcome = concurrent(path, args.count)
            flood_s = time.monotonic() - start
            time.sleep(0.5)
            extra = ask(path, 10)
            status = proc_status(proc.pid)
            t0 = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(args.exit_wait)
                exit_s = f"{time.monotonic() - t0:.2f} s (status {proc.returncode})"
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                exit_s = f"did not exit within {args.exit_wait:.0f} s (killed)"
        finally:
            sampler.stopped.set()
            for sock in holders:
                sock.close()
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        log_lines = (tmp / "daemon.log").read_text(errors="replace").splitlines()
    print(f"tree: {args.tree}")
    print(f"flood: {args.mode} x {args.count}" + (f" ({args.size} bytes each)"
                                                 if args.mode == "partial" else ""))
    print(f"flood outcome: {dict(outcome)} in {flood_s:.1f} s")
    print(f"daemon before flood: VmRSS {base.get('VmRSS')}, threads {base.get('Threads')}")
    print(f"daemon under flood: VmRSS {status.get('VmRSS')}, threads {status.get('Threads')}")
    print(f"peak: VmHWM {max(sampler.hwm_kb, 0) // 1024} MiB, "
          f"max threads {sampler.max_threads}")
    print(f"extra client during flood: {extra}")
    print(f"exit after SIGTERM: {exit_s}")
    tracebacks = sum(1 for line in log_lines if line.startswith("Traceback"))
    print(f"daemon log: {len(log_lines)} lines, {tracebacks} tracebacks")
    return 0


if __name__ == "__main__":
    sys.exit(main())
