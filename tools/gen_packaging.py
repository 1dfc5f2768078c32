"""Writes the files generated from the argument parsers: the man pages
docs/man/nwfilter.1 and docs/man/nwfilterd.8 and the bash completion
contrib/bash-completion/nwfilter.  Run it after adding a command or an
option; `--check` only reports which files differ (status 1).

Run: .venv/bin/python tools/gen_packaging.py [--check]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nwfilter.docgen.generated import TOP, generated_files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="change nothing; exit 1 if stale")
    args = parser.parse_args()
    stale = 0
    for rel, text in generated_files().items():
        path = TOP / rel
        current = path.read_text(encoding="utf-8") if path.exists() else None
        if current == text:
            continue
        stale += 1
        if args.check:
            print(f"{rel} is out of date", file=sys.stderr)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            print(f"wrote {rel}")
    return 1 if args.check and stale else 0


if __name__ == "__main__":
    sys.exit(main())
