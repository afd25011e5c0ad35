# nodeos front door. `make verify` is exactly what CI runs.
SHELL := /bin/bash
CARGO ?= cargo
BIN := target/debug/nodeos
RELEASE_BIN := target/release/nodeos
# Hermetic protoc for crates that need one at build time (see scripts/protoc-path.sh).
ifeq ($(origin PROTOC), undefined)
PROTOC := $(shell scripts/protoc-path.sh)
endif
export PROTOC

.PHONY: test-deps build release test lint verify fmt bench bench-meta bench-vmm bench-block bench-switch bench-migrate demo demo-stop deps-check clean guest guest-test image

build:
	$(CARGO) build --workspace --bins

release:
	$(CARGO) build --release --bin nodeos

# What the tests need from the machine (scripts/test-deps.sh holds the one list): as root,
# installs what is missing; otherwise stops at once with the `apt-get install` line to run.
test-deps:
	scripts/test-deps.sh

# Unit, conformance, in-process and process-level tests, and the image booted in QEMU.
# Process-level pool tests need root (network namespaces); without it they print a loud
# SKIPPED line. Under CI=true a skip is a failure.
test: test-deps build guest image
	NODEOS_BIN=$(CURDIR)/$(BIN) $(CARGO) test --workspace --all-targets -- --test-threads=$${TEST_THREADS:-2}

lint: deps-check
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings

verify: lint test

fmt:
	$(CARGO) fmt --all

deps-check:
	python3 scripts/deps-check.py

bench: bench-meta bench-vmm bench-block bench-switch bench-migrate

# Metadata store against a 3-member etcd on loopback, same load generator.
bench-meta: release
	$(CARGO) build --release -p nodeos-bench --bin bench-meta
	NODEOS_BIN=$(CURDIR)/$(RELEASE_BIN) target/release/bench-meta

# The VMM against QEMU (-accel kvm -M pc), both booting the in-repo test guest.
bench-vmm: release guest
	$(CARGO) build --release -p nodeos-bench --bin bench-vmm
	NODEOS_BIN=$(CURDIR)/$(RELEASE_BIN) NODEOS_GUEST=$(CURDIR)/tests/guest/build/nodeos-test-guest.elf \
		target/release/bench-vmm

# Volumes over NBD against qemu-nbd on a raw file (same fio jobs), and
# re-replication after a node is killed against loopback TCP throughput.
bench-block: release
	$(CARGO) build --release -p nodeos-bench --bin bench-block
	NODEOS_BIN=$(CURDIR)/$(RELEASE_BIN) target/release/bench-block

# The switch (two nodes, tap ports, VXLAN between them) against a Linux
# bridge + vxlan device per node, in network namespaces; iperf3 TCP, 64-byte
# UDP and ping between the two clients of each side. Needs root.
bench-switch: release
	$(CARGO) build --release -p nodeos-bench --bin bench-switch
	NODEOS_BIN=$(CURDIR)/$(RELEASE_BIN) target/release/bench-switch

# Live migration (two nodes of a pool, VmService.Migrate) against QEMU's
# (two qemu-system-x86_64 -accel kvm, QMP migrate), the same dirtying test
# guest at several dirty rates, both on loopback.
bench-migrate: release guest
	$(CARGO) build --release -p nodeos-bench --bin bench-migrate
	NODEOS_BIN=$(CURDIR)/$(RELEASE_BIN) NODEOS_GUEST=$(CURDIR)/tests/guest/build/nodeos-test-guest.elf \
		target/release/bench-migrate

# A local 3-node pool on loopback, state under ./.demo/.
demo: guest
	$(CARGO) build -p nodeos
	scripts/demo.sh start

demo-stop:
	scripts/demo.sh stop

# The in-repo test guest (freestanding C, PVH ELF), built from source.
guest:
	$(MAKE) -C tests/guest

# Boots the test guest under QEMU (KVM and TCG) with virtio-blk and virtio-net.
guest-test: guest
	tests/guest/run-qemu.sh

# The node image in target/image/ (vmlinuz, initramfs.img, boot.ipxe, manifest.json):
# nodeos linked statically against glibc (the explicit --target keeps build scripts and
# proc-macros dynamic) as /init, the host's Debian kernel (or KERNEL=path) and the modules
# in initramfs/modules.txt. Same inputs, same image hash. IMAGE_ARGS: more image-builder flags.
# Debug info is stripped (symbols stay, for backtraces): the initramfs stays in every node's
# RAM, and line tables would make it about four times bigger.
# getrandom calls glibc's getrandom(3) directly: its default looks the function up with dlsym,
# which a static binary lacks, and falls back to opening /dev/urandom, which a confined VM
# worker may not do (block and migration handshakes after confinement then fail).
IMAGE_TARGET := x86_64-unknown-linux-gnu
IMAGE_NODEOS := target/$(IMAGE_TARGET)/release/nodeos
image:
	RUSTFLAGS='-C target-feature=+crt-static --cfg getrandom_backend="linux_getrandom" --remap-path-prefix=$(CURDIR)=/nodeos' CARGO_PROFILE_RELEASE_STRIP=debuginfo \
		$(CARGO) build --release --target $(IMAGE_TARGET) -p nodeos
	$(CARGO) build --release -p image-builder
	target/release/image-builder --nodeos $(IMAGE_NODEOS) --out target/image \
		$(if $(KERNEL),--kernel $(KERNEL)) $(if $(IPXE_DIR),--ipxe-dir $(IPXE_DIR)) $(IMAGE_ARGS)

clean:
	$(MAKE) -C tests/guest clean
	$(CARGO) clean
	rm -rf .demo
