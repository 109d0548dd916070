# Balancing — build, test and demo entry points. Every target that needs tools runs `setup` first.
SHELL := /bin/bash
PY := .venv/bin/python
BUILD := build
ARCH := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
MULTIARCH := $(shell gcc -print-multiarch 2>/dev/null || echo $(shell uname -m)-linux-gnu)
BPF_CFLAGS := -O2 -g -Wall -Werror -target bpf -D__TARGET_ARCH_$(ARCH) -I/usr/include/$(MULTIARCH)
BPF_OBJ := $(BUILD)/bpf/balancing.o
SOCKTERM_OBJ := $(BUILD)/bpf/sockterm.o
SOCKMIGRATE_OBJ := $(BUILD)/bpf/sockmigrate.o
NODEPORT_OBJ := $(BUILD)/bpf/nodeport.o

.PHONY: all setup bpf cluster wheel lint test test-unit test-kernel demo bench bench-hooks bench-memory bench-changes bench-nodeport bench-maglev bench-scale clean

all: bpf

setup:
	@bash scripts/setup.sh

bpf: $(BPF_OBJ) $(SOCKTERM_OBJ) $(SOCKMIGRATE_OBJ) $(NODEPORT_OBJ)

$(BPF_OBJ): bpf/balancing.c bpf/balancing.h bpf/accounting.h
	@mkdir -p $(dir $@)
	clang $(BPF_CFLAGS) -c $< -o $@

# Socket termination (iter/udp + bpf_sock_destroy, kernel >= 6.5): a separate object, so that the datapath
# still loads where the kfunc is missing. Kernel types come from CO-RE declarations in the source, not vmlinux.h.
$(SOCKTERM_OBJ): bpf/sockterm.c bpf/balancing.h bpf/iter.h
	@mkdir -p $(dir $@)
	clang $(BPF_CFLAGS) -c $< -o $@

# The upgrade from 0.3 (iter/tcp + iter/udp): moves connected sockets' reverse state from 0.3's bl_sock_v2 pin
# into their socket storage, run once by the loader when that pin exists. CO-RE declarations, no vmlinux.h.
$(SOCKMIGRATE_OBJ): bpf/sockmigrate.c bpf/balancing.h bpf/iter.h
	@mkdir -p $(dir $@)
	clang $(BPF_CFLAGS) -c $< -o $@

# North-south (TC on the node's devices): a separate object sharing the datapath's pinned maps, loaded only
# where the agent is given devices (--nodeport-devices).
$(NODEPORT_OBJ): bpf/nodeport.c bpf/balancing.h bpf/accounting.h
	@mkdir -p $(dir $@)
	clang $(BPF_CFLAGS) -c $< -o $@

# The same programs built for another BPF ISA level (e.g. build/bpf/balancing-v3.o): different instructions,
# same behaviour. The upgrade tests load one after the other to exercise the atomic program swap.
$(BUILD)/bpf/balancing-%.o: bpf/balancing.c bpf/balancing.h bpf/accounting.h
	@mkdir -p $(dir $@)
	clang $(BPF_CFLAGS) -mcpu=$* -c $< -o $@

# The real control plane of the cluster tests (tests/cluster: etcd, kube-apiserver, the Service controllers),
# a Go test fixture only. Go's module and build caches (GOMODCACHE, GOCACHE) make a rebuild after a source
# change incremental; make's timestamps skip the go command entirely when nothing changed.
CLUSTER_BIN := $(BUILD)/cluster/cluster
# The machine kind's Go (scripts/setup.sh checks it); /usr/local/go/bin when a shell's PATH lacks it.
GO ?= $(shell command -v go 2>/dev/null || echo /usr/local/go/bin/go)
# The release of k8s.io/kubernetes in tests/cluster/go.mod, stamped as the server's version (kubectl version).
KUBE_VERSION := $(shell sed -n 's/^\tk8s.io\/kubernetes v//p' tests/cluster/go.mod 2>/dev/null)
KUBE_LDFLAGS := $(foreach p,k8s.io/component-base/version k8s.io/client-go/pkg/version,\
  -X $(p).gitVersion=v$(KUBE_VERSION) -X $(p).gitMajor=$(word 1,$(subst ., ,$(KUBE_VERSION))) \
  -X $(p).gitMinor=$(word 2,$(subst ., ,$(KUBE_VERSION))) -X $(p).gitTreeState=clean)
cluster: $(CLUSTER_BIN)

$(CLUSTER_BIN): $(wildcard tests/cluster/*.go) tests/cluster/go.mod tests/cluster/go.sum
	@mkdir -p $(dir $@)
	cd tests/cluster && $(GO) build -buildvcs=false -ldflags '$(KUBE_LDFLAGS)' -o $(abspath $@) .

# The sdist and the wheel built from it, in build/dist: the wheel carries the BPF objects as package data
# (balancing/bpf/*.o), compiled by hatch_build.py through the `bpf` target above into a temporary BUILD.
wheel: setup
	rm -rf $(BUILD)/dist
	uv build --quiet --out-dir $(BUILD)/dist
	@ls $(BUILD)/dist/*.whl

# mypy checks src, testkit, tests, bench and scripts (the `files` in pyproject.toml), all strict.
lint: setup
	$(PY) -m ruff format --check src testkit tests bench scripts hatch_build.py
	$(PY) -m ruff check src testkit tests bench scripts hatch_build.py
	$(PY) -m mypy
	.venv/bin/lint-imports

test: setup bpf cluster lint
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-kernel: setup bpf
	$(PY) -m pytest -q tests/kernel

demo: setup bpf
	$(PY) scripts/demo.py

bench: setup bpf
	$(PY) bench/run.py

# Per-hook BPF cost (ns/run under bpf_stats) for TCP connects and UDP datagrams, and the whole client's time
# vs a hook-free cgroup, HEAD's object vs the working tree's, side by side; e.g.
# ARGS="--services 1,10000,100000 --rounds 5" (-o json: one JSON document).
bench-hooks: setup bpf
	$(PY) bench/hooks.py $(ARGS)

# One endpoint change after a full sync of 100k Services, the long-lived heap frozen (gc.freeze, as the agent
# does after its first full sync) or not, side by side: a forced full collection's pause and the change latency.
bench-changes: setup bpf
	$(PY) bench/changes.py $(ARGS)

# North-south NodePort: new-connection rate and connect latency through the TC path vs a kube-proxy-shaped
# iptables NodePort vs routing straight to the pod, with 1 and 10,000 Services (root; several minutes).
bench-nodeport: setup bpf
	$(PY) bench/nodeport.py $(ARGS)

# Maglev table build time per table size and backend count (pure Python, the agent's cost per frontend).
bench-maglev: setup
	$(PY) bench/maglev.py $(ARGS)

# Issue 15's table at 10k and 100k Services: decoding, model, map writes, peak RSS, change latency, agent start
# to /readyz on big manifests, NodePort at 1000 nodes (root; minutes; ARGS="--only decode,model" for a subset).
bench-scale: setup bpf
	$(PY) bench/scale.py $(ARGS)

# Memory over a long Kubernetes-mode run under churn (no kernel, no root); e.g. ARGS="--duration 120 -o json".
bench-memory: setup
	$(PY) bench/memory.py $(ARGS)

# The image, built here without a registry or a Docker daemon (scripts/build-image.sh; deploy/Containerfile is
# the recipe). The debootstrap base and podman's storage are cached in IMAGE_CACHE, so later builds only redo
# the wheel's layer. IMAGE: the tag (default localhost/balancing:<version>); IMAGE_SAVE=FILE: also an OCI
# archive. Run it with the CONTAINERS_CONF and CONTAINERS_STORAGE_CONF the script prints.
IMAGE ?=
IMAGE_CACHE ?= /var/cache/balancing-image
IMAGE_SAVE ?=

.PHONY: image
image: setup bpf
	BALANCING_IMAGE_CACHE=$(IMAGE_CACHE) bash scripts/build-image.sh $(if $(IMAGE),--tag $(IMAGE)) \
	  $(if $(IMAGE_SAVE),--save $(IMAGE_SAVE))

clean:
	rm -rf $(BUILD)
