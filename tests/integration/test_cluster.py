"""Three hosts sharing one filter pool through a real 3-member etcd cluster.

The etcd members are real `etcd` processes on free loopback ports
(`nwfilter.etcdlab`), started once for the module and killed by pid at
its end; each test keeps its keys under a prefix of its own.  Each host is
an in-process `nwfilterd` (`serve(..., cluster=...)`) with its own state
root: the memory backend where only the pool matters, the nft backend in
a network namespace of its own where the kernel's rules are checked.
"""

from __future__ import annotations

import itertools
import json
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("etcd3gw")
if shutil.which("etcd") is None:  # pragma: no cover - tools/install.sh installs it
    pytest.skip("etcd is not installed (Debian package etcd-server)", allow_module_level=True)

from nwfilter.client import Client
from nwfilter.cluster.config import ClusterConfig, parse_endpoints
from nwfilter.cluster.member import ClusterMember
from nwfilter.cluster.store import EtcdStore
from nwfilter.daemon import Server, close, serve
from nwfilter.errors import InUseError, NwfilterError, UnavailableError
from nwfilter.etcdlab import EtcdLab
from nwfilter.netlab import NetLab
from nwfilter.render_text import render_text

WEB_UUID = "6f0e5a52-1c11-4c6e-9f3d-111111111111"


def web(port: int, name: str = "web", uuid: str = WEB_UUID) -> str:
    return (f"<filter name='{name}' chain='ipv4' priority='-700'><uuid>{uuid}</uuid>"
            f"<rule action='accept' direction='in' priority='500'>"
            f"<tcp dstportstart='{port}'/></rule></filter>")


def binding(portdev: str, filter_name: str = "web", n: int = 1) -> str:
    return (f"<filterbinding><owner><name>vm{n}</name>"
            f"<uuid>c2a3f1a2-8d4e-4a51-9a9e-2f6f1d8e7a{n:02x}</uuid></owner>"
            f"<portdev name='{portdev}'/><mac address='52:54:00:00:00:{n:02x}'/>"
            f"<filterref filter='{filter_name}'/></filterbinding>")


_prefixes = itertools.count()


@pytest.fixture(scope="module")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EtcdLab]:
    with EtcdLab(tmp_path_factory.mktemp("etcd")) as lab:
        yield lab


@dataclass
class Host:
    name: str
    root: Path
    server: Server
    thread: threading.Thread

    @property
    def member(self) -> ClusterMember:
        member = self.server.context.member
        assert member is not None
        return member

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        with Client(self.server.path) as client:
            return client.call(method, params)

    def rules(self, portdev: str) -> str:
        return render_text(self.server.engine.backend.recorded()[portdev])


class Cluster:
    """Hosts of one test, all under one key prefix; stopped at the end."""

    def __init__(self, etcd: EtcdLab, tmp: Path) -> None:
        self.etcd = etcd
        self.tmp = tmp
        self.prefix = f"/t{next(_prefixes)}-{time.monotonic_ns()}/"
        self.hosts: dict[str, Host] = {}

    def config(self, name: str, urls: list[str] | None = None) -> ClusterConfig:
        return ClusterConfig(parse_endpoints(",".join(urls or self.etcd.urls)), host=name,
                             prefix=self.prefix, ttl=2, timeout=1.0)

    def start(self, name: str, *, backend: str = "memory", netns: str | None = None,
              urls: list[str] | None = None) -> Host:
        root = self.tmp / name
        srv = serve(root, backend, netns, self.tmp / f"{name}.sock",
                    cluster=self.config(name, urls))
        thread = threading.Thread(target=srv.serve_forever, daemon=True)
        thread.start()
        host = Host(name, root, srv, thread)
        self.hosts[name] = host
        return host

    def stop(self, name: str, *, revoke: bool = True) -> None:
        host = self.hosts.pop(name)
        host.server.shutdown()
        if host.server.context.member is not None and not revoke:
            host.server.context.member.stop(revoke=False)
            host.server.context.member = None
        if host.server.engine.backend.name == "nft":
            host.server.engine.backend.clear_all()
        close(host.server)
        host.thread.join(5)

    def store(self) -> EtcdStore:
        return EtcdStore(self.config("tester"))

    def close(self) -> None:
        for name in list(self.hosts):
            self.stop(name)


@pytest.fixture
def cluster(etcd: EtcdLab, tmp_path: Path) -> Iterator[Cluster]:
    made = Cluster(etcd, tmp_path)
    try:
        yield made
    finally:
        made.close()


def eventually(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.02)
    return check()


def has(host: Host, name: str, text: str) -> bool:
    fdef = host.server.engine.pool.get(name)
    return fdef is not None and text in host.call("filter.dumpxml", {"name": name})


@pytest.mark.root
@pytest.mark.netns
def test_a_define_on_one_host_is_in_force_on_every_hosts_ports(cluster: Cluster) -> None:
    with NetLab() as lab:
        hosts = [cluster.start(f"h{i}", backend="nft", netns=lab.add_ns(f"h{i}"))
                 for i in range(3)]
        hosts[0].call("filter.define", {"xml": web(8080)})
        for host in hosts:
            assert eventually(lambda host=host: has(host, "web", "8080"))  # type: ignore[misc]
            host.call("binding.create", {"xml": [binding("vnet0")]})
        hosts[0].call("filter.define", {"xml": web(9090)})

        def in_force(ns: str) -> bool:
            ruleset = lab.run(ns, ["nft", "list", "ruleset"]).stdout
            return "9090" in ruleset and "8080" not in ruleset

        for host in hosts:
            assert host.server.engine.backend.netns is not None
            assert eventually(lambda ns=host.server.engine.backend.netns: in_force(ns))
        # The stock filters came along: the first host seeded the empty pool.
        assert "clean-traffic" in {row["name"] for row in hosts[2].call("filter.list")}
        cluster.close()


def test_concurrent_defines_of_one_filter_one_result_per_revision(cluster: Cluster) -> None:
    hosts = [cluster.start(f"h{i}") for i in range(3)]
    hosts[0].call("filter.define", {"xml": web(1000)})
    assert all(eventually(lambda h=h: has(h, "web", "1000")) for h in hosts)
    store = cluster.store()
    start, _ = store.range(cluster.prefix)
    ports = [2001, 2002, 2003]
    barrier = threading.Barrier(3)
    errors: list[BaseException] = []

    def define(host: Host, port: int) -> None:
        barrier.wait()
        try:
            host.call("filter.define", {"xml": web(port)})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=define, args=(h, p)) for h, p in zip(hosts, ports,
                                                                            strict=True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert errors == []
    # The key's history: each define is a revision of its own, none lost.
    seen: list[tuple[int, str]] = []
    stopped = threading.Event()
    for batch in store.watch(cluster.prefix + "pool/web", start + 1, stopped):
        seen.extend((e.kv.mod_revision, e.kv.value.decode()) for e in batch.events)
        if len(seen) >= 3:
            break
    assert len({rev for rev, _ in seen}) == 3
    assert sorted(int(text.split("dstportstart='")[1].split("'")[0]) for _, text in seen) \
        == ports
    last = seen[-1][1].split("dstportstart='")[1].split("'")[0]
    assert all(eventually(lambda h=h: has(h, "web", last)) for h in hosts)


def test_killing_one_etcd_member_does_not_stop_defines(cluster: Cluster) -> None:
    hosts = [cluster.start(f"h{i}") for i in range(3)]
    cluster.etcd.kill(0)  # every host's first endpoint
    try:
        hosts[1].call("filter.define", {"xml": web(3030)})
        assert all(eventually(lambda h=h: has(h, "web", "3030")) for h in hosts)
    finally:
        cluster.etcd.start_member(0)


def test_a_host_that_was_down_catches_up_from_its_revision(cluster: Cluster) -> None:
    hosts = [cluster.start(f"h{i}") for i in range(3)]
    hosts[0].call("filter.define", {"xml": web(4000)})
    assert eventually(lambda: has(hosts[2], "web", "4000"))
    cluster.stop("h2")
    for port in (4001, 4002, 4003):
        hosts[0].call("filter.define", {"xml": web(port)})
    hosts[1].call("filter.define", {"xml": web(4100, "other",
                                              "6f0e5a52-1c11-4c6e-9f3d-222222222222")})
    back = cluster.start("h2")
    assert has(back, "web", "4003") and has(back, "other", "4100")
    assert back.member.full_compares == 0  # resumed from its recorded revision


def test_a_compacted_history_triggers_the_full_compare(cluster: Cluster) -> None:
    hosts = [cluster.start(f"h{i}") for i in range(2)]
    hosts[0].call("filter.define", {"xml": web(5000)})
    assert eventually(lambda: has(hosts[1], "web", "5000"))
    cluster.stop("h1")
    hosts[0].call("filter.define", {"xml": web(5001)})
    hosts[0].call("filter.undefine", {"name": "allow-arp"})
    store = cluster.store()
    revision, _ = store.range(cluster.prefix)
    store.compact(revision)
    back = cluster.start("h1")
    assert back.member.full_compares == 1
    assert has(back, "web", "5001")
    assert back.server.engine.pool.get("allow-arp") is None


def test_a_partitioned_host_keeps_filtering_and_refuses_defines(cluster: Cluster) -> None:
    hosts = [cluster.start(f"h{i}") for i in range(2)]
    # The third host reaches etcd through member 2 only.
    cut = cluster.start("h2", urls=[cluster.etcd.urls[2]])
    hosts[0].call("filter.define", {"xml": web(6000)})
    assert eventually(lambda: has(cut, "web", "6000"))
    cut.call("binding.create", {"xml": [binding("vnet0")]})
    before = cut.rules("vnet0")
    cluster.etcd.kill(2)
    try:
        with pytest.raises(UnavailableError, match=r"cannot define filter 'web'.*keeps its rules"):
            cut.call("filter.define", {"xml": web(6001)})
        # Reads come from the host's copy; its port keeps its rules.
        assert has(cut, "web", "6000")
        assert cut.rules("vnet0") == before and "6000" in before
        # The other hosts still define: two of three members are a quorum.
        hosts[1].call("filter.define", {"xml": web(6002)})
        assert eventually(lambda: has(hosts[0], "web", "6002"))
        assert cut.call("cluster.status")["error"]
    finally:
        cluster.etcd.start_member(2)
    # Back in touch: it catches up and applies the edit it missed.
    assert eventually(lambda: has(cut, "web", "6002"), 20)
    assert eventually(lambda: "6002" in cut.rules("vnet0"))


def test_a_bad_document_is_refused_and_the_last_good_one_kept(cluster: Cluster) -> None:
    hosts = [cluster.start(f"h{i}") for i in range(2)]
    hosts[0].call("filter.define", {"xml": web(7000)})
    assert eventually(lambda: has(hosts[1], "web", "7000"))
    hosts[1].call("binding.create", {"xml": [binding("vnet0")]})
    store = cluster.store()
    bad_revision = store.put(cluster.prefix + "pool/web", b"<filter name='web'><rule")
    store.put(cluster.prefix + "pool/loop", web(1, "loop", "6f0e5a52-1c11-4c6e-9f3d-333333333333")
              .replace("</filter>", "<filterref filter='loop'/></filter>").encode())
    assert eventually(lambda: hosts[1].member.applied > bad_revision)
    assert has(hosts[1], "web", "7000") and "7000" in hosts[1].rules("vnet0")
    assert hosts[1].server.engine.pool.get("loop") is None
    reasons = {b.revision: b.reason for b in hosts[1].member.bad}
    assert bad_revision in reasons and "loop" in "".join(reasons.values())

    def reported() -> bool:
        rows = {r["host"]: r for r in hosts[0].call("cluster.status")["hosts"]}
        return bad_revision in {b["revision"] for b in rows["h1"]["bad"]}

    assert eventually(reported)


def test_an_undefine_another_host_needs_is_refused_naming_it(cluster: Cluster) -> None:
    hosts = [cluster.start(f"h{i}") for i in range(2)]
    hosts[0].call("filter.define", {"xml": web(8000)})
    assert eventually(lambda: has(hosts[1], "web", "8000"))
    hosts[1].call("binding.create", {"xml": [binding("vnet0")]})

    def refused() -> bool:
        try:
            hosts[0].call("filter.undefine", {"name": "web"})
        except InUseError as exc:
            assert "host 'h1'" in exc.message
            return True
        return False

    assert eventually(refused)
    hosts[1].call("binding.delete", {"portdev": "vnet0"})
    assert eventually(lambda: _undefined(hosts[0]))
    assert eventually(lambda: hosts[1].server.engine.pool.get("web") is None)


def _undefined(host: Host) -> bool:
    try:
        host.call("filter.undefine", {"name": "web"})
    except InUseError:
        return False
    return True


def test_a_dead_host_is_shown_gone_when_its_lease_expires(cluster: Cluster) -> None:
    hosts = [cluster.start(f"h{i}") for i in range(2)]
    hosts[0].call("filter.define", {"xml": web(9000)})

    def states() -> dict[str, Any]:
        return {r["host"]: r for r in hosts[0].call("cluster.status")["hosts"]}

    assert eventually(lambda: states().get("h1", {}).get("lag") == 0)
    assert states()["h1"]["alive"] is True
    cluster.stop("h1", revoke=False)  # dies: nobody revokes its lease
    assert eventually(lambda: states()["h1"]["alive"] is False, 10)
    assert states()["h0"]["alive"] is True


def test_cluster_status_on_the_command_line(
    cluster: Cluster, capsys: pytest.CaptureFixture[str]
) -> None:
    from nwfilter.cli import main

    hosts = [cluster.start(f"h{i}") for i in range(2)]
    hosts[0].call("filter.define", {"xml": web(9500)})
    assert eventually(lambda: has(hosts[1], "web", "9500"))
    sock = str(hosts[0].server.path)

    def rows() -> dict[str, Any]:
        capsys.readouterr()
        assert main(["-c", sock, "cluster", "status", "--json"]) == 0
        data = json.loads(capsys.readouterr().out)
        return {r["host"]: r for r in data["hosts"]}

    assert eventually(lambda: rows()["h1"]["lag"] == 0)
    assert rows()["h0"]["alive"] is True
    assert main(["-c", sock, "cluster", "status"]) == 0
    out = capsys.readouterr().out
    assert f"(prefix {cluster.prefix}), seen from host h0" in out
    assert any(line.split()[:2] == ["h1", "alive"] for line in out.splitlines())


def test_tls_with_client_certificates(tmp_path: Path) -> None:
    """Members that demand client certificates: hosts with the CA and a
    client certificate share the pool; a host without one is refused."""
    from nwfilter.etcdlab import make_tls

    tls = make_tls(tmp_path / "tls")
    with EtcdLab(tmp_path / "etcd", members=1, tls=tls) as lab:
        urls = ",".join(lab.urls)
        assert urls.startswith("https://")

        def config(name: str, *, cert: bool = True) -> ClusterConfig:
            return ClusterConfig(
                parse_endpoints(urls), host=name, prefix="/tls/", ttl=2, timeout=1.0,
                ca_cert=tls.ca_cert, cert=tls.client_cert if cert else None,
                key=tls.client_key if cert else None,
            )

        hosts = []
        try:
            for name in ("h1", "h2"):
                srv = serve(tmp_path / name, "memory", None, tmp_path / f"{name}.sock",
                            cluster=config(name))
                thread = threading.Thread(target=srv.serve_forever, daemon=True)
                thread.start()
                hosts.append(Host(name, tmp_path / name, srv, thread))
            hosts[0].call("filter.define", {"xml": web(8443)})
            assert eventually(lambda: has(hosts[1], "web", "8443"))
            # No client certificate: etcd refuses the connection, so no define.
            with pytest.raises(NwfilterError):
                EtcdStore(config("h3", cert=False)).get("/tls/head")
        finally:
            for host in hosts:
                host.server.shutdown()
                close(host.server)
                host.thread.join(5)


def test_a_command_without_the_daemon_does_not_change_a_clustered_pool(
    cluster: Cluster, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from nwfilter.cli import main

    host = cluster.start("h1")
    cluster.stop("h1")
    path = tmp_path / "web.xml"
    path.write_text(web(8081))
    status = main(["--root", str(host.root), "nwfilter-define", str(path)])
    err = capsys.readouterr().err
    assert status == 4 and "shared through etcd" in err, err
    assert main(["--root", str(host.root), "nwfilter-list"]) == 0  # reads are fine
