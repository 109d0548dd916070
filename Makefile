# Balancing — build, test and demo entry points. Every target that needs tools runs `setup` first.
SHELL := /bin/bash
PY := .venv/bin/python
BUILD := build
ARCH := $(shell uname -m | sed -e 's/x86_64/x86/' -e 's/aarch64/arm64/')
MULTIARCH := $(shell gcc -print-multiarch 2>/dev/null || echo $(shell uname -m)-linux-gnu)
BPF_CFLAGS := -O2 -g -Wall -Werror -target bpf -D__TARGET_ARCH_$(ARCH) -I/usr/include/$(MULTIARCH)
BPF_OBJ := $(BUILD)/bpf/balancing.o

.PHONY: all setup bpf lint test test-unit test-kernel demo bench clean

all: bpf

setup:
	@bash scripts/setup.sh

bpf: $(BPF_OBJ)

$(BPF_OBJ): bpf/balancing.c bpf/balancing.h
	@mkdir -p $(dir $@)
	clang $(BPF_CFLAGS) -c $< -o $@

# The same programs built for another BPF ISA level (e.g. build/bpf/balancing-v3.o): different instructions,
# same behaviour. The upgrade tests load one after the other to exercise the atomic program swap.
$(BUILD)/bpf/balancing-%.o: bpf/balancing.c bpf/balancing.h
	@mkdir -p $(dir $@)
	clang $(BPF_CFLAGS) -mcpu=$* -c $< -o $@

lint: setup
	$(PY) -m ruff format --check src tests bench
	$(PY) -m ruff check src tests bench
	$(PY) -m mypy
	.venv/bin/lint-imports

test: setup bpf lint
	$(PY) -m pytest -q -p no:cacheprovider tests

test-unit: setup
	$(PY) -m pytest -q tests/unit

test-kernel: setup bpf
	$(PY) -m pytest -q tests/kernel

demo: setup bpf
	$(PY) scripts/demo.py

bench: setup bpf
	$(PY) bench/run.py

clean:
	rm -rf $(BUILD)
