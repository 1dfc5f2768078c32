"""Access control of nwfilterd, with real unprivileged users.

Each test creates throwaway system accounts (a group, a member of it and
a user outside it; unique names, removed even on failure) and runs
`nwfilterd` (memory backend) as root in a subprocess.  The command line
runs as those users in a forked child of this process that drops its
privileges and calls `nwfilter.cli.main`: the interpreter's own files need
not be reachable by them.
"""

from __future__ import annotations

import contextlib
import grp
import os
import pwd
import secrets
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

import nwfilter
import nwfilter.api
import nwfilter.cli
import nwfilter.client
import nwfilter.commands.context
from nwfilter.client import Client
from nwfilter.errors import ErrorCode, NwfilterError

pytestmark = pytest.mark.root

TREE = Path(nwfilter.__file__).parent.parent
FILTER = (
    "<filter name='web' chain='ipv4'>"
    "<rule action='accept' direction='in'><tcp dstportstart='81'/></rule></filter>"
)


@dataclass(frozen=True)
class Accounts:
    group: str
    gid: int
    member: str  # in `group`
    other: str  # not in it


def _run(argv: list[str]) -> None:
    subprocess.run(argv, check=True, capture_output=True, timeout=60)


@pytest.fixture
def accounts() -> Iterator[Accounts]:
    tag = secrets.token_hex(3)
    group, member, other = f"nwfg{tag}", f"nwfm{tag}", f"nwfo{tag}"
    users: list[str] = []
    groups: list[str] = []
    try:
        _run(["groupadd", "-r", group])
        groups.append(group)
        for user, extra in ((member, ["-G", group]), (other, [])):
            _run(["useradd", "-r", "-M", "-s", "/usr/sbin/nologin", *extra, user])
            users.append(user)
        yield Accounts(group, grp.getgrnam(group).gr_gid, member, other)
    finally:
        for user in users:
            subprocess.run(["userdel", user], capture_output=True, timeout=60)
        for name in groups:
            subprocess.run(["groupdel", name], capture_output=True, timeout=60)


@pytest.fixture
def place() -> Iterator[Path]:
    """A directory every user can reach (pytest's own is root's, mode 0700)."""
    path = Path(tempfile.mkdtemp(prefix="nwf-access-", dir="/tmp"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@dataclass
class Result:
    status: int
    out: str
    err: str
    pid: int


def run_as(user: str, argv: list[str]) -> Result:
    """`nwfilter ARGV` as `user` (its groups too), in a forked child."""
    nwfilter.cli.build_parser()  # loads what the child cannot read any more
    entry = pwd.getpwnam(user)
    groups = os.getgrouplist(user, entry.pw_gid)
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        status = 99
        try:
            os.close(out_r)
            os.close(err_r)
            sys.stdout = open(out_w, "w", encoding="utf-8")  # noqa: SIM115
            sys.stderr = open(err_w, "w", encoding="utf-8")  # noqa: SIM115
            os.setgroups(groups)
            os.setgid(entry.pw_gid)
            os.setuid(entry.pw_uid)
            status = nwfilter.cli.main(argv)
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            with contextlib.suppress(Exception):
                sys.stdout.flush()
                sys.stderr.flush()
            os._exit(status)
    os.close(out_w)
    os.close(err_w)
    with open(out_r, encoding="utf-8") as out_file, open(err_r, encoding="utf-8") as err_file:
        out, err = out_file.read(), err_file.read()
    _, wait_status = os.waitpid(pid, 0)
    return Result(os.waitstatus_to_exitcode(wait_status), out, err, pid)


class Daemon:
    def __init__(self, place: Path, *options: str) -> None:
        self.root = place / "root"
        self.admin = self.root / "run" / "nwfilterd.sock"
        self.ro = self.root / "run" / "nwfilterd-ro.sock"
        self.log = place / "nwfilterd.log"
        config = place / "nwfilterd.conf"
        config.write_text("")
        env = {**os.environ, "PYTHONPATH": str(TREE)}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "nwfilter.daemon", "--config", str(config),
                 "--root", str(self.root), "--backend", "memory", *options],
                stdout=log, stderr=log, env=env,
            )
        deadline = time.monotonic() + 60
        while not (self.ro.is_socket() and "listening on" in self.log.read_text()):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise AssertionError(f"nwfilterd did not start:\n{self.log.read_text()}")
            time.sleep(0.05)

    def stop(self) -> str:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.log.read_text()


@contextlib.contextmanager
def daemon(place: Path, *options: str) -> Iterator[Daemon]:
    served = Daemon(place, *options)
    try:
        yield served
    finally:
        served.stop()


def _filter_file(place: Path) -> Path:
    path = place / "web.xml"
    path.write_text(FILTER)
    path.chmod(0o644)
    return path


def test_a_user_queries_the_read_only_socket_and_cannot_change(
    accounts: Accounts, place: Path
) -> None:
    with daemon(place) as served:
        uid = pwd.getpwnam(accounts.other).pw_uid
        root = ["--root", str(served.root)]
        listed = run_as(accounts.other, [*root, "nwfilter-list"])
        assert listed.status == 0 and "clean-traffic" in listed.out, listed.err
        dumped = run_as(accounts.other, [*root, "nwfilter-dumpxml", "clean-traffic"])
        assert dumped.status == 0 and "<filter name='clean-traffic'" in dumped.out
        for query in (["nwfilter-binding-list"], ["list", "--all"]):
            assert run_as(accounts.other, [*root, *query]).status == 0
        defined = run_as(accounts.other, [*root, "nwfilter-define", str(_filter_file(place))])
        assert defined.status == 10 and defined.out == ""
        assert defined.err == (
            "error: method 'filter.define' changes state; the read-only socket "
            f"'{served.ro}' allows queries only\n"
        )
        undefined = run_as(accounts.other, [*root, "nwfilter-undefine", "clean-traffic"])
        assert undefined.status == 10 and "'filter.undefine'" in undefined.err
        log = served.stop()
    assert f"refused method 'filter.define' of pid {defined.pid} uid {uid} on the " \
        f"read-only socket '{served.ro}'" in log
    assert log.count(f"uid {uid}") == 2  # once per refused connection


def test_the_read_only_connection_stays_open_after_a_refusal(place: Path) -> None:
    with daemon(place) as served, Client(served.ro) as client:
        with pytest.raises(NwfilterError) as err:
            client.call("filter.undefine", {"name": "clean-traffic", "bogus": 1})
        assert err.value.code is ErrorCode.DENIED and err.value.exit_status == 10
        assert "clean-traffic" in [row["name"] for row in client.call("filter.list")]


def test_the_admin_group_can_change_and_the_sockets_are_reachable_only(
    accounts: Accounts, place: Path
) -> None:
    with daemon(place, "--admin-group", accounts.group) as served:
        admin = os.stat(served.admin)
        assert (stat.S_IMODE(admin.st_mode), admin.st_uid, admin.st_gid) == (
            0o660, 0, accounts.gid)
        assert stat.S_IMODE(os.stat(served.ro).st_mode) == 0o666
        # Traversable, not listable, not writable: nothing under them opens up.
        for directory in (served.root, served.root / "run"):
            assert stat.S_IMODE(os.stat(directory).st_mode) == 0o711
        for directory in ("nwfilter", "run/bindings", "run/domains", "domains"):
            assert stat.S_IMODE(os.stat(served.root / directory).st_mode) == 0o700
        shared = {served.root, served.root / "run", served.admin, served.ro,
                  served.root / "host.json"}
        for path in served.root.rglob("*"):
            if path not in shared:
                assert stat.S_IMODE(os.lstat(path).st_mode) & 0o077 == 0, path

        root = ["--root", str(served.root)]
        defined = run_as(accounts.member, [*root, "nwfilter-define", str(_filter_file(place))])
        assert defined.status == 0, defined.err
        listed = run_as(accounts.member, [*root, "nwfilter-list"])
        assert listed.status == 0 and " web" in listed.out
        refused = run_as(accounts.other, [*root, "nwfilter-undefine", "web"])
        assert refused.status == 10 and "read-only socket" in refused.err
        assert run_as(accounts.member, [*root, "nwfilter-undefine", "web"]).status == 0
        log = served.stop()
    assert "refused the connection" not in log


def test_a_user_outside_the_group_is_refused_by_the_daemon_too(
    accounts: Accounts, place: Path
) -> None:
    with daemon(place, "--admin-group", accounts.group) as served:
        served.admin.chmod(0o666)  # a mistake: the file mode no longer keeps anyone out
        uid = pwd.getpwnam(accounts.other).pw_uid
        via_admin = ["--root", str(served.root), "-c", str(served.admin)]
        refused = run_as(accounts.other, [*via_admin, "nwfilter-define",
                                          str(_filter_file(place))])
        assert refused.status == 10
        assert refused.err == (
            f"error: pid {refused.pid} uid {uid} may not use the admin socket "
            f"'{served.admin}': only root and members of group '{accounts.group}' may\n"
        )
        assert run_as(accounts.other, [*via_admin, "nwfilter-list"]).status == 10
        # Without -c, a query the admin socket refuses goes to the read-only one.
        listed = run_as(accounts.other, ["--root", str(served.root), "nwfilter-list"])
        assert listed.status == 0 and "clean-traffic" in listed.out
        assert run_as(accounts.member, [*via_admin, "nwfilter-list"]).status == 0
        log = served.stop()
    line = (f"refused the connection of pid {refused.pid} uid {uid} on the admin socket "
            f"'{served.admin}': only root and members of group '{accounts.group}' may use it")
    assert log.count(line) == 1
    assert log.count(f"uid {uid} on the admin socket") == 3
    assert "changes state" not in log


def test_root_does_everything(place: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with daemon(place) as served:
        root = ["--root", str(served.root)]
        assert nwfilter.cli.main([*root, "nwfilter-define", str(_filter_file(place))]) == 0
        assert nwfilter.cli.main([*root, "nwfilter-list"]) == 0
        assert " web" in capsys.readouterr().out
        assert nwfilter.cli.main([*root, "nwfilter-undefine", "web"]) == 0
        assert nwfilter.cli.main([*root, "-c", str(served.ro), "nwfilter-list"]) == 0
        assert nwfilter.cli.main([*root, "-c", str(served.ro), "nwfilter-undefine",
                                  "clean-traffic"]) == 10
        log = served.stop()
    assert "refused the connection" not in log


def test_without_a_daemon_a_user_gets_a_clear_error(accounts: Accounts, place: Path) -> None:
    root = place / "root"
    assert nwfilter.cli.main(["--root", str(root), "--backend", "memory",
                              "nwfilter-list"]) == 0
    for argv in (["nwfilter-list"], ["nwfilter-define", str(_filter_file(place))]):
        result = run_as(accounts.other, ["--root", str(root), *argv])
        assert result.status == 10
        assert result.err.startswith(
            f"error: state root '{root}' is not accessible to uid "
            f"{pwd.getpwnam(accounts.other).pw_uid}, and no nwfilterd serves it"
        )
        assert "Traceback" not in result.err
    # A daemon's leftovers (0711 directories, stale sockets) change nothing.
    with daemon(place):
        pass
    assert (root / "run" / "nwfilterd-ro.sock").exists() is False
    result = run_as(accounts.other, ["--root", str(root), "nwfilter-list"])
    assert result.status == 10 and "is not accessible" in result.err
