"""A real guest for the QEMU tests: Debian's kernel, booted directly, with a
small initramfs built here (busybox-static, the modules its NIC needs, an
`/init`), and a way to talk to it over its serial console.

`tools/install.sh` takes the kernel image, the virtio modules and a static
busybox out of Debian's packages into `.cache/guest/` (nothing is installed
on the host).  The guest's `/init` mounts what a shell needs, loads the NIC's
modules, silences the kernel on the console and then runs every line that
arrives on the serial port as a shell command.  `Console` frames each
command with markers, so a test reads back exactly its output and its exit
status.
"""

from __future__ import annotations

import gzip
import lzma
import socket
import stat
import time
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from nwfilter.netlab import UDHCPC_SCRIPT

TOP = Path(__file__).resolve().parents[2]
GUEST_DIR = TOP / ".cache" / "guest"
KERNEL = GUEST_DIR / "vmlinuz"
BUSYBOX = GUEST_DIR / "busybox"
MODULES = GUEST_DIR / "modules"

#: what a virtio NIC needs; their dependencies come along (read from the modules)
NIC_MODULES = ("virtio_pci", "virtio_net")
#: the kernel's command line: console on the first serial port, quiet
CMDLINE = "console=ttyS0 quiet loglevel=1 panic=-1"
READY = "nwfilter-guest: ready"

INIT = f"""#!/bin/sh
export PATH=/bin
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
dmesg -n 1
for m in $(cat /etc/modules); do insmod /lib/modules/$m.ko || echo "insmod $m failed"; done
ip link set lo up
for i in $(ls /sys/class/net); do ip link set "$i" up; done
stty -F /dev/ttyS0 -echo
exec </dev/ttyS0 >/dev/ttyS0 2>&1
echo "{READY}"
while IFS= read -r line; do eval "$line"; done
poweroff -f
"""


def missing() -> str | None:
    """Why no guest can boot here (None: it can)."""
    for path in (KERNEL, BUSYBOX, MODULES):
        if not path.exists():
            return f"{path.relative_to(TOP)} is missing (tools/install.sh fetches it)"
    return None


def module_order(wanted: Iterable[str], directory: Path = MODULES) -> list[str]:
    """`wanted` and what they depend on, each after its dependencies (the
    `depends=` of each module's .modinfo section: no modules.dep here)."""
    order: list[str] = []

    def visit(name: str, path: tuple[str, ...]) -> None:
        if name in order:
            return
        if name in path:
            raise ValueError(f"module dependency loop: {' -> '.join((*path, name))}")
        for dep in _depends(module_bytes(name, directory)):
            visit(dep, (*path, name))
        order.append(name)

    for name in wanted:
        visit(name, ())
    return order


def module_bytes(name: str, directory: Path = MODULES) -> bytes:
    """Module `name` as insmod takes it (Debian compresses modules with xz
    from 6.6 on; busybox's insmod here may not read that)."""
    plain = directory / f"{name}.ko"
    if plain.exists():
        return plain.read_bytes()
    packed = directory / f"{name}.ko.xz"
    if packed.exists():
        return lzma.decompress(packed.read_bytes())
    raise FileNotFoundError(f"module {name} is not in {directory}")


def _depends(data: bytes) -> list[str]:
    start = data.find(b"\0depends=")
    if start < 0:
        return []
    value = data[start + len(b"\0depends="):data.index(b"\0", start + 1)]
    return [d.decode() for d in value.split(b",") if d]


@dataclass(frozen=True)
class _Entry:
    name: str
    mode: int
    data: bytes = b""
    rdev: tuple[int, int] = (0, 0)


def _cpio(entries: Iterable[_Entry]) -> bytes:
    """A cpio archive in the "newc" format the kernel unpacks."""
    out = bytearray()

    def pad() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, entry in enumerate([*entries, _Entry("TRAILER!!!", 0)], start=1):
        name = entry.name.encode() + b"\0"
        fields = (ino, entry.mode, 0, 0, 1, 0, len(entry.data), 0, 0,
                  entry.rdev[0], entry.rdev[1], len(name), 0)
        out.extend(b"070701" + b"".join(b"%08X" % f for f in fields) + name)
        pad()
        out.extend(entry.data)
        pad()
    return bytes(out)


def build_initramfs(dest: Path, modules: Iterable[str] = NIC_MODULES) -> Path:
    """Write the guest's initramfs (a gzipped cpio archive) to `dest`."""
    order = module_order(modules)
    entries = [_Entry(d, stat.S_IFDIR | 0o755) for d in (
        "bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp", "run")]
    entries += [
        _Entry("dev/console", stat.S_IFCHR | 0o600, rdev=(5, 1)),
        _Entry("bin/busybox", stat.S_IFREG | 0o755, BUSYBOX.read_bytes()),
        _Entry("bin/sh", stat.S_IFLNK | 0o777, b"busybox"),
        _Entry("init", stat.S_IFREG | 0o755, INIT.encode()),
        _Entry("etc/udhcpc.script", stat.S_IFREG | 0o755, UDHCPC_SCRIPT.encode()),
        _Entry("etc/modules", stat.S_IFREG | 0o644, "".join(f"{m}\n" for m in order).encode()),
    ]
    entries += [_Entry(f"lib/modules/{m}.ko", stat.S_IFREG | 0o644, module_bytes(m))
                for m in order]
    dest.write_bytes(gzip.compress(_cpio(entries), compresslevel=1, mtime=0))
    return dest


class ConsoleError(AssertionError):
    """The guest did not answer on its console as expected."""


class Console:
    """The guest's first serial port: QEMU connects to a socket the test
    listens on (`<serial type='unix'><source mode='connect'>`), so nothing
    the guest prints is lost before the test reads it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self._listener.bind(str(path))
        self._listener.listen(1)
        self._conn: socket.socket | None = None
        self._buffer = ""
        self._serial = 0
        self.transcript: list[str] = []

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self._listener.close()

    def accept(self, timeout: float = 10) -> None:
        """Take QEMU's connection (QEMU connects when it starts)."""
        if self._conn is not None:
            self._conn.close()
        self._listener.settimeout(timeout)
        self._conn, _ = self._listener.accept()
        self._buffer = ""

    def wait_for(self, text: str, timeout: float) -> str:
        """Read until `text` has been printed; what came before it."""
        deadline = time.monotonic() + timeout
        while text not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ConsoleError(f"the guest did not print {text!r} within {timeout}s; "
                                   f"it printed: {self._buffer[-2000:]!r}")
            self._read(left)
        before, self._buffer = self._buffer.split(text, 1)
        return before

    def run(self, command: str, timeout: float = 15) -> tuple[int, str]:
        """Run one shell command line in the guest: (exit status, output)."""
        assert "\n" not in command
        self._serial += 1
        n = self._serial
        # printf builds the markers, so the command line itself never contains
        # them (in case the terminal echoes it).
        self._send(f"printf '@@%s<\\n' {n}; {command} 2>&1; printf '@@%s> %s\\n' {n} $?\n")
        self.wait_for(f"@@{n}<\n", timeout)
        output = self.wait_for(f"@@{n}> ", timeout)
        status = self.wait_for("\n", timeout)
        self.transcript.append(f"$ {command}\n{output}[{status}]")
        return int(status), output

    def check(self, command: str, timeout: float = 15) -> str:
        """`run`, and fail unless the command succeeded."""
        status, output = self.run(command, timeout)
        if status != 0:
            raise ConsoleError(f"guest command {command!r} exited {status}: {output}")
        return output

    def _send(self, text: str) -> None:
        if self._conn is None:
            raise ConsoleError("the guest's console is not connected")
        self._conn.sendall(text.encode())

    def _read(self, timeout: float) -> None:
        if self._conn is None:
            raise ConsoleError("the guest's console is not connected")
        self._conn.settimeout(max(timeout, 0.01))
        try:
            chunk = self._conn.recv(65536)
        except TimeoutError:
            return
        if not chunk:
            raise ConsoleError(f"the guest's console closed; it printed: {self._buffer[-2000:]!r}")
        self._buffer += chunk.decode("utf-8", "replace").replace("\r", "")
