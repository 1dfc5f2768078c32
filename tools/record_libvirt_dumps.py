"""Record libvirt 9.0's canonical form of filter documents.

For every ``NAME.in.xml`` under tests/golden/libvirt/dumps/ (in name order,
so that referenced filters may come first only by name; libvirt accepts a
reference to a filter not defined yet), define it in a private libvirtd
(`tools/libvirtref.py`) and write what ``virsh nwfilter-dumpxml`` prints to
``NAME.libvirt.xml``, or libvirt's error to ``NAME.libvirt.err``.  The
filters are undefined again afterwards.  tests/unit/conf/test_libvirt_dumps.py
checks the project against these files without libvirt.

Run as root on Debian 12 (it installs libvirt-daemon if needed)::

    python3 tools/record_libvirt_dumps.py [DIRECTORY]
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from libvirtref import ReferenceDaemon

DEFAULT_DIR = Path(__file__).resolve().parents[1] / "tests" / "golden" / "libvirt" / "dumps"
_NAME = re.compile(r"<filter\s+name='([^']+)'")


def record(directory: Path) -> None:
    inputs = sorted(directory.glob("*.in.xml"))
    defined: list[str] = []
    with ReferenceDaemon() as daemon:
        for path in inputs:
            stem = path.name.removesuffix(".in.xml")
            text = path.read_text()
            found = _NAME.search(text)
            if found is None:
                raise SystemExit(f"{path}: no <filter name='...'>")
            name = found.group(1)
            for old in (".libvirt.xml", ".libvirt.err"):
                directory.joinpath(stem + old).unlink(missing_ok=True)
            error = daemon.define(text)
            if error is not None:
                directory.joinpath(stem + ".libvirt.err").write_text(error + "\n")
                print(f"{stem}: refused: {error}")
                continue
            defined.append(name)
            dump = daemon.virsh("nwfilter-dumpxml", name).stdout
            directory.joinpath(stem + ".libvirt.xml").write_text(dump.rstrip("\n") + "\n")
            print(f"{stem}: recorded")
        for name in reversed(defined):
            daemon.virsh("nwfilter-undefine", name, check=False)


if __name__ == "__main__":
    record(Path(sys.argv[1]) if len(sys.argv) > 1 else DEFAULT_DIR)
