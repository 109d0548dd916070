#!/usr/bin/env bash
# Build the arm64 guest of tests/kernel/test_arm64.py (issue 16): Debian's bookworm arm64 kernel and an
# initramfs holding a Debian arm64 userland (Python 3.11, libbpf1, iproute2, bpftool), booted by
# qemu-system-aarch64 (TCG). Everything comes from Debian's packages.
#
#   scripts/build-arm64-guest.sh [--refresh] [--shell]
#
#   --refresh   rebuild even when the cache holds a guest of this recipe (e.g. for Debian's updates)
#   --shell     then boot the guest with a shell on this terminal (no payload; Ctrl-A X quits qemu)
#
# How, and what it leaves on the host (nothing outside the cache):
#   1. `debootstrap --foreign --arch arm64` downloads and unpacks the packages (no arm64 code runs);
#   2. its second stage runs the packages' arm64 scripts under qemu-user, inside new user, mount, PID and
#      network namespaces that map every id onto itself and mount a binfmt_misc instance of their own
#      (Linux >= 6.7): the qemu-aarch64 registration exists only there and vanishes with them, so the host's
#      binfmt_misc is never mounted or written, even if this script is killed. No `dpkg --add-architecture`;
#   3. the kernel package is fetched from the same mirror (checked against the Packages index debootstrap
#      verified); its vmlinuz goes beside the initramfs, the few modules the tests need into it;
#   4. the rootfs, trimmed (what no test runs: documentation, locales, apt's lists and caches, perl, time
#      zones), becomes rootfs.cpio.gz with an /init that mounts proc, sysfs, devtmpfs, cgroup2, bpffs and
#      tmpfs, loads the modules, runs /guest/main (from a payload archive the caller appends) with its output
#      on the console, and powers the machine off; without /guest/main it starts a shell.
# The arm64 kernel headers (linux-libc-dev) are unpacked too, so the tests can compile the BPF objects for
# arm64 and compare them with the host's.
#
# Cache: $BALANCING_ARM64_CACHE (default build/cache/arm64 in the checkout, beside the suite's other
# downloads): guest-<key>/ is a built guest, the key hashing this script and the mirror (any change to the
# recipe rebuilds; older guests are removed); debs/ keeps the downloaded packages for a rebuild; work/ is
# per-build scratch, removed afterwards; builds are serialised with flock on lock.
#
# Progress goes to stderr. On success stdout ends with (one per line):
#   GUEST=<dir>  KERNEL=<vmlinuz>  INITRD=<rootfs.cpio.gz>  KERNEL_RELEASE=<uname -r>  HEADERS=<include dir>
set -euo pipefail
self=$(realpath "$0")

suite=bookworm # its python3 is 3.11, as pyproject.toml requires
mirror=${BALANCING_DEBIAN_MIRROR:-http://deb.debian.org/debian}
packages=(python3 libbpf1 bpftool iproute2 kmod)
# Modules (=m in Debian's arm64 kernel) put into the initramfs: the harness's pods hang off a bridge by veth
# pairs (loaded at boot); sch_ingress and cls_bpf for north-south's clsact filters (Linux 6.1 has no tcx),
# loaded on demand.
boot_modules=(veth bridge)
modules=("${boot_modules[@]}" sch_ingress cls_bpf)
refresh=0 shell=0

usage() { sed -n '2,/^set -euo/p' "$self" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }
while [ $# -gt 0 ]; do
  case $1 in
    --refresh) refresh=1; shift ;;
    --shell) shell=1; shift ;;
    -h | --help) usage 0 ;;
    *) echo "build-arm64-guest: unknown argument $1" >&2; usage ;;
  esac
done

log() { echo "build-arm64-guest: $*" >&2; }
die() { log "$*"; exit 1; }
cd "$(dirname "$self")/.."
repo=$PWD
cache=$(realpath -m "${BALANCING_ARM64_CACHE:-$repo/build/cache/arm64}")

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, namespaces)"
for tool in debootstrap qemu-aarch64-static qemu-system-aarch64 cpio unshare depmod; do
  command -v "$tool" >/dev/null || die "$tool is missing: run scripts/setup.sh"
done
binfmt_conf=/usr/lib/binfmt.d/qemu-aarch64.conf
[ -f "$binfmt_conf" ] || die "$binfmt_conf is missing (package qemu-user-static): run scripts/setup.sh"

mkdir -p "$cache/debs"
exec 9>"$cache/lock"
flock 9

key=$(cat "$self" <(echo "$mirror") | sha256sum | cut -c1-12)
guest=$cache/guest-$key

boot_shell() {
  exec qemu-system-aarch64 -M virt -cpu max,pauth-impdef=on -smp 2 -m 2048 -nographic -no-reboot -nic none \
    -kernel "$guest/vmlinuz" -initrd "$guest/rootfs.cpio.gz" -append "console=ttyAMA0 rdinit=/init panic=-1"
}

report() {
  echo "GUEST=$guest"
  echo "KERNEL=$guest/vmlinuz"
  echo "INITRD=$guest/rootfs.cpio.gz"
  echo "KERNEL_RELEASE=$(cat "$guest/kernel-release")"
  echo "HEADERS=$guest/include"
}

if [ "$refresh" = 0 ] && [ -f "$guest/complete" ]; then
  log "reusing $guest"
  report
  [ "$shell" = 0 ] || boot_shell
  exit 0
fi

work=$cache/work
cleanup() { rm -rf "${work:?}"; }
cleanup
trap cleanup EXIT
mkdir -p "$work"
start=$SECONDS
rootfs=$work/rootfs

# --- 1. the first stage: download and unpack (no arm64 code runs) -----------------------------------------
log "debootstrap --foreign $suite (arm64) + ${packages[*]}"
debootstrap --foreign --arch=arm64 --variant=minbase --include="$(IFS=,; echo "${packages[*]}")" \
  --cache-dir="$cache/debs" "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 ||
  { tail -20 "$work/debootstrap.log" >&2; die "debootstrap's first stage failed (log above)"; }
log "first stage took $((SECONDS - start)) s"

# --- 3 (first, while the index is there). The kernel and the headers, checked against the verified index ---
index=$(ls "$rootfs"/var/lib/apt/lists/*_Packages | head -1)
fetch_package() { # NAME -> the path of the downloaded, checked .deb
  local fields filename sha deb
  fields=$(python3 - "$index" "$1" <<'EOF'
import sys
want, stanzas = sys.argv[2], open(sys.argv[1]).read().split("\n\n")
by_name = {}
for stanza in stanzas:
    fields = dict(l.split(": ", 1) for l in stanza.splitlines() if ": " in l and not l.startswith(" "))
    by_name[fields.get("Package")] = fields
pkg = by_name[want]
if want == "linux-image-arm64":  # the metapackage: its one dependency is the versioned kernel
    pkg = by_name[pkg["Depends"].split(",")[0].split()[0]]
print(pkg["Filename"], pkg["SHA256"])
EOF
  ) || die "no $1 in $index"
  read -r filename sha <<<"$fields"
  deb=$cache/debs/$(basename "$filename")
  if ! echo "$sha  $deb" | sha256sum --check --status 2>/dev/null; then
    log "downloading $(basename "$filename")"
    python3 -c 'import shutil, sys, urllib.request
with urllib.request.urlopen(sys.argv[1], timeout=60) as r, open(sys.argv[2], "wb") as f:
    shutil.copyfileobj(r, f)' "$mirror/$filename" "$deb.part" || die "downloading $mirror/$filename failed"
    echo "$sha  $deb.part" | sha256sum --check --status || die "$filename: SHA256 mismatch"
    mv "$deb.part" "$deb"
  fi
  echo "$deb"
}
kernel_deb=$(fetch_package linux-image-arm64)
headers_deb=$(fetch_package linux-libc-dev)
mkdir -p "$work/kernel" "$work/headers"
dpkg-deb -x "$kernel_deb" "$work/kernel"
dpkg-deb -x "$headers_deb" "$work/headers"
release=$(basename "$(ls -d "$work"/kernel/lib/modules/*)")
log "kernel $release"

# --- 2. the second stage, under qemu-user in private namespaces with their own binfmt_misc ------------------
# Runs "$@" as root with every uid and gid mapped onto itself, in new user, mount, PID and network namespaces
# where a binfmt_misc instance of their own runs arm64 ELF files with qemu-aarch64-static (its registration
# opens the interpreter at once, flag F, so it works inside the chroot too).
in_arm64_sandbox() {
  local go=$work/sandbox.go pid
  rm -f "$go"
  mkfifo "$go"
  unshare --user --mount --propagation private --pid --fork --kill-child --net -- sh -ec '
    read -r _ <"$0"
    mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
    cat "$1" >/proc/sys/fs/binfmt_misc/register
    shift
    exec "$@"' "$go" "$binfmt_conf" "$@" &
  pid=$!
  # unshare(2) done when its user namespace differs from ours: then map the ids and let it go on
  until [ "$(readlink "/proc/$pid/ns/user")" != "$(readlink /proc/self/ns/user)" ]; do
    kill -0 "$pid" 2>/dev/null || break
    sleep 0.01
  done
  echo "0 0 4294967295" >"/proc/$pid/uid_map"
  echo "0 0 4294967295" >"/proc/$pid/gid_map"
  echo go >"$go"
  wait "$pid"
}
if ! in_arm64_sandbox chroot "$rootfs" /bin/true 2>"$work/sandbox.log"; then
  cat "$work/sandbox.log" >&2
  die "no arm64 sandbox (a binfmt_misc of its own in a user namespace needs Linux >= 6.7)"
fi
log "second stage under qemu-user (a few minutes)"
# container=lxc: debootstrap skips its mknod check, impossible in a user namespace (the first stage, as the
# host's root, made the device nodes already).
in_arm64_sandbox env container=lxc chroot "$rootfs" /debootstrap/debootstrap --second-stage \
  >"$work/second-stage.log" 2>&1 ||
  { tail -20 "$work/second-stage.log" >&2; die "debootstrap's second stage failed (log above)"; }
[ -x "$rootfs/usr/bin/python3" ] || die "the rootfs has no python3"
log "second stage done, $((SECONDS - start)) s so far"

# --- 4. trim, add the modules and /init, pack ---------------------------------------------------------------
# Unpacking costs about 40 ms per MB under TCG at every boot: what no test runs goes (documentation,
# locales, apt's lists and caches, perl, time zones, dpkg's file lists; the package list is kept beside).
out=$work/out
mkdir -p "$out/include"
dpkg-query --admindir="$rootfs/var/lib/dpkg" -W -f '${Package} ${Version}\n' >"$out/packages.txt"
rm -rf "$rootfs"/var/cache/apt/* "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/log/* \
  "$rootfs"/usr/share/{doc,man,info,locale,i18n,lintian,bash-completion,zoneinfo,perl5} \
  "$rootfs"/usr/lib/aarch64-linux-gnu/{gconv,perl-base} "$rootfs"/usr/bin/perl* \
  "$rootfs"/var/lib/dpkg/info/*.{list,md5sums}
mkdir -p "$rootfs/usr/share/doc"
modroot=$work/modroot
mkdir -p "$modroot/lib/modules"
cp -a "$work/kernel/lib/modules/$release" "$modroot/lib/modules/"
depmod -b "$modroot" "$release"
# each wanted module and what it depends on (modules.dep: "path: dep dep ...")
needed=$(for m in "${modules[@]}"; do
  grep -E "(^|/)$m\.ko(\.[a-z]+)?:" "$modroot/lib/modules/$release/modules.dep" | tr -d ':' | tr ' ' '\n'
done | sort -u)
[ -n "$needed" ] || die "none of ${modules[*]} in the kernel package"
for path in $needed; do
  install -D -m 644 "$modroot/lib/modules/$release/$path" "$rootfs/lib/modules/$release/$path"
done
cp "$modroot/lib/modules/$release"/modules.{order,builtin,builtin.modinfo} "$rootfs/lib/modules/$release/"
depmod -b "$rootfs" "$release"

# Every exec costs a quarter of a second under TCG: one `mount -a` for every filesystem, no hostname(1).
cat >"$rootfs/etc/fstab" <<EOF
# Mounted by /init (mount -a), in this order.
proc /proc proc defaults 0 0
sysfs /sys sysfs defaults 0 0
devtmpfs /dev devtmpfs defaults 0 0
devpts /dev/pts devpts X-mount.mkdir 0 0
tmpfs /dev/shm tmpfs X-mount.mkdir 0 0
tmpfs /run tmpfs mode=755 0 0
tmpfs /tmp tmpfs mode=1777 0 0
cgroup2 /sys/fs/cgroup cgroup2 defaults 0 0
bpf /sys/fs/bpf bpf defaults 0 0
EOF
cat >"$rootfs/init" <<EOF
#!/bin/sh
# /init of the arm64 test guest (scripts/build-arm64-guest.sh): mount what the datapath and the harness use
# (/etc/fstab), load the modules, run /guest/main (the payload's) with its output on the console, power off.
export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin LC_ALL=C.UTF-8 HOME=/root
mount -a
mkdir -p /run/lock /run/netns
modprobe -a ${boot_modules[*]}
ip link set lo up
echo arm64-guest >/proc/sys/kernel/hostname
if [ -x /guest/main ]; then
  /guest/main
  echo "guest: /guest/main exited \$?"
else
  echo "guest: no /guest/main; a shell (exit powers off)"
  setsid sh -c 'exec sh </dev/ttyAMA0 >/dev/ttyAMA0 2>&1'
fi
echo o >/proc/sysrq-trigger
sleep 10
EOF
chmod 755 "$rootfs/init"
echo arm64-guest >"$rootfs/etc/hostname"

cp "$work/kernel/boot/vmlinuz-$release" "$out/vmlinuz"
cp -a "$work/headers/usr/include/." "$out/include/"
echo "$release" >"$out/kernel-release"
(cd "$rootfs" && find . -path ./debootstrap -prune -o -print | LC_ALL=C sort |
  cpio --quiet -o -H newc | gzip -1) >"$out/rootfs.cpio.gz"
touch "$out/complete"

rm -rf "$guest"
mv "$out" "$guest"
for old in "$cache"/guest-*; do
  [ "$old" = "$guest" ] || rm -rf "$old"
done
log "built $guest in $((SECONDS - start)) s ($(du -sh "$guest/rootfs.cpio.gz" | cut -f1) initramfs)"
report
[ "$shell" = 0 ] || boot_shell
