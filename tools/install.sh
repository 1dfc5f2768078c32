#!/bin/sh
# Installs what nwfilter needs on a Debian machine: system packages and a
# virtualenv (.venv) holding the project and its test tools, with the man
# pages and the bash completion under .venv/share.  Idempotent.  On a
# terminal it says what it is doing; elsewhere (CI logs) it prints nothing
# but errors.
set -eu
cd "$(dirname "$0")/.."
say() {
    if [ -t 2 ]; then printf 'install: %s
' "$*" >&2; fi
}
PKGS="nftables libnftables1 iptables ebtables iproute2 iputils-ping busybox python3-venv libvirt0 groff-base dnsmasq-base qemu-system-x86 etcd-server"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    say "installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# Layer-3 rules see bridged traffic through br_netfilter (built in on some
# kernels, a module on others).
[ -e /proc/sys/net/bridge/bridge-nf-call-iptables ] || modprobe br_netfilter 2>/dev/null || true
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    say "creating the virtualenv .venv"
    "$PY" -m venv .venv
fi
say "installing nwfilter and its test tools into .venv"
.venv/bin/pip install -q --disable-pip-version-check -e '.[test]'
# man and bash-completion look beside the bin directories on PATH, so these
# are found once .venv/bin is on it (`. .venv/bin/activate`).
say "installing the man pages and the bash completion into .venv/share"
install -D -m 0644 docs/man/nwfilter.1 .venv/share/man/man1/nwfilter.1
install -D -m 0644 docs/man/nwfilterd.8 .venv/share/man/man8/nwfilterd.8
install -D -m 0644 contrib/bash-completion/nwfilter .venv/share/bash-completion/completions/nwfilter
ln -sf nwfilter .venv/share/bash-completion/completions/nwfilterd
