#!/bin/sh
# Installs what nwfilter needs on a Debian machine: system packages and a
# virtualenv (.venv) holding the project and its test tools.  Idempotent.
set -eu
cd "$(dirname "$0")/.."
PKGS="nftables libnftables1 iptables ebtables iproute2 iputils-ping busybox python3-venv libvirt0 dnsmasq-base"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# Layer-3 rules see bridged traffic through br_netfilter (built in on some
# kernels, a module on others).
[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ] || modprobe br_netfilter 2>/dev/null || true
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
