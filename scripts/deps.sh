#!/usr/bin/env bash
# The one list of the Debian packages p2pvm needs besides the Rust toolchain,
# shared by scripts/up.sh, scripts/test.sh and .ci/run.
#
#   scripts/deps.sh main   what `scripts/up.sh` needs (the sandbox backend, clamd)
#   scripts/deps.sh vm     main + what building the two VM images needs
#   scripts/deps.sh test   everything the tests need (vm + the nested test host)
#
# As root it installs what is missing with apt-get; otherwise it prints the
# command to run and exits 1. It prints nothing when all is there.
set -euo pipefail

set_name="${1:-test}"
case "$set_name" in
main | vm | test) ;;
*)
    echo "usage: $0 main|vm|test" >&2
    exit 2
    ;;
esac

need=()
# want PACKAGE CHECK...: PACKAGE is missing unless the command CHECK succeeds.
want() {
    local pkg="$1"
    shift
    "$@" >/dev/null 2>&1 || need+=("$pkg")
}
has() { command -v "$1"; }
has_all() {
    local c
    for c in "$@"; do command -v "$c" || return 1; done
}
# With pipefail, a pipe's status is its first failure: ldd exits 1 on a static
# binary, and `grep -q` would end a pipe early (SIGPIPE for the writer), so
# neither is allowed to decide.
static_busybox() { { ldd /bin/busybox 2>&1 || true; } | grep "not a dynamic" >/dev/null; }
has_lib() { ldconfig -p | grep "$1" >/dev/null; }

# -- main: `p2pvmm up` with the sandbox backend.
# The sandbox runs p2pd under util-linux's unshare, nsenter and setpriv.
want util-linux has_all unshare nsenter setpriv
# The virus filter scans with a real clamd (scripts/clamd.sh starts one with
# the project's signature database; no download of signatures).
want clamav-daemon has clamd

if [ "$set_name" != main ]; then
    # -- vm: the two VM images (p2pvm-images): Debian's kernel (apt-get
    # download), busybox-static copied into both initramfs images, kmod's
    # depmod, e2fsprogs' mkfs.ext4 for the service VM's store disk, iproute2's
    # ip for the TAP device.
    want busybox-static static_busybox
    want kmod has depmod
    want e2fsprogs has mkfs.ext4
    want iproute2 has ip
    want cpio has cpio
    want xz-utils has xz
    # ...and zstd for Debian's 6.12 kernels (the default series: images/src/kernel.rs).
    want zstd has zstd
    # ...and pahole (dwarves) for the channel module's BTF on those kernels.
    want dwarves has pahole
    # Our kernel module for the channel device (MSI-X through UIO) is built
    # against Debian's linux-headers with the kernel's own compiler; the
    # headers' objtool and modpost link libelf and OpenSSL's libcrypto.
    want make has make
    want gcc-12 has gcc-12
    want libelf1 has_lib 'libelf\.so\.1 '
    want libssl3 has_lib 'libcrypto\.so\.3 '
fi

if [ "$set_name" = test ]; then
    # -- test: the content tests drive the HTTP gateway with a real curl; the
    # DRM and group tests make CAs and certificates with the openssl CLI.
    want curl has curl
    want openssl has openssl
    # The nested test host: QEMU's emulator with emulated AMD SVM runs Debian's
    # kernel; binutils' strip slims what goes into its image; ACPICA's iasl
    # and acpiexec check our ACPI tables; strace re-checks QEMU's firmware list.
    want qemu-system-x86 has qemu-system-x86_64
    want acpica-tools has iasl
    want binutils has strip
    want strace has strace
    # The network lab (crates/netlab): namespaces, veths and tc shaping with
    # iproute2; libtorrent (Debian's Python binding) is the swarm's anchor.
    want iproute2 has_all ip tc
    # Its home routers are namespaces that masquerade with nftables; one
    # maps ports for its LAN with a real miniupnpd.
    want nftables has nft
    want miniupnpd-nftables has miniupnpd
    want python3-libtorrent /usr/bin/python3 -c 'import libtorrent'
    # The dashboard's tests drive a real headless Chromium over the DevTools
    # protocol.
    want chromium has chromium
fi

# Debian's kernel is fetched with `apt-get download linux-image-6.12-amd64`
# (signature-checked by apt), so the package lists must know it.
need_update=
if [ "$set_name" != main ] &&
    ! apt-cache policy linux-image-6.12-amd64 2>/dev/null | grep 'Candidate: [0-9]' >/dev/null; then
    need_update=1
fi

if [ ${#need[@]} -eq 0 ] && [ -z "$need_update" ]; then
    exit 0
fi
if [ "$(id -u)" != 0 ]; then
    {
        echo "p2pvm needs these Debian packages (set '$set_name'); as root, run:"
        echo
        echo "    apt-get update"
        [ ${#need[@]} -gt 0 ] &&
            echo "    apt-get install -y --no-install-recommends ${need[*]}"
        echo
        echo "or run this script as root, which does it."
    } >&2
    exit 1
fi
echo "deps.sh: installing ${need[*]:-nothing} (set '$set_name')" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq >&2
if [ ${#need[@]} -gt 0 ]; then
    apt-get install -y -qq --no-install-recommends "${need[@]}" >&2
fi
