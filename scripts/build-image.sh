#!/usr/bin/env bash
# Build the Balancing image without a registry or a Docker daemon: `make image`, and the image test.
#
#   scripts/build-image.sh [--tag REF] [--save FILE.tar] [--refresh-base]
#
# deploy/Containerfile is the one recipe. A registry build runs all of it; here its stages `base` and `dist`
# are replaced by build contexts of the same names, so only its final stage runs (`podman build --isolation
# chroot --network host`: no CNI bridge, no daemon; pip in it trusts this host's CA bundle):
#   base  Debian bookworm (Python 3.11, libbpf1, iproute2) made with debootstrap, imported as an image and
#         cached, keyed by the suite, architecture, mirrors, package list and this recipe's version
#         (--refresh-base rebuilds it, e.g. for Debian's security updates);
#   dist  the project's wheel (`uv build --wheel`) and its locked runtime requirements (`uv export --no-dev`).
#
# Everything lives in $BALANCING_IMAGE_CACHE (default /var/cache/balancing-image), outside the repository and
# never in /etc/containers:
#   containers.conf, storage.conf   podman's configuration (runc, cgroupfs, low ulimits, overlay, file events),
#                                   used through CONTAINERS_CONF and CONTAINERS_STORAGE_CONF
#   storage/  run/  tmp/            podman's image store, its run-time state, its temporary files
#   work/                           per-build scratch (the debootstrap rootfs, the dist context), removed after
#   lock                            builds are serialised with flock
# Later builds reuse the base image and podman's layer cache (the requirements layer too), so they only build
# the wheel and the final layer.
#
# Progress goes to stderr. On success stdout ends with what a caller needs to run the image:
#   IMAGE=<ref>  CONTAINERS_CONF=<path>  CONTAINERS_STORAGE_CONF=<path>   (one per line)
set -euo pipefail
self=$(realpath "$0")

cache=${BALANCING_IMAGE_CACHE:-/var/cache/balancing-image}
mirror=${BALANCING_DEBIAN_MIRROR:-http://deb.debian.org/debian}
security_mirror=${BALANCING_DEBIAN_SECURITY_MIRROR:-http://deb.debian.org/debian-security}
suite=bookworm  # its python3 is 3.11, as pyproject.toml requires
base_packages=(python3 python3-venv libbpf1 iproute2)
base_recipe=2  # bump when the base's recipe below changes: a new cache key
tag="" save="" refresh_base=0

usage() { sed -n '2,/^set -euo/p' "$self" | sed -e '$d' -e 's/^# \{0,1\}//' >&2; exit "${1:-2}"; }
while [ $# -gt 0 ]; do
  case $1 in
    --tag) tag=$2; shift 2 ;;
    --save) save=$(realpath -m "$2"); shift 2 ;;
    --refresh-base) refresh_base=1; shift ;;
    -h | --help) usage 0 ;;
    *) echo "build-image: unknown argument $1" >&2; usage ;;
  esac
done

log() { echo "build-image: $*" >&2; }
die() { log "$*"; exit 1; }
cd "$(dirname "$self")/.."
repo=$PWD

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, podman's storage)"
for tool in podman runc debootstrap uv; do
  command -v "$tool" >/dev/null || die "$tool is missing: run scripts/setup.sh"
done

mkdir -p "$cache"/{storage,run,tmp}
exec 9>"$cache/lock"
flock 9

# --- podman's configuration: this host has hybrid cgroups (crun refuses them), no systemd, and root without
# CAP_SYS_RESOURCE (podman's default ulimits cannot be set), so: runc, cgroupfs, ulimits below the hard limits.
export CONTAINERS_CONF=$cache/containers.conf CONTAINERS_STORAGE_CONF=$cache/storage.conf
cat >"$CONTAINERS_CONF.tmp" <<EOF
# Written by scripts/build-image.sh; used through CONTAINERS_CONF.
[containers]
default_ulimits = ["nofile=20000:20000", "nproc=32768:32768"]

[engine]
runtime = "runc"
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$cache/tmp/events.log"
tmp_dir = "$cache/tmp"

[network]
network_config_dir = "$cache/net.d"
EOF
cat >"$CONTAINERS_STORAGE_CONF.tmp" <<EOF
# Written by scripts/build-image.sh; used through CONTAINERS_STORAGE_CONF.
[storage]
driver = "overlay"
graphroot = "$cache/storage"
runroot = "$cache/run"
EOF
mv "$CONTAINERS_CONF.tmp" "$CONTAINERS_CONF"
mv "$CONTAINERS_STORAGE_CONF.tmp" "$CONTAINERS_STORAGE_CONF"

# Podman's run-time state must not outlive a reboot (it counts mounts there); /run is not a tmpfs everywhere.
boot_id=$(cat /proc/sys/kernel/random/boot_id)
if [ "$(cat "$cache/boot_id" 2>/dev/null)" != "$boot_id" ]; then
  rm -rf "${cache:?}/run" "${cache:?}/tmp"
  mkdir -p "$cache/run" "$cache/tmp"
  echo "$boot_id" >"$cache/boot_id"
fi

# One build at a time (the lock), in a scratch directory of a fixed name: podman's layer cache keys a COPY
# from a build context on its path as well as its content.
work=$cache/work
cleanup() {
  # debootstrap mounts /proc and /sys in its target; a failed run can leave them behind.
  local m
  for m in $(awk -v w="$work/" 'index($2, w) == 1 { print $2 }' /proc/mounts | sort -r); do
    umount -l "$m" || true
  done
  rm -rf "$work"
}
cleanup
trap cleanup EXIT
mkdir -p "$work"

arch=$(dpkg --print-architecture)
key=$(printf '%s\n' "$base_recipe" "$suite" "$arch" "$mirror" "$security_mirror" "${base_packages[@]}" |
  sha256sum | cut -c1-12)
base=localhost/balancing-base:$suite-$arch-$key

build_base() {
  local rootfs=$work/rootfs start=$SECONDS
  log "building the base $base: debootstrap $suite ($arch) + ${base_packages[*]}"
  debootstrap --variant=minbase --arch="$arch" "$suite" "$rootfs" "$mirror" >"$work/debootstrap.log" 2>&1 ||
    { tail -20 "$work/debootstrap.log" >&2; die "debootstrap failed (log above)"; }
  log "debootstrap took $((SECONDS - start)) s"
  cat >"$rootfs/etc/apt/sources.list" <<EOF
deb $mirror $suite main
deb $mirror $suite-updates main
deb $security_mirror $suite-security main
EOF
  # Documentation is not installed (copyright notices are), as in Debian's slim images.
  cat >"$rootfs/etc/dpkg/dpkg.cfg.d/balancing-slim" <<EOF
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/info/*
path-exclude /usr/share/locale/*
EOF
  chroot "$rootfs" /bin/sh -ec "
    export DEBIAN_FRONTEND=noninteractive LC_ALL=C
    apt-get update -qq
    apt-get upgrade -y -qq
    apt-get install -y -qq --no-install-recommends ${base_packages[*]}
    apt-get clean
    rm -rf /var/lib/apt/lists/* /var/cache/ldconfig/aux-cache /var/log/*.log /var/log/apt/*
    # What debootstrap installed before the exclusions: its documentation and translations too.
    find /usr/share/doc -mindepth 1 -not -name copyright -not -type d -delete
    find /usr/share/doc -mindepth 1 -type d -empty -delete
    find /usr/share/man /usr/share/info -mindepth 1 -delete
    find /usr/share/locale -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
  " >"$work/apt.log" 2>&1 || { tail -20 "$work/apt.log" >&2; die "installing the base's packages failed"; }
  log "upgrade and install took $((SECONDS - start)) s so far"
  : >"$rootfs/etc/resolv.conf"  # the runtime provides it
  tar -C "$rootfs" --numeric-owner -c . | podman import --quiet - "$base" >/dev/null
  # Older bases (another package list or recipe) are no longer used.
  podman images --format '{{.Repository}}:{{.Tag}}' localhost/balancing-base | grep -vxF "$base" |
    xargs -r podman rmi --force >/dev/null || true
  log "base built in $((SECONDS - start)) s"
}

if [ "$refresh_base" = 1 ] || ! podman image exists "$base"; then
  build_base
else
  log "reusing the base $base"
fi

# --- dist: the wheel and the locked runtime requirements (hashes checked at install).
dist=$work/dist
mkdir -p "$dist"
uv build --quiet --wheel -o "$dist" "$repo" >&2
uv export --quiet --frozen --no-dev --no-emit-project --no-emit-workspace --format requirements-txt \
  -o "$dist/requirements.txt" >&2
wheels=("$dist"/balancing-*.whl)
[ ${#wheels[@]} = 1 ] && [ -f "${wheels[0]}" ] || die "uv build made no single wheel: ${wheels[*]}"
python3 -c 'import sys, zipfile; names = zipfile.ZipFile(sys.argv[1]).namelist()
sys.exit(not {"balancing/bpf/balancing.o", "balancing/bpf/sockterm.o"} <= set(names))' "${wheels[0]}" \
  || die "the wheel carries no balancing/bpf/*.o (hatch_build.py builds them with make bpf)"

version=$(basename "${wheels[0]}" | cut -d- -f2)
default_tag=localhost/balancing:$version
tag=${tag:-$default_tag}
# pip in the build trusts what this host trusts (the host may reach PyPI through a TLS-inspecting proxy).
ca=${PIP_CERT:-${SSL_CERT_FILE:-/etc/ssl/certs/ca-certificates.crt}}
ca_args=()
[ -f "$ca" ] && ca_args=(--volume "$(realpath "$ca"):/run/build-ca.crt:ro" --build-arg PIP_CERT=/run/build-ca.crt)
start=$SECONDS
podman build --quiet --isolation chroot --network host --layers "${ca_args[@]}" \
  --build-context "base=container-image://$base" --build-context "dist=$dist" \
  -f deploy/Containerfile -t "$tag" "$dist" >/dev/null
if [ "$tag" = "$default_tag" ]; then  # the default tags of earlier versions would keep old layers forever
  podman images --format '{{.Repository}}:{{.Tag}}' localhost/balancing | grep -vxF "$tag" |
    xargs -r podman rmi >/dev/null || true
fi
podman image prune --force >/dev/null  # the images this tag replaced; the layer cache stays
size=$(podman image inspect --format '{{.Size}}' "$tag")
log "built $tag in $((SECONDS - start)) s ($((size / 1000000)) MB)"

if [ -n "$save" ]; then
  rm -f "$save"
  podman image save --quiet --format oci-archive -o "$save" "$tag"
  log "saved $tag to $save"
fi

echo "IMAGE=$tag"
echo "CONTAINERS_CONF=$CONTAINERS_CONF"
echo "CONTAINERS_STORAGE_CONF=$CONTAINERS_STORAGE_CONF"
