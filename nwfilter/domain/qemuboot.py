"""QEMU options for how a guest boots and where its serial ports go, read
from its libvirt document.

- `<os><kernel>`, `<initrd>`, `<cmdline>`: a direct kernel boot
  (`-kernel`, `-initrd`, `-append`).  The kernel and the initrd must be
  absolute paths of existing regular files; a `<cmdline>` without a
  `<kernel>` is refused (QEMU would refuse it too, less clearly).
- `<serial>`, one QEMU serial port each, in document order, with the
  character device of its type: `pty`, `file` (`<source path>`, appended
  to with `append='on'`), `unix` (`<source mode='bind'|'connect' path>`:
  QEMU listens on the path, without waiting for a client, or connects to
  a listener there) and `null`.  Other types (`tcp`, `udp`, `dev`, `pipe`,
  `stdio`, `vc`, `spicevmc`, ...) are refused, naming the element.
- `<console>`: libvirt's alias of the first serial port.  Without any
  `<serial>`, a console whose target is a serial port (or has no target
  type) becomes serial port 0; a `virtio` console is refused.

A document without ports gets none (`-nodefaults`), except that a direct
kernel boot gets a serial port that discards what is written to it, so
a kernel told to use `ttyS0` finds one.

- An interface's `<rom>`: its NIC's option ROM (the network boot firmware
  that SeaBIOS runs, and waits in, at every boot): `enabled='no'` loads
  none (`romfile=`), which a direct kernel boot does not need; `bar='off'`
  hides it from the guest's PCI BAR (`rombar=0`); `file` loads another
  (an existing regular file).

Paths become QEMU option values, where a comma separates options: a comma
in a path is doubled, as QEMU's option syntax wants.  A socket path is
limited to what a unix socket address holds (107 bytes).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass

from lxml import etree

from nwfilter.conf.model import DomainDef
from nwfilter.errors import ValidationError

#: the longest path a unix socket address holds (sun_path, less its NUL)
UNIX_PATH_MAX = 107
_CHARDEV_TYPES = ("pty", "file", "unix", "null")


@dataclass(frozen=True)
class Serial:
    """One serial port: its character device type and where it goes."""

    type: str
    path: str | None = None
    mode: str | None = None  # unix: 'bind' (QEMU listens) or 'connect'
    append: bool = False  # file

    def chardev(self, ident: str) -> str:
        """The value of QEMU's `-chardev` option for this port."""
        if self.type == "file":
            assert self.path is not None
            return (f"file,id={ident},path={_opt(self.path)}"
                    + (",append=on" if self.append else ""))
        if self.type == "unix":
            assert self.path is not None
            server = "server=on,wait=off" if self.mode == "bind" else "server=off"
            return f"socket,id={ident},path={_opt(self.path)},{server}"
        return f"{self.type},id={ident}"


@dataclass(frozen=True)
class Boot:
    """What the document says about booting and serial ports."""

    kernel: str | None = None
    initrd: str | None = None
    cmdline: str | None = None
    serials: tuple[Serial, ...] = ()
    nic_roms: tuple[str, ...] = ()  # per interface: `-device` options for its ROM

    def nic_options(self, index: int) -> str:
        """What to append to the `-device` option of interface `index`."""
        return self.nic_roms[index] if index < len(self.nic_roms) else ""

    def argv(self) -> list[str]:
        """QEMU's options (after `-nodefaults`) for this boot and these ports."""
        argv: list[str] = []
        serials = self.serials
        if self.kernel is not None:
            argv += ["-kernel", self.kernel]
            if self.initrd is not None:
                argv += ["-initrd", self.initrd]
            if self.cmdline is not None:
                argv += ["-append", self.cmdline]
            if not serials:
                serials = (Serial("file", "/dev/null"),)
        for index, serial in enumerate(serials):
            argv += ["-chardev", serial.chardev(f"charserial{index}"),
                     "-serial", f"chardev:charserial{index}"]
        return argv


def _opt(value: str) -> str:
    return value.replace(",", ",,")


def read_boot(dom: DomainDef) -> Boot:
    """The boot and serial ports of `dom`'s document; ValidationError names
    the element that cannot be used."""
    if not dom.document:
        return Boot()
    from nwfilter.conf.safexml import parse_xml

    root = parse_xml(dom.document)
    where = f"domain '{dom.name}'"
    kernel = _file(root, "os/kernel", where)
    initrd = _file(root, "os/initrd", where)
    cmdline_el = root.find("os/cmdline")
    cmdline = (cmdline_el.text or "") if cmdline_el is not None else None
    if kernel is None and (initrd is not None or cmdline is not None):
        what = "<initrd>" if initrd is not None else "<cmdline>"
        raise ValidationError(f"{where}: <os> has {what} but no <kernel> to boot")
    serials = [_serial(el, f"{where}: <serial> {n}", "serial")
               for n, el in enumerate(root.findall("devices/serial"))]
    if not serials:
        for n, el in enumerate(root.findall("devices/console")):
            target = el.find("target")
            ttype = target.get("type") if target is not None else None
            if ttype not in (None, "serial"):
                raise ValidationError(
                    f"{where}: <console> {n} has target type '{ttype}'; only a serial "
                    "console is served here"
                )
            serials.append(_serial(el, f"{where}: <console> {n}", "console"))
            break  # the first console is the first serial port; others need virtio
    roms = tuple(_rom(el.find("rom"), f"{where}: interface {n}")
                 for n, el in enumerate(root.findall("devices/interface")))
    return Boot(kernel, initrd, cmdline, tuple(serials), roms)


def _rom(element: etree._Element | None, where: str) -> str:
    if element is None:
        return ""
    if element.get("enabled") == "no":
        return ",romfile="
    options = ""
    if element.get("bar") == "off":
        options += ",rombar=0"
    path = element.get("file")
    if path is not None:
        _check_file(path, f"{where}: <rom file>", where="")
        options += f",romfile={_opt(path)}"
    return options


def _file(root: etree._Element, xpath: str, where: str) -> str | None:
    element = root.find(xpath)
    if element is None:
        return None
    path = (element.text or "").strip()
    _check_file(path, f"<{xpath.rsplit('/', 1)[1]}>", where)
    return path


def _check_file(path: str, tag: str, where: str) -> None:
    """`path` names an existing, readable regular file (`tag` and `where`
    name it in the error)."""
    where = f"{where}: " if where else ""
    if not os.path.isabs(path):
        raise ValidationError(f"{where}{tag} must be an absolute path, not '{path}'")
    try:
        info = os.stat(path)
    except OSError as exc:
        raise ValidationError(f"{where}{tag} '{path}': {exc.strerror}") from exc
    if not stat.S_ISREG(info.st_mode):
        raise ValidationError(f"{where}{tag} '{path}' is not a regular file")
    if not os.access(path, os.R_OK):
        raise ValidationError(f"{where}{tag} '{path}' is not readable")


def _serial(element: etree._Element, where: str, tag: str) -> Serial:
    ctype = element.get("type", "pty")
    if ctype not in _CHARDEV_TYPES:
        raise ValidationError(
            f"{where} has type '{ctype}'; a <{tag}> here is one of "
            + ", ".join(f"'{t}'" for t in _CHARDEV_TYPES)
        )
    if ctype in ("pty", "null"):
        return Serial(ctype)
    source = element.find("source")
    path = source.get("path") if source is not None else None
    if not path:
        raise ValidationError(f"{where} of type '{ctype}' needs <source path='...'/>")
    if not os.path.isabs(path):
        raise ValidationError(f"{where}: <source path> must be absolute, not '{path}'")
    parent = os.path.dirname(path)
    if not os.path.isdir(parent):
        raise ValidationError(f"{where}: <source path> '{path}': no directory '{parent}'")
    assert source is not None
    if ctype == "file":
        return Serial("file", path, append=source.get("append") == "on")
    mode = source.get("mode", "bind")
    if mode not in ("bind", "connect"):
        raise ValidationError(f"{where}: <source mode> is 'bind' or 'connect', not '{mode}'")
    if len(os.fsencode(path)) > UNIX_PATH_MAX:
        raise ValidationError(
            f"{where}: <source path> '{path}' is longer than a unix socket path can be "
            f"({UNIX_PATH_MAX} bytes)"
        )
    if mode == "connect":
        try:
            info = os.stat(path)
        except OSError as exc:
            raise ValidationError(
                f"{where}: <source mode='connect' path='{path}'>: {exc.strerror}") from exc
        if not stat.S_ISSOCK(info.st_mode):
            raise ValidationError(
                f"{where}: <source mode='connect' path='{path}'> is not a socket")
    return Serial("unix", path, mode)
