# husk — build, test, demo, benchmarks.
#
#   make demo   builds everything (guest kernel and image included), starts a
#               private containerd and runs a container in a husk microVM
#   make test   runs the whole test suite (unit + end-to-end on real KVM)
#
# The guest kernel is cached in $(HUSK_CACHE_DIR) (default /var/cache/husk),
# keyed by its config and source version; the guest image is installed into
# $(HUSK_GUEST_DIR) (default /var/lib/husk/guest), where husk-vmm looks.

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
CARGO ?= cargo
PROFILE ?= release
HUSK_GUEST_DIR ?= /var/lib/husk/guest
HUSK_CACHE_DIR ?= /var/cache/husk
export HUSK_GUEST_DIR HUSK_CACHE_DIR
AGENT_TARGET := x86_64-unknown-linux-gnu
AGENT_BIN := target/$(AGENT_TARGET)/agent/husk-agent
# Static, and not position-independent: a static PIE carries 0.45 MB of
# relocations and rewrites its relocated data in every process that runs
# it; in the guest each of those bytes is host memory of every pod
# (docs/memory.md, "Making the idle pod smaller").
AGENT_RUSTFLAGS := -C target-feature=+crt-static -C relocation-model=static
CARGO_PROFILE_FLAG := $(if $(filter release,$(PROFILE)),--release,--profile $(PROFILE))
BIN_DIR := target/$(if $(filter dev,$(PROFILE)),debug,$(PROFILE))
BENCH_RUNS ?= 3
SOAK_CYCLES ?= 50

# Debian packages the build, the tests and the benchmarks need.
APT_PACKAGES := linux-source-6.1 build-essential flex bison bc libelf-dev libssl-dev cpio \
	qemu-system-x86 busybox-static libseccomp-dev libcap-ng-dev protobuf-compiler containerd runc \
	containernetworking-plugins iproute2

FUZZ_SECONDS ?= 20
DENSITY_PODS ?= 20
FUZZ_TARGETS := vsock_packets vsock_tx_chain net_tx_chain balloon_queues mmio_transport emulate_step ready_line guest_metrics profile_stack_walk xsave_ops

.PHONY: all deps build kernel kernel-profiling agent initramfs guest-image vmm test unit-test lint demo bench-boot bench-run bench-pod bench-density soak fuzz-smoke clean

all: build

## Install missing Debian packages (needs root; does nothing when all are there).
deps:
	@missing=$$(for p in $(APT_PACKAGES); do dpkg-query -W -f='$${Status}\n' $$p 2>/dev/null | grep -q '^install ok installed' || echo $$p; done); \
	if [ -n "$$missing" ]; then \
		echo "installing: $$missing"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $$missing >/dev/null; \
	fi
	@command -v cargo-nextest >/dev/null || $(CARGO) install --locked cargo-nextest

kernel: deps
	./guest-image/build-kernel.sh

## The guest kernel with frame pointers, for the guest profiler's stacks
## (installed in $(HUSK_GUEST_DIR)/profiling; docs/profiling.md).
kernel-profiling: deps
	./guest-image/build-kernel.sh --flavour profiling

agent:
	LIBSECCOMP_LINK_TYPE=static LIBSECCOMP_LIB_PATH=/usr/lib/x86_64-linux-gnu RUSTFLAGS="$(AGENT_RUSTFLAGS)" $(CARGO) build --locked --profile agent -p husk-agent -p husk-testprog --target $(AGENT_TARGET)

initramfs: agent vmm
	$(BIN_DIR)/husk-guest-image --agent $(AGENT_BIN) --output $(HUSK_GUEST_DIR)/initramfs.cpio

guest-image: kernel initramfs

vmm:
	$(CARGO) build --locked $(CARGO_PROFILE_FLAG) --workspace --bins

build: deps vmm guest-image

unit-test:
	$(CARGO) nextest run --locked $(CARGO_PROFILE_FLAG) --workspace --lib --bins

test: build kernel-profiling
	$(CARGO) nextest run --locked $(CARGO_PROFILE_FLAG) --workspace --no-fail-fast

## husk vs runc on one private containerd: ctr run, exec, idle memory.
bench-run: build
	$(BIN_DIR)/husk-bench-run --runs $(BENCH_RUNS)

## Host memory per idle pod: N idle pods of husk and of runc on one
## containerd, right after start and after 30 s idle.
## RECORD=1 also writes bench/results/density.json, the measurement
## deploy/runtimeclass.yaml's pod overhead is derived from.
bench-density: build
	$(BIN_DIR)/husk-bench-density --pods $(DENSITY_PODS) $(if $(RECORD),--record bench/results/density.json)

## husk vs runc pods through CRI: pod start to first HTTP answer, TCP
## throughput into the pod.
bench-pod: build
	$(BIN_DIR)/husk-bench-pod --runs $(BENCH_RUNS)

## 50 container run/delete cycles under a private containerd: nothing left
## behind, host memory flat.
soak: build
	HUSK_CYCLES=$(SOAK_CYCLES) $(CARGO) nextest run --locked --profile soak $(CARGO_PROFILE_FLAG) -p husk-e2e --no-capture -E 'test(run_delete_cycles_leave_nothing_behind)'

lint:
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --locked --workspace --all-targets -- -D warnings

demo: build
	$(BIN_DIR)/husk-demo

bench-boot: build
	$(BIN_DIR)/husk-bench-boot --runs $(BENCH_RUNS)

## Run every fuzz target briefly (cargo-fuzz, nightly toolchain).
fuzz-smoke:
	@command -v cargo-fuzz >/dev/null || $(CARGO) install --locked cargo-fuzz
	@mkdir -p fuzz/target
	cd fuzz && for t in $(FUZZ_TARGETS); do \
		mkdir -p corpus/$$t; seeds=""; [ -d seeds/$$t ] && seeds=seeds/$$t; \
		echo "== fuzz $$t ($(FUZZ_SECONDS) s)"; \
		if ! $(CARGO) +nightly fuzz run $$t corpus/$$t $$seeds -- -max_total_time=$(FUZZ_SECONDS) -rss_limit_mb=2048 >target/fuzz-$$t.log 2>&1; then \
			tail -n 60 target/fuzz-$$t.log; echo "fuzz target $$t FAILED (log: fuzz/target/fuzz-$$t.log)"; exit 1; \
		fi; \
		tail -n 1 target/fuzz-$$t.log; \
	done

clean:
	$(CARGO) clean
