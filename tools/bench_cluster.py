"""Benchmark of the cluster: how fast a define is in force on every host.

Starts a real 3-member etcd cluster on loopback (`nwfilter.etcdlab`, data
under a temporary directory, members killed by pid at the end) and
`--hosts` in-process nwfilterd daemons (default 3) joined to it, each with
its own state root and its own network namespace (`NetLab`, nft backend),
each with `--ports` bindings (default 100) of one filter `web`.

Figures:
  a. define on host 1 -> in force on every host's ports: from the call on
     host 1 to the last host's `filter-defined` event (published once the
     kernel holds the rebuilt rules of all its ports), over `--edits`
     redefinitions of `web` (default 50): p50, p95, max;
  b. catch-up: one host stopped, `--missed` edits (default 100) made on
     host 1, the host started again: seconds from its cluster member's
     start until it had applied the pool's head (it resumes from its
     recorded revision: one watch, one kernel transaction), and the whole
     `serve()` (engine start with its ports included).

Prints figures, asserts nothing.  Needs root and the `etcd` binary
(Debian's etcd-server).

Usage: python tools/bench_cluster.py [--hosts N] [--ports N] [--edits N] [--missed N]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from nwfilter.client import Client  # noqa: E402
from nwfilter.cluster.config import ClusterConfig, parse_endpoints  # noqa: E402
from nwfilter.daemon import Server, close, serve  # noqa: E402
from nwfilter.etcdlab import EtcdLab  # noqa: E402
from nwfilter.events import EventKind  # noqa: E402
from nwfilter.netlab import NetLab  # noqa: E402

UUID = "6f0e5a52-1c11-4c6e-9f3d-111111111111"


def web(port: int) -> str:
    return (f"<filter name='web' chain='ipv4' priority='-700'><uuid>{UUID}</uuid>"
            f"<rule action='accept' direction='in' priority='500'>"
            f"<tcp dstportstart='{port}'/></rule></filter>")


def binding(i: int) -> str:
    return (f"<filterbinding><owner><name>vm{i}</name>"
            f"<uuid>c2a3f1a2-8d4e-4a51-9a9e-{i:012x}</uuid></owner>"
            f"<portdev name='vnet{i}'/><mac address='52:54:00:00:{i // 256:02x}:{i % 256:02x}'/>"
            f"<filterref filter='web'/></filterbinding>")


class Host:
    def __init__(self, name: str, tmp: Path, netns: str, urls: str, prefix: str) -> None:
        self.name, self.tmp, self.netns = name, tmp, netns
        self.config = ClusterConfig(parse_endpoints(urls), host=name, prefix=prefix)
        self.server: Server | None = None
        self.thread: threading.Thread | None = None
        self.defined = threading.Condition()
        self.seen: dict[str, float] = {}

    def start(self) -> float:
        began = time.perf_counter()
        self.server = serve(self.tmp / self.name, "nft", self.netns,
                            self.tmp / f"{self.name}.sock", cluster=self.config)
        took = time.perf_counter() - began
        subscription = self.server.engine.events.subscribe(
            frozenset({EventKind.FILTER_DEFINED}))

        def wake() -> None:
            now = time.perf_counter()
            taken, _ = subscription.take(64)
            with self.defined:
                for event in taken:
                    self.seen[str(event.details.get("uuid", ""))] = now
                    self.seen["last"] = now
                self.defined.notify_all()

        subscription.attach(wake)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        return took

    def call(self, method: str, params: dict[str, object]) -> object:
        assert self.server is not None
        with Client(self.server.path) as client:
            return client.call(method, params)

    def wait_after(self, since: float, timeout: float = 30.0) -> float:
        with self.defined:
            self.defined.wait_for(lambda: self.seen.get("last", 0.0) >= since, timeout)
            return self.seen.get("last", 0.0)

    def stop(self) -> None:
        if self.server is None:
            return
        self.server.shutdown()
        self.server.engine.backend.clear_all()
        close(self.server)
        self.server = None


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hosts", type=int, default=3)
    parser.add_argument("--ports", type=int, default=100)
    parser.add_argument("--edits", type=int, default=50)
    parser.add_argument("--missed", type=int, default=100)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="nwbench-", dir="/var/tmp") as tmp_name, \
            NetLab() as lab:
        tmp = Path(tmp_name)
        with EtcdLab(tmp / "etcd") as etcd:
            prefix = f"/bench-{int(time.time())}/"
            hosts = [Host(f"h{i}", tmp, lab.add_ns(f"h{i}"), ",".join(etcd.urls), prefix)
                     for i in range(args.hosts)]
            try:
                for host in hosts:
                    host.start()
                hosts[0].call("filter.define", {"xml": web(1)})
                for host in hosts:
                    deadline = time.monotonic() + 30
                    while host.server is not None and host.server.engine.pool.get("web") is None:
                        if time.monotonic() > deadline:
                            raise SystemExit(f"{host.name} never got filter web")
                        time.sleep(0.01)
                    host.call("binding.create",
                              {"xml": [binding(i) for i in range(args.ports)]})
                print(f"{args.hosts} hosts, {args.ports} bound ports each, etcd "
                      f"{len(etcd.members)} members")
                latencies = []
                for edit in range(args.edits):
                    began = time.perf_counter()
                    hosts[0].call("filter.define", {"xml": web(10000 + edit)})
                    latencies.append(max(h.wait_after(began) for h in hosts) - began)
                ms = [v * 1000 for v in latencies]
                print(f"a. define -> in force on every host's ports, {args.edits} edits: "
                      f"p50 {pct(ms, 0.5):.0f} ms, p95 {pct(ms, 0.95):.0f} ms, "
                      f"max {max(ms):.0f} ms, mean {statistics.mean(ms):.0f} ms")
                last = hosts[-1]
                last.stop()
                for edit in range(args.missed):
                    hosts[0].call("filter.define", {"xml": web(20000 + edit)})
                took = last.start()
                assert last.server is not None and last.server.context.member is not None
                member = last.server.context.member
                fdef = last.server.engine.pool.get("web")
                ok = fdef is not None and f"{20000 + args.missed - 1}" in str(fdef)
                print(f"b. catch-up of a host that missed {args.missed} edits: "
                      f"{(member.caught_up_after or 0) * 1000:.0f} ms from its cluster "
                      f"member's start ({member.full_compares} full compares); serve() "
                      f"with the engine's start of {args.ports} ports {took * 1000:.0f} ms; "
                      f"has the last edit: {ok}")
            finally:
                for host in hosts:
                    host.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
