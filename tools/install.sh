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
PKGS="nftables libnftables1 iptables ebtables iproute2 iputils-ping busybox python3-venv libvirt0 libvirt-daemon-config-nwfilter groff-base dnsmasq-base qemu-system-x86 etcd-server"
missing=""
for p in $PKGS; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
    say "installing Debian packages:$missing"
    apt-get update -qq
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null
fi
# A guest for the QEMU tests: Debian's kernel and a static busybox, taken
# out of their packages into .cache/guest without installing them here (the
# host keeps its own kernel and its dynamic busybox).  Only the kernel image
# and the modules a guest's virtio NIC needs are kept (`.ko`, or `.ko.xz`
# where Debian compresses them).
guest_kernel() {
    apt-cache depends linux-image-amd64 2>/dev/null |
        sed -n 's/^ *Depends: \(linux-image-[0-9][^ ]*-amd64\)$/\1/p' | head -n 1
}
kpkg=$(guest_kernel)
if [ -z "$kpkg" ]; then
    apt-get update -qq
    kpkg=$(guest_kernel)
fi
[ -n "$kpkg" ] || { echo "install: no Debian package for the guest kernel" >&2; exit 1; }
GUEST=.cache/guest
if [ "$(cat "$GUEST/VERSION" 2>/dev/null)" != "$kpkg" ]; then
    say "fetching the guest kernel ($kpkg) and busybox-static into $GUEST"
    rm -rf "$GUEST"
    work=$(mktemp -d)
    trap 'rm -rf "$work"' EXIT
    # (apt warns that root downloads unsandboxed: only a failure is shown)
    if ! out=$(cd "$work" && apt-get download -qq "$kpkg" busybox-static 2>&1); then
        printf 'install: cannot download %s busybox-static:\n%s\n' "$kpkg" "$out" >&2
        exit 1
    fi
    mkdir -p "$work/k" "$work/b"
    dpkg-deb --fsys-tarfile "$work/$kpkg"_*.deb |
        tar -x -C "$work/k" --wildcards './boot/vmlinuz-*' \
            './lib/modules/*/kernel/drivers/virtio/*' './lib/modules/*/kernel/net/core/failover.ko*' \
            './lib/modules/*/kernel/drivers/net/virtio_net.ko*' \
            './lib/modules/*/kernel/drivers/net/net_failover.ko*'
    dpkg-deb --fsys-tarfile "$work"/busybox-static_*.deb | tar -x -C "$work/b" ./bin/busybox
    rm -rf "$GUEST.new"
    mkdir -p "$GUEST.new/modules"
    mv "$work"/k/boot/vmlinuz-* "$GUEST.new/vmlinuz"
    find "$work/k/lib/modules" -name '*.ko*' -exec mv {} "$GUEST.new/modules/" \;
    mv "$work/b/bin/busybox" "$GUEST.new/busybox"
    echo "$kpkg" > "$GUEST.new/VERSION"
    mv "$GUEST.new" "$GUEST"
    rm -rf "$work"
    trap - EXIT
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
