"""nwfilterd's configuration file: strict parsing, safe reading, precedence."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from nwfilter import daemon, daemonconf
from nwfilter.access import AdminAccess, Group, peer_groups
from nwfilter.connserver import Peer
from nwfilter.daemon import main as daemon_main
from nwfilter.errors import PermissionDeniedError, StorageError, ValidationError


def test_a_full_file() -> None:
    config = daemonconf.parse(
        "# comment\n\nadmin_group = root\nsocket = /r/a.sock\n  ro_socket=none  \n"
        "root = /srv/nw\nworkers = 3\nmax_connections = 10\nmax_buffered = 4096\n",
        "f.conf",
    )
    assert config.admin_group == Group("root", 0)
    assert config.paths == {"socket": Path("/r/a.sock"), "ro_socket": None,
                            "root": Path("/srv/nw")}
    assert config.integers == {"workers": 3, "max_connections": 10, "max_buffered": 4096}


@pytest.mark.parametrize(
    ("text", "line", "why"),
    [
        ("admin_grup = root\n", 1, "unknown key 'admin_grup' (known: admin_group,"),
        ("# x\nworkers = 2\nworkers = 3\n", 3, "key 'workers' is already set on line 2"),
        ("\nsocket /x\n", 2, "expected 'key = value'"),
        ("socket =\n", 1, "key 'socket' has no value"),
        ("ro_socket = run/ro.sock\n", 1, "'ro_socket' must be an absolute path"),
        ("workers = 0\n", 1, "'workers' must be a positive integer, got '0'"),
        ("workers = 1e3\n", 1, "must be a positive integer"),
        ("workers = \uff13\n", 1, "must be a positive integer"),
        ("admin_group = no-such-group-nwf\n", 1, "admin group 'no-such-group-nwf' does not exist"),
        ("audit_interval = -5\n", 1, "'audit_interval' must be a number of seconds (0: off)"),
        ("audit_interval = 1.5\n", 1, "'audit_interval' must be a number of seconds"),
    ],
)
def test_mistakes_name_the_file_and_line(text: str, line: int, why: str) -> None:
    with pytest.raises(ValidationError) as err:
        daemonconf.parse(text, "/etc/x.conf")
    assert err.value.message.startswith(f"config file '/etc/x.conf', line {line}: ")
    assert why in err.value.message


def test_audit_interval_in_the_file_and_on_the_command_line(tmp_path: Path) -> None:
    conf = tmp_path / "d.conf"
    conf.write_text("audit_interval = 300\n")
    conf.chmod(0o600)
    config = daemonconf.load(conf)
    assert config.integers == {"audit_interval": 300}
    parser = daemon.build_parser()
    for extra, wanted in (([], 300), (["--audit-interval", "0"], 0),
                          (["--audit-interval", "5"], 5)):
        assert daemon.audit_interval(parser.parse_args(extra), config) == wanted
    assert daemon.audit_interval(parser.parse_args([]), daemonconf.DaemonConfig()) == 0
    with pytest.raises(SystemExit):
        parser.parse_args(["--audit-interval", "-1"])


def test_load_reads_a_safe_file_only(tmp_path: Path) -> None:
    conf = tmp_path / "d.conf"
    conf.write_text("workers = 2\n")
    conf.chmod(0o644)
    assert daemonconf.load(conf).integers == {"workers": 2}
    conf.chmod(0o664)
    with pytest.raises(StorageError, match="writable by group or others"):
        daemonconf.load(conf)
    conf.chmod(0o600)
    os.chown(conf, 4242, -1)
    with pytest.raises(StorageError, match="owned by uid 4242"):
        daemonconf.load(conf)
    os.chown(conf, 0, -1)
    link = tmp_path / "link.conf"
    link.symlink_to(conf)
    with pytest.raises(StorageError, match="symbolic link"):
        daemonconf.load(link)
    with pytest.raises(StorageError, match="does not exist"):
        daemonconf.load(tmp_path / "missing.conf")


def test_daemon_refuses_a_bad_file_before_binding(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    conf = tmp_path / "d.conf"
    conf.write_text("root = /x\nro_socket = x\n")
    status = daemon_main(["--config", str(conf), "--root", str(tmp_path / "r"),
                          "--backend", "memory"])
    err = capsys.readouterr().err
    assert status == 2
    assert err == f"error: config file '{conf}', line 2: 'ro_socket' must be an absolute " \
        "path, got 'x'\n"
    assert not (tmp_path / "r").exists()
    conf.write_text("")
    status = daemon_main(["--config", str(conf), "--admin-group", "nwf-none",
                          "--root", str(tmp_path / "r"), "--backend", "memory"])
    assert status == 2 and "admin group 'nwf-none' does not exist" in capsys.readouterr().err


# -- the admission rule ----------------------------------------------------------------


def test_peer_groups_come_from_the_kernel() -> None:
    a, b = socket.socketpair(socket.AF_UNIX)
    with a, b:
        peer = Peer.of(a)
    assert (peer.pid, peer.uid, peer.gid) == (os.getpid(), os.geteuid(), os.getegid())
    assert peer.groups is not None and set(peer.groups) == set(os.getgroups())


def test_admin_access() -> None:
    access = AdminAccess(Path("/r/run/nwfilterd.sock"), Group("nwadm", 4321))
    assert access.refusal(Peer(10, 0, 0, ())) is None
    assert access.refusal(Peer(10, 1000, 4321, ())) is None
    assert access.refusal(Peer(10, 1000, 100, (5, 4321))) is None
    refusal = access.refusal(Peer(10, 1000, 100, (5,)))
    assert isinstance(refusal, PermissionDeniedError)
    assert refusal.message == ("pid 10 uid 1000 may not use the admin socket "
                               "'/r/run/nwfilterd.sock': only root and members of group "
                               "'nwadm' may")
    assert isinstance(access.refusal(Peer(0, -1, -1)), PermissionDeniedError)
    root_only = AdminAccess(Path("/s"))
    assert "only root may" in str(root_only.refusal(Peer(10, 1000, 4321, (4321,))))


def test_groups_without_the_kernel_need_the_same_uid_in_proc() -> None:
    # This process, as a peer of another uid: a reused pid lends no groups.
    mine = Peer(os.getpid(), os.geteuid(), os.getegid(), None)
    assert peer_groups(mine) == frozenset((*os.getgroups(), os.getegid()))
    stranger = Peer(os.getpid(), 4242, 4242, None)
    assert peer_groups(stranger) == frozenset((4242,))
