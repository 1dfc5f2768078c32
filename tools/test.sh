#!/bin/sh
# Installs what is needed, then runs lint, type checks and the whole test suite.
set -eu
cd "$(dirname "$0")/.."
sh tools/install.sh
.venv/bin/ruff check nwfilter tests tools
.venv/bin/mypy
exec .venv/bin/pytest -q "$@"
