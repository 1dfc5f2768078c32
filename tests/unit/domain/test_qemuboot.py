"""QEMU's boot and serial port options from a domain document: what each
libvirt form becomes, and the refusals that name the element."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from nwfilter.conf import parse_domain
from nwfilter.domain.qemuboot import read_boot
from nwfilter.errors import ValidationError


def _doc(os_part: str = "", devices: str = "") -> str:
    return (f"<domain type='qemu'><name>g</name><memory unit='MiB'>64</memory>"
            f"<os><type>hvm</type>{os_part}</os><devices>{devices}</devices></domain>")


def _argv(os_part: str = "", devices: str = "") -> list[str]:
    return read_boot(parse_domain(_doc(os_part, devices))).argv()


@pytest.fixture
def files(tmp_path: Path) -> Path:
    (tmp_path / "vmlinuz").write_bytes(b"kernel")
    (tmp_path / "initrd,1.gz").write_bytes(b"initrd")
    return tmp_path


def test_direct_kernel_boot_gets_a_discarding_serial_port(files: Path) -> None:
    argv = _argv(f"<kernel>{files}/vmlinuz</kernel><initrd>{files}/initrd,1.gz</initrd>"
                 "<cmdline>console=ttyS0 quiet</cmdline>")
    assert argv == [
        "-kernel", f"{files}/vmlinuz", "-initrd", f"{files}/initrd,1.gz",
        "-append", "console=ttyS0 quiet",
        "-chardev", "file,id=charserial0,path=/dev/null", "-serial", "chardev:charserial0",
    ]
    assert _argv() == []


def test_serial_ports_in_document_order(files: Path) -> None:
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(files / "con.sock"))
    try:
        argv = _argv(devices=(
            f"<serial type='unix'><source mode='connect' path='{files}/con.sock'/></serial>"
            f"<serial type='unix'><source mode='bind' path='{files}/a,b.sock'/></serial>"
            f"<serial type='file'><source path='{files}/out.log' append='on'/></serial>"
            "<serial type='pty'/><serial type='null'/>"
            "<console type='pty'><target type='serial' port='0'/></console>"
        ))
    finally:
        listener.close()
    chardevs = argv[1::4]
    assert chardevs == [
        f"socket,id=charserial0,path={files}/con.sock,server=off",
        f"socket,id=charserial1,path={files}/a,,b.sock,server=on,wait=off",
        f"file,id=charserial2,path={files}/out.log,append=on",
        "pty,id=charserial3",
        "null,id=charserial4",
    ]
    assert argv[3::4] == [f"chardev:charserial{n}" for n in range(5)]


def test_a_console_without_serial_is_the_first_serial_port(files: Path) -> None:
    argv = _argv(devices=f"<console type='file'><source path='{files}/c.log'/></console>")
    assert argv == ["-chardev", f"file,id=charserial0,path={files}/c.log",
                    "-serial", "chardev:charserial0"]


@pytest.mark.parametrize(
    ("os_part", "devices", "message"),
    [
        ("<kernel>{d}/none</kernel>", "", "<kernel> '{d}/none': No such file or directory"),
        ("<kernel>{d}</kernel>", "", "<kernel> '{d}' is not a regular file"),
        ("<kernel>{d}/vmlinuz</kernel><initrd>{d}/gone</initrd>", "",
         "<initrd> '{d}/gone': No such file"),
        ("<cmdline>quiet</cmdline>", "", "<os> has <cmdline> but no <kernel> to boot"),
        ("", "<serial type='tcp'><source mode='bind' host='::' service='4555'/></serial>",
         "<serial> 0 has type 'tcp'; a <serial> here is one of 'pty', 'file', 'unix', 'null'"),
        ("", "<serial type='pty'/><serial type='file'><source path='{d}/no/x.log'/></serial>",
         "<serial> 1: <source path> '{d}/no/x.log': no directory '{d}/no'"),
        ("", "<serial type='unix'><source mode='connect' path='{d}/vmlinuz'/></serial>",
         "<serial> 0: <source mode='connect' path='{d}/vmlinuz'> is not a socket"),
        ("", "<serial type='unix'><source mode='bind' path='{d}/" + "x" * 120 + "'/></serial>",
         "longer than a unix socket path can be (107 bytes)"),
        ("", "<console type='pty'><target type='virtio'/></console>",
         "<console> 0 has target type 'virtio'; only a serial console is served here"),
    ],
)
def test_what_cannot_be_used_is_refused_naming_the_element(
    files: Path, os_part: str, devices: str, message: str
) -> None:
    d = str(files)
    definition = parse_domain(_doc(os_part.replace("{d}", d), devices.replace("{d}", d)))
    with pytest.raises(ValidationError) as err:
        read_boot(definition)
    assert err.value.message.startswith("domain 'g': ")
    assert message.replace("{d}", d) in err.value.message


def test_each_interface_rom_becomes_its_nic_options(files: Path) -> None:
    nic = "<interface type='bridge'><source bridge='br0'/>{}</interface>"
    boot = read_boot(parse_domain(_doc(devices="".join(nic.format(rom) for rom in (
        "", "<rom enabled='no'/>", "<rom bar='off'/>", f"<rom file='{files}/initrd,1.gz'/>",
    )))))
    assert [boot.nic_options(n) for n in range(5)] == [
        "", ",romfile=", ",rombar=0", f",romfile={files}/initrd,,1.gz", ""]
    with pytest.raises(ValidationError) as err:
        read_boot(parse_domain(_doc(devices=nic.format(f"<rom file='{files}/gone'/>"))))
    assert err.value.message == (
        f"domain 'g': interface 0: <rom file> '{files}/gone': No such file or directory")
