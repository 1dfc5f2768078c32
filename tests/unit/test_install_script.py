"""tools/install.sh: says what it installs on a terminal, nothing in a log,
and puts the man pages and the completion into the virtualenv.

It runs on a copy of the files it uses, with stand-ins for dpkg-query,
apt-get, apt-cache, dpkg-deb, modprobe and the virtualenv's pip (which
record their arguments), so nothing is installed or downloaded here.  The
dpkg-deb stand-in hands out small package trees made by the test."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from nwfilter.docgen.generated import COMPLETION, MAN_NWFILTER, MAN_NWFILTERD, TOP

STUB = "#!/bin/sh\necho \"$(basename \"$0\") $*\" >> \"$STUB_LOG\"\n"
DPKG_QUERY = (
    "#!/bin/sh\n"
    "for last; do :; done\n"
    '[ "$last" = groff-base ] || printf "install ok installed"\n'
)
KERNEL_PKG = "linux-image-6.1.0-99-amd64"
APT_CACHE = (
    "#!/bin/sh\n"
    'echo "apt-cache $*" >> "$STUB_LOG"\n'
    f"printf 'linux-image-amd64\\n  Depends: {KERNEL_PKG}\\n  Depends: other\\n'\n"
)
# `dpkg-deb --fsys-tarfile FILE`: the tree the test made for that package.
DPKG_DEB = (
    "#!/bin/sh\n"
    'echo "dpkg-deb $*" >> "$STUB_LOG"\n'
    'case "$2" in *linux-image*) d=kernel ;; *) d=busybox ;; esac\n'
    'exec tar -C "$DEBS/$d" -c .\n'
)
KERNEL_FILES = {
    "boot/vmlinuz-6.1.0-99-amd64": b"kernel",
    "boot/config-6.1.0-99-amd64": b"not taken",
    "lib/modules/6.1.0-99-amd64/kernel/drivers/virtio/virtio_pci.ko": b"pci",
    "lib/modules/6.1.0-99-amd64/kernel/drivers/net/virtio_net.ko": b"net",
    "lib/modules/6.1.0-99-amd64/kernel/drivers/net/net_failover.ko": b"net_failover",
    "lib/modules/6.1.0-99-amd64/kernel/net/core/failover.ko": b"failover",
    "lib/modules/6.1.0-99-amd64/kernel/drivers/net/e1000.ko": b"not taken",
}


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    top = tmp_path / "tree"
    for rel in ("tools/install.sh", COMPLETION, MAN_NWFILTER, MAN_NWFILTERD):
        (top / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(TOP / rel, top / rel)
    stubs = tmp_path / "stubs"
    stubs.mkdir()
    for name, text in (("apt-get", STUB), ("modprobe", STUB), ("dpkg-query", DPKG_QUERY),
                       ("apt-cache", APT_CACHE), ("dpkg-deb", DPKG_DEB)):
        (stubs / name).write_text(text)
        (stubs / name).chmod(0o755)
    for rel, data in (*KERNEL_FILES.items(), ("busybox/bin/busybox", b"busybox")):
        path = tmp_path / "debs" / (rel if rel.startswith("busybox/") else f"kernel/{rel}")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    venv_bin = top / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    for name in ("python", "pip"):
        (venv_bin / name).write_text(STUB)
        (venv_bin / name).chmod(0o755)
    return top


def _env(tree: Path) -> dict[str, str]:
    stubs = tree.parent / "stubs"
    return {**os.environ, "PATH": f"{stubs}:{os.environ['PATH']}",
            "STUB_LOG": str(tree.parent / "log"), "DEBS": str(tree.parent / "debs")}


def test_silent_off_a_terminal_and_installs_docs(tree: Path) -> None:
    result = subprocess.run(
        ["sh", str(tree / "tools/install.sh")], env=_env(tree),
        stdin=subprocess.DEVNULL, capture_output=True, text=True, check=True, timeout=60,
    )
    assert (result.stdout, result.stderr) == ("", "")
    log = (tree.parent / "log").read_text()
    assert "apt-get install -y -qq --no-install-recommends groff-base" in log
    assert "pip install -q --disable-pip-version-check -e .[test]" in log
    share = tree / ".venv" / "share"
    assert (share / "man/man1/nwfilter.1").read_text() == (TOP / MAN_NWFILTER).read_text()
    assert (share / "man/man8/nwfilterd.8").exists()
    completions = share / "bash-completion/completions"
    assert (completions / "nwfilter").read_text() == (TOP / COMPLETION).read_text()
    assert (completions / "nwfilterd").resolve() == (completions / "nwfilter").resolve()
    # The guest's kernel, NIC modules and busybox: taken out of the packages,
    # not installed.
    assert f"apt-get download -qq {KERNEL_PKG} busybox-static" in log
    assert [ln for ln in log.splitlines() if "apt-get install" in ln] == [
        "apt-get install -y -qq --no-install-recommends groff-base"]
    guest = tree / ".cache" / "guest"
    assert sorted(p.name for p in guest.iterdir()) == ["VERSION", "busybox", "modules", "vmlinuz"]
    assert (guest / "vmlinuz").read_bytes() == b"kernel"
    assert (guest / "busybox").read_bytes() == b"busybox"
    assert (guest / "VERSION").read_text() == KERNEL_PKG + "\n"
    assert sorted(p.name for p in (guest / "modules").iterdir()) == [
        "failover.ko", "net_failover.ko", "virtio_net.ko", "virtio_pci.ko"]
    # Run again: the cache is current, nothing is fetched.
    (tree.parent / "log").write_text("")
    subprocess.run(["sh", str(tree / "tools/install.sh")], env=_env(tree),
                   stdin=subprocess.DEVNULL, check=True, timeout=60)
    assert "download" not in (tree.parent / "log").read_text()


def test_says_what_it_installs_on_a_terminal(tree: Path) -> None:
    master, slave = os.openpty()
    try:
        proc = subprocess.run(
            ["sh", str(tree / "tools/install.sh")], env=_env(tree),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, check=True,
            timeout=60,
        )
        os.close(slave)
        slave = -1
        said = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the terminal's other end is closed
                break
            if not chunk:
                break
            said += chunk
    finally:
        if slave >= 0:
            os.close(slave)
        os.close(master)
    assert proc.stdout == b""
    lines = said.decode().splitlines()
    assert lines == [
        "install: installing Debian packages: groff-base",
        f"install: fetching the guest kernel ({KERNEL_PKG}) and busybox-static into .cache/guest",
        "install: installing nwfilter and its test tools into .venv",
        "install: installing the man pages and the bash completion into .venv/share",
    ]
