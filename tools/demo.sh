#!/bin/sh
# Installs what is needed, then runs the self-contained demo in private
# network namespaces (nothing on the host is touched).
set -eu
cd "$(dirname "$0")/.."
sh tools/install.sh
exec .venv/bin/nwfilter sandbox "$@"
