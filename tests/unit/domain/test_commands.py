"""The virsh-like domain subcommands, run through `nwfilter.cli.main`."""

from __future__ import annotations

from pathlib import Path

import pytest

from nwfilter.cli import main


def run(root: Path, capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    capsys.readouterr()
    status = main(["--root", str(root), "--backend", "memory", *args])
    out, err = capsys.readouterr()
    return status, out, err


def test_define_non_utf8_file_is_one_line_naming_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "latin1.xml"
    path.write_bytes("<domain type='test'><name>caf\u00e9</name></domain>".encode("latin-1"))
    status, out, err = run(tmp_path / "root", capsys, "define", str(path))
    assert (status, out) == (2, "")
    assert err.startswith(f"error: {path}: ") and "UTF-8" in err and err.count("\n") == 1


def test_define_invalid_domain_names_the_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "bad.xml"
    path.write_text("<domain type='xen'><name>a</name></domain>")
    status, _, err = run(tmp_path / "root", capsys, "define", str(path))
    assert status == 2 and err.startswith(f"error: {path}: ") and "domain type" in err


def test_define_missing_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status, _, err = run(tmp_path / "root", capsys, "define", str(tmp_path / "nope.xml"))
    assert status == 7 and "nope.xml" in err


def test_define_and_list(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "vm1.xml"
    path.write_text("<domain type='test'><name>vm1</name></domain>")
    root = tmp_path / "root"
    assert run(root, capsys, "define", str(path)) == (
        0, f"Domain 'vm1' defined from {path}\n\n", ""
    )
    status, out, _ = run(root, capsys, "list", "--all")
    assert status == 0
    assert out == " Id   Name   State\n" + "-" * 23 + "\n -    vm1    shut off\n\n"


def test_reboot_of_a_type_that_cannot_reboot_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "vm1.xml"
    path.write_text("<domain type='test'><name>vm1</name></domain>")
    root = tmp_path / "root"
    assert run(root, capsys, "define", str(path))[0] == 0
    assert run(root, capsys, "start", "vm1")[0] == 0
    status, out, err = run(root, capsys, "reboot", "vm1")
    assert (status, out) == (5, "")
    assert err == "error: domain 'vm1': type 'test' cannot reboot\n"
    assert run(root, capsys, "domstate", "vm1")[1] == "running\n\n"
