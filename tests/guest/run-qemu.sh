#!/usr/bin/env bash
# Build the nodeos test guest and boot it under QEMU in several configurations.
#
#   tests/guest/run-qemu.sh [CASE...]      cases: boot all q35 readonly missing crash microvm dirty dirtyio exits blkbench
#                                          (default: all of them) and idle (only when named)
#
# Environment:
#   ACCELS="kvm tcg"     accelerators to try (kvm is skipped, loudly, without a usable /dev/kvm)
#   QEMU=qemu-system-x86_64
#   RUN_TIMEOUT=120      seconds per QEMU run (every run is bounded by timeout(1))
#   DIRTY_SECS=15        how long each dirty-mode run (dirty, dirtyio) lasts (it never ends by itself)
#   IDLE_SECS=15         how long the idle-mode run lasts (it never ends by itself)
#   KEEP_LOGS=1          keep the per-run logs directory even on success
#
# Exit status 0 when every run passed, 1 otherwise. All network traffic stays on
# 127.0.0.1 (QEMU's socket/udp netdev <-> host_peer.py).
set -uo pipefail

HERE=$(cd "$(dirname "$0")" && pwd)
QEMU=${QEMU:-qemu-system-x86_64}
ACCELS=${ACCELS:-kvm tcg}
RUN_TIMEOUT=${RUN_TIMEOUT:-120}
DIRTY_SECS=${DIRTY_SECS:-15}
IDLE_SECS=${IDLE_SECS:-15}
ELF=$HERE/build/nodeos-test-guest.elf
PY=${PYTHON:-python3}

make -s -C "$HERE" || { echo "run-qemu: FAIL build"; exit 1; }
command -v "$QEMU" >/dev/null || { echo "run-qemu: FAIL $QEMU not found"; exit 1; }

OUT=$(mktemp -d /tmp/nodeos-test-guest.XXXXXX)
CASES=("$@")
[ ${#CASES[@]} -eq 0 ] && CASES=(boot all q35 readonly missing crash microvm dirty dirtyio exits blkbench)

passed=0
failed=0
failed_names=()

pass() { echo "run-qemu: PASS $1"; passed=$((passed + 1)); }
fail() {
	echo "run-qemu: FAIL $1: $2 (log: $3)"
	failed=$((failed + 1))
	failed_names+=("$1")
	grep -a 'NODEOS-GUEST\|HOST-PEER\|VERIFY-BLK\|qemu' "$3" 2>/dev/null | sed 's/^/    /' | tail -n 40
}

free_udp_ports() { # two free loopback UDP ports
	"$PY" -c '
import socket
s = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2)]
for x in s: x.bind(("127.0.0.1", 0))
print(*[x.getsockname()[1] for x in s])'
}

# qemu_run LOG SECONDS ACCEL APPEND QEMU-ARGS... ; returns QEMU's (or timeout's) exit status
qemu_run() {
	local log=$1 secs=$2 accel=$3 append=$4
	shift 4
	local cmd=(timeout --kill-after=5 "$secs" "$QEMU" -accel "$accel" -m 128 -display none -no-reboot
		-kernel "$ELF" -append "$append" -serial stdio -monitor none
		-device isa-debug-exit,iobase=0xf4,iosize=0x04 "$@")
	echo "+ ${cmd[*]}" >"$log"
	"${cmd[@]}" </dev/null >>"$log" 2>&1
}

# check_ok NAME LOG RC PATTERN... : a finished run with every pattern present
check_ok() {
	local name=$1 log=$2 rc=$3
	shift 3
	# 1: isa-debug-exit got 0 ((0 << 1) | 1); the guest writes 0xf4 before the ACPI port
	if [ "$rc" != 1 ]; then
		fail "$name" "qemu exit status $rc" "$log"; return 1
	fi
	if grep -aq '^NODEOS-GUEST: .*FAIL' "$log"; then fail "$name" "guest reported FAIL" "$log"; return 1; fi
	local p
	for p in '^NODEOS-GUEST: boot ok ' '^NODEOS-GUEST: summary ok$' '^NODEOS-GUEST: done$' "$@"; do
		if ! grep -aEq "$p" "$log"; then fail "$name" "missing /$p/" "$log"; return 1; fi
	done
	return 0
}

have_kvm() { [ -r /dev/kvm ] && [ -w /dev/kvm ]; }

case_boot() { # default pc machine with its default devices, no virtio
	local name=$1 accel=$2 log=$OUT/$1.log
	qemu_run "$log" "$RUN_TIMEOUT" "$accel" "mode=boot"
	check_ok "$name" "$log" $? \
		'^NODEOS-GUEST: info start_info=0x[0-9a-f]+ magic=ok version=1 ' \
		'^NODEOS-GUEST: pci 00:00\.0 vendor=8086 device=1237 class=060000$' && pass "$name"
}

# net_case NAME ACCEL APPEND PEER-ARGS -- QEMU-ARGS...  (runs host_peer.py alongside;
# QEMU is bounded by NET_CASE_SECS, default RUN_TIMEOUT)
net_case() {
	local name=$1 accel=$2 append=$3 peer_args=$4
	shift 5
	local log=$OUT/$name.log plog=$OUT/$name.peer.log a b
	read -r a b < <(free_udp_ports)
	# shellcheck disable=SC2086
	local ready=$OUT/$name.peer.ready
	rm -f "$ready"
	timeout $((RUN_TIMEOUT + 10)) "$PY" "$HERE/host_peer.py" --listen-port "$a" --qemu-port "$b" \
		--timeout "$RUN_TIMEOUT" --ready-file "$ready" $peer_args >"$plog" 2>&1 &
	local peer=$!
	local i
	for i in $(seq 100); do [ -e "$ready" ] && break; sleep 0.1; done # the guest announces only once
	qemu_run "$log" "${NET_CASE_SECS:-$RUN_TIMEOUT}" "$accel" "$append" \
		-netdev "socket,id=n0,udp=127.0.0.1:$a,localaddr=127.0.0.1:$b" "$@"
	local rc=$?
	wait "$peer"
	local prc=$?
	cat "$plog" >>"$log"
	echo "$rc $prc"
}

case_all() { # pc, transitional virtio-blk + virtio-net, blk pattern verified on the host
	local name=$1 accel=$2 img=$OUT/$1.img
	truncate -s 8M "$img"
	local rcs rc prc
	rcs=$(net_case "$name" "$accel" "mode=all net_frames=4 blk_seed=0x5eed" "--frames 4 --pings 3" -- \
		-drive "file=$img,if=none,format=raw,id=d0" -device virtio-blk-pci,drive=d0 \
		-device virtio-net-pci,netdev=n0)
	read -r rc prc <<<"$rcs"
	local log=$OUT/$name.log
	check_ok "$name" "$log" "$rc" \
		'^NODEOS-GUEST: pci 00:0[0-9a-f]\.0 vendor=1af4 device=1001 class=010000$' \
		'^NODEOS-GUEST: pci 00:0[0-9a-f]\.0 vendor=1af4 device=1000 class=020000$' \
		'^NODEOS-GUEST: blk ok sectors=64 capacity=16384 seed=24301 flush=yes$' \
		'^NODEOS-GUEST: net mac=52:54:00:12:34:56 ' \
		'^NODEOS-GUEST: net rx NODEOS-HOST ping 2$' \
		'^NODEOS-GUEST: net ok tx=8 rx=4$' || return
	[ "$prc" = 0 ] || { fail "$name" "host_peer.py exit $prc" "$log"; return; }
	"$PY" "$HERE/verify_blk.py" "$img" --sectors 64 --seed 0x5eed >>"$log" 2>&1 ||
		{ fail "$name" "disk image does not hold the pattern" "$log"; return; }
	pass "$name"
}

case_q35() { # q35, modern-only devices, BARs forcibly re-assigned by the guest, net ends on net_expect
	local name=$1 accel=$2 img=$OUT/$1.img
	truncate -s 1M "$img"
	local rcs rc prc
	rcs=$(net_case "$name" "$accel" "mode=all bar_assign=force net_expect=3 net_frames=2 blk_sectors=100 blk_seed=7" \
		"--frames 2 --pings 3 --no-done" -- -M q35 \
		-drive "file=$img,if=none,format=raw,id=d0" -device virtio-blk-pci,drive=d0,disable-legacy=on \
		-device virtio-net-pci,netdev=n0,disable-legacy=on,mac=52:54:00:00:00:42)
	read -r rc prc <<<"$rcs"
	local log=$OUT/$name.log
	check_ok "$name" "$log" "$rc" \
		'^NODEOS-GUEST: pci 00:0[0-9a-f]\.0 vendor=1af4 device=1042 class=010000$' \
		'^NODEOS-GUEST: pci 00:0[0-9a-f]\.0 vendor=1af4 device=1041 class=020000$' \
		'^NODEOS-GUEST: pci 00:0[0-9a-f]\.0 bar4 assigned addr=0xc0' \
		'^NODEOS-GUEST: blk ok sectors=100 capacity=2048 seed=7 flush=yes$' \
		'^NODEOS-GUEST: net mac=52:54:00:00:00:42 ' \
		'^NODEOS-GUEST: net ok tx=5 rx=3$' || return
	[ "$prc" = 0 ] || { fail "$name" "host_peer.py exit $prc" "$log"; return; }
	"$PY" "$HERE/verify_blk.py" "$img" --sectors 100 --seed 7 >>"$log" 2>&1 ||
		{ fail "$name" "disk image does not hold the pattern" "$log"; return; }
	pass "$name"
}

case_readonly() {
	local name=$1 accel=$2 img=$OUT/$1.img log=$OUT/$1.log
	truncate -s 4M "$img"
	qemu_run "$log" "$RUN_TIMEOUT" "$accel" "mode=blk" -nodefaults \
		-drive "file=$img,if=none,format=raw,id=d0,readonly=on" -device virtio-blk-pci,drive=d0
	check_ok "$name" "$log" $? '^NODEOS-GUEST: blk ok readonly sectors=64 capacity=8192$' && pass "$name"
}

case_missing() { # failure path: mode=blk without a disk must FAIL and exit through 0xf4 with 1
	local name=$1 accel=$2 log=$OUT/$1.log
	qemu_run "$log" "$RUN_TIMEOUT" "$accel" "mode=blk" -nodefaults
	local rc=$?
	[ "$rc" = 3 ] || { fail "$name" "expected qemu exit 3 (debug-exit value 1), got $rc" "$log"; return; }
	for p in '^NODEOS-GUEST: blk FAIL no virtio-blk device$' '^NODEOS-GUEST: summary FAIL failures=1$' '^NODEOS-GUEST: done$'; do
		grep -aEq "$p" "$log" || { fail "$name" "missing /$p/" "$log"; return; }
	done
	pass "$name"
}

case_microvm() { # no firmware PCI, no PIT: PCI scan finds nothing, TSC falls back to the default
	local name=$1 accel=$2 log=$OUT/$1.log
	qemu_run "$log" "$RUN_TIMEOUT" "$accel" "mode=all" -M microvm -nodefaults
	check_ok "$name" "$log" $? '^NODEOS-GUEST: pci scan done devices=0$' \
		'^NODEOS-GUEST: blk skip no virtio-blk device$' '^NODEOS-GUEST: net skip no virtio-net device$' &&
		pass "$name"
}

case_crash() { # an exception must be reported and end the run with the failure exit
	local name=$1 accel=$2 log=$OUT/$1.log
	qemu_run "$log" "$RUN_TIMEOUT" "$accel" "mode=crash" -nodefaults
	local rc=$?
	[ "$rc" = 3 ] || { fail "$name" "expected qemu exit 3 (debug-exit value 1), got $rc" "$log"; return; }
	grep -aEq '^NODEOS-GUEST: FAIL exception vector=6 error=0x0 rip=0x10[0-9a-f]{4} ' "$log" ||
		{ fail "$name" "no exception report" "$log"; return; }
	pass "$name"
}

case_dirty() { # runs until timeout; needs >= 2 ok reports (so at least one verifying pass), the known pass-1 checksum, no CORRUPT
	local name=$1 accel=$2 log=$OUT/$1.log
	qemu_run "$log" "$DIRTY_SECS" "$accel" "mode=dirty dirty_mib=16" -nodefaults
	local rc=$?
	[ "$rc" = 124 ] || { fail "$name" "expected timeout (124), got $rc" "$log"; return; }
	if grep -aEq 'CORRUPT|FAIL' "$log"; then fail "$name" "corruption reported" "$log"; return; fi
	grep -aEq '^NODEOS-GUEST: dirty pass=1 checksum=309c1d09e7926803 ok max_gap_us=[0-9]+$' "$log" ||
		{ fail "$name" "pass 1 checksum differs from the reference" "$log"; return; }
	if grep -aq 'dirty stamp\|dirty blk\|dirty net' "$log"; then fail "$name" "dirty I/O lines without their keys" "$log"; return; fi
	local n
	n=$(grep -acE '^NODEOS-GUEST: dirty pass=[0-9]+ checksum=[0-9a-f]{16} ok max_gap_us=[0-9]+$' "$log")
	[ "$n" -ge 2 ] || { fail "$name" "only $n dirty reports in ${DIRTY_SECS}s" "$log"; return; }
	pass "$name ($n reports, last: $(grep -a 'dirty pass=' "$log" | tail -n1 | cut -d' ' -f3))"
}

case_dirtyio() { # dirty mode with dirty_blk, dirty_net and progress stamps; runs until timeout
	local name=$1 accel=$2 img=$OUT/$1.img log=$OUT/$1.log
	truncate -s 1M "$img"
	local rcs rc prc
	rcs=$(NET_CASE_SECS=$DIRTY_SECS net_case "$name" "$accel" \
		"mode=dirty dirty_blk=1 dirty_net=1 dirty_stamp_ms=200" "--frames 1 --pings 3" -- -nodefaults \
		-drive "file=$img,if=none,format=raw,id=d0" -device virtio-blk-pci,drive=d0 \
		-device virtio-net-pci,netdev=n0)
	read -r rc prc <<<"$rcs"
	[ "$rc" = 124 ] || { fail "$name" "expected timeout (124), got $rc" "$log"; return; }
	if grep -aEq 'CORRUPT|FAIL' "$log"; then fail "$name" "corruption or failure reported" "$log"; return; fi
	[ "$prc" = 0 ] || { fail "$name" "host_peer.py exit $prc" "$log"; return; }
	local p
	for p in '^NODEOS-GUEST: dirty blk start capacity=2048 span=64 flush=yes$' \
		'^NODEOS-GUEST: dirty net start mac=52:54:00:12:34:56$' \
		'^NODEOS-GUEST: dirty pass=1 checksum=309c1d09e7926803 ok max_gap_us=[0-9]+ net_rx=[0-4] net_tx=[1-5]$' \
		'^NODEOS-GUEST: dirty pass=[0-9]+ checksum=[0-9a-f]{16} ok max_gap_us=[0-9]+ net_rx=4 net_tx=5$' \
		'^NODEOS-GUEST: dirty blk pass=1 ok blk_writes=1 blk_verified=0$' \
		'^NODEOS-GUEST: dirty blk pass=[0-9]+ ok blk_writes=[0-9]+ blk_verified=[1-9][0-9]*$' \
		'^NODEOS-GUEST: dirty stamp seq=0 tsc=[0-9a-f]+$' '^NODEOS-GUEST: dirty stamp seq=1 tsc=[0-9a-f]+$'; do
		grep -aEq "$p" "$log" || { fail "$name" "missing /$p/" "$log"; return; }
	done
	# stamps: seq 0, 1, 2, ... in order, TSC increasing (the last line may be cut by the kill)
	grep -a '^NODEOS-GUEST: dirty stamp ' "$log" | head -n -1 | awk '{split($4, s, "="); split($5, t, "=");
		if (s[2] != NR - 1 || (NR > 1 && length(t[2]) < length(prev)) || (NR > 1 && length(t[2]) == length(prev) && t[2] <= prev)) exit 1;
		prev = t[2]}' || { fail "$name" "stamp lines out of sequence" "$log"; return; }
	"$PY" "$HERE/verify_blk.py" "$img" --dirty-span 64 >>"$log" 2>&1 ||
		{ fail "$name" "disk image does not hold the dirty_blk patterns" "$log"; return; }
	local n s
	n=$(grep -acE '^NODEOS-GUEST: dirty blk pass=[0-9]+ ok ' "$log")
	s=$(grep -ac '^NODEOS-GUEST: dirty stamp ' "$log")
	pass "$name ($n reports, $s stamps, last: $(grep -a 'dirty pass=' "$log" | tail -n1 | cut -d' ' -f3,5-))"
}

case_exits() { # benchmark mode: outb loop to an unclaimed port, timed with the TSC
	local name=$1 accel=$2 log=$OUT/$1.log
	qemu_run "$log" "$RUN_TIMEOUT" "$accel" "mode=exits exits_n=2000" -nodefaults
	check_ok "$name" "$log" $? '^NODEOS-GUEST: exits n=2000 tsc_cycles=[1-9][0-9]* tsc_khz=[1-9][0-9]*$' &&
		pass "$name"
}

case_blkbench() { # benchmark mode: random 4 KiB reads at qd 1, then writes at qd 32 (queue 128, FLUSH negotiated)
	local name=$1 accel=$2 img=$OUT/$1.img log=$OUT/$1.log
	truncate -s 16M "$img"
	qemu_run "$log" "$RUN_TIMEOUT" "$accel" "mode=blkbench blk_ops=300 blk_qd=1 blk_rw=read" -nodefaults \
		-drive "file=$img,if=none,format=raw,id=d0" -device virtio-blk-pci,drive=d0
	check_ok "$name" "$log" $? '^NODEOS-GUEST: blkbench start rw=read qd=1 ops=300 capacity=32768 queue_size=64 .*flush=yes' \
		'^NODEOS-GUEST: blkbench rw=read qd=1 ops=300 tsc_cycles=[1-9][0-9]* tsc_khz=[1-9][0-9]*$' || return
	log=$OUT/$1.qd32.log
	qemu_run "$log" "$RUN_TIMEOUT" "$accel" "mode=blkbench blk_ops=1000 blk_qd=32 blk_rw=write" -nodefaults \
		-drive "file=$img,if=none,format=raw,id=d0" -device virtio-blk-pci,drive=d0,disable-legacy=on
	check_ok "$name" "$log" $? '^NODEOS-GUEST: blkbench start rw=write qd=32 ops=1000 capacity=32768 queue_size=128 ' \
		'^NODEOS-GUEST: blkbench rw=write qd=32 ops=1000 tsc_cycles=[1-9][0-9]* tsc_khz=[1-9][0-9]*$' || return
	log=$OUT/$1.qdbad.log # qd 90 needs 270 descriptors: refused
	qemu_run "$log" "$RUN_TIMEOUT" "$accel" "mode=blkbench blk_qd=90" -nodefaults \
		-drive "file=$img,if=none,format=raw,id=d0" -device virtio-blk-pci,drive=d0
	local rc=$?
	[ "$rc" = 3 ] || { fail "$name" "blk_qd=90: expected qemu exit 3, got $rc" "$log"; return; }
	grep -aEq '^NODEOS-GUEST: blkbench FAIL blk_ops=2000 blk_qd=90 ' "$log" ||
		{ fail "$name" "blk_qd=90 was not refused" "$log"; return; }
	pass "$name"
}

case_idle() { # benchmark mode: the guest halts after its idle line; runs until timeout
	local name=$1 accel=$2 log=$OUT/$1.log
	qemu_run "$log" "$IDLE_SECS" "$accel" "mode=idle" -nodefaults
	local rc=$?
	[ "$rc" = 124 ] || { fail "$name" "expected timeout (124), got $rc" "$log"; return; }
	grep -aEq '^NODEOS-GUEST: idle$' "$log" || { fail "$name" "no idle line" "$log"; return; }
	pass "$name"
}

for accel in $ACCELS; do
	if [ "$accel" = kvm ] && ! have_kvm; then
		echo "run-qemu: SKIPPED accel=kvm: /dev/kvm is not usable by $(id -un) ***"
		continue
	fi
	for c in "${CASES[@]}"; do
		declare -F "case_$c" >/dev/null || { echo "run-qemu: unknown case $c"; exit 2; }
		"case_$c" "$c-$accel" "$accel"
	done
done

if [ "$failed" -ne 0 ]; then
	echo "run-qemu: $passed passed, $failed failed: ${failed_names[*]} (logs: $OUT)"
	exit 1
fi
if [ -n "${KEEP_LOGS:-}" ]; then
	echo "run-qemu: $passed passed, 0 failed (logs: $OUT)"
else
	rm -rf "$OUT"
	echo "run-qemu: $passed passed, 0 failed"
fi
exit 0
