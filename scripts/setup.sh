#!/usr/bin/env bash
# Idempotent set-up for `make demo` and `make test`: Debian packages (BPF toolchain, iproute2), uv, and the
# locked Python environment in .venv. Fast when everything is already there.
set -euo pipefail
cd "$(dirname "$0")/.."

need_pkgs=()
command -v clang >/dev/null || need_pkgs+=(clang)
command -v llc >/dev/null || need_pkgs+=(llvm)
[ -f /usr/include/bpf/bpf_helpers.h ] || need_pkgs+=(libbpf-dev)
command -v bpftool >/dev/null || need_pkgs+=(bpftool)
command -v ip >/dev/null || need_pkgs+=(iproute2)
command -v nsenter >/dev/null || need_pkgs+=(util-linux)
command -v nft >/dev/null || need_pkgs+=(nftables)  # the bare-metal test's nodes DNAT hostPorts as the portmap plugin does
ldconfig -p | grep -q 'libbpf.so.1 ' || need_pkgs+=(libbpf1)
if [ ${#need_pkgs[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_pkgs[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq "${need_pkgs[@]}" >/dev/null
fi

if ! command -v uv >/dev/null; then
  echo "setup: installing uv"
  python3 -m pip install -q --root-user-action=ignore uv
fi
uv sync --frozen --quiet
