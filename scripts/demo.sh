#!/usr/bin/env bash
# Starts (or stops) a local 3-node nodeos pool on loopback; state under ./.demo/.
# Running `start` again while the pool runs only prints its status.
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${NODEOS_BIN:-target/debug/nodeos}
DEMO=.demo
PORTS=(7700 7701 7702)
SEEDS=127.0.0.1:7700,127.0.0.1:7701,127.0.0.1:7702

running() { [[ -f $DEMO/n$1.pid ]] && kill -0 "$(cat "$DEMO/n$1.pid")" 2>/dev/null; }

start() {
  mkdir -p "$DEMO"
  if [[ ! -f $DEMO/pool.key ]]; then
    (umask 077; head -c 32 /dev/urandom | base64 > "$DEMO/pool.key")
  fi
  # The demo pool speaks mutual TLS like any other: an admin credential made
  # from its key, saved as context "demo" of the CLI config (and made current).
  "$BIN" --endpoint "$SEEDS" auth bootstrap --offline --pool-key-file "$DEMO/pool.key" \
    --name demo-admin --save-as demo >/dev/null
  for i in 0 1 2; do
    if running "$i"; then continue; fi
    "$BIN" node --data-dir "$DEMO/n$i" --pool demo --pool-key-file "$DEMO/pool.key" \
      --listen "127.0.0.1:${PORTS[$i]}" --seeds "$SEEDS" --bootstrap-expect 3 \
      --block-listen "127.0.0.1:$((7800 + i))" --nbd-listen "127.0.0.1:$((10809 + i))" \
      --vxlan-listen "127.0.0.1:$((4789 + i))" --host-images-dir "$PWD" \
      >>"$DEMO/n$i.log" 2>&1 &
    echo $! > "$DEMO/n$i.pid"
    echo "started node $i (pid $!, API 127.0.0.1:${PORTS[$i]}, log $DEMO/n$i.log)"
  done
  echo "waiting for the pool to form..."
  for _ in $(seq 1 60); do
    if "$BIN" --context demo --request-timeout 3 pool status -o json 2>/dev/null \
        | python3 -c '
import json, sys
try:
    s = json.load(sys.stdin)
except ValueError:
    sys.exit(1)
v = [m for m in s["members"] if m["role"] in ("leader", "voter") and m["health"] == "healthy"]
sys.exit(0 if s["pool_id"] and len(v) >= 3 else 1)'; then
      "$BIN" --context demo pool status
      demo_vm
      cat <<'TXT'

The pool is up. Try:
  target/debug/nodeos pool status                 # any node answers; context "demo" (nodeos config get-contexts)
  target/debug/nodeos node list -o json
  target/debug/nodeos meta put greeting hello     # a replicated write
  target/debug/nodeos --endpoint 127.0.0.1:7702 meta get greeting
  target/debug/nodeos audit list                  # who changed what (mutual TLS, credentials: README "Security")
  target/debug/nodeos pool watch                  # stream pool events (Ctrl-C to stop)
  target/debug/nodeos vm list                     # VMs; `vm console hello --from-start` shows the guest's serial output
Stop it with: make demo-stop   (state stays in ./.demo; rm -rf .demo to start afresh)
TXT
      return 0
    fi
    sleep 1
  done
  echo "the pool did not form within 60 s; see $DEMO/n*.log" >&2
  return 1
}

# A VM running the repository's test guest on node 0: it checks its virtio disk
# (a file under .demo/) and powers off; its console shows what it did.
demo_vm() {
  if [[ ! -e /dev/kvm ]]; then
    echo "no /dev/kvm on this machine: the demo VM is skipped"
    return 0
  fi
  local guest=tests/guest/build/nodeos-test-guest.elf
  [[ -f $DEMO/hello.img ]] || truncate -s 16M "$DEMO/hello.img"
  if ! "$BIN" vm show hello >/dev/null 2>&1; then
    "$BIN" vm create hello --vcpus 1 --memory 64 --kernel "$PWD/$guest" \
      --cmdline "mode=blk blk_seed=0x1234" --disk "$PWD/$DEMO/hello.img" >/dev/null
  fi
  local state
  state=$("$BIN" vm show hello -o json | python3 -c 'import json,sys; print(json.load(sys.stdin)["state"])')
  if [[ $state == stopped || $state == crashed ]]; then
    "$BIN" vm start hello >/dev/null
  fi
  echo
  echo "VM 'hello' (the test guest) on node 0; its serial console:"
  for _ in $(seq 1 60); do
    if "$BIN" vm console hello --from-start --no-follow 2>/dev/null | grep -q "NODEOS-GUEST: done"; then break; fi
    sleep 0.5
  done
  "$BIN" vm console hello --from-start --no-follow | sed 's/^/  | /'
  echo
  "$BIN" vm list
}

stop() {
  for i in 0 1 2; do
    if running "$i"; then
      kill "$(cat "$DEMO/n$i.pid")" && echo "stopped node $i"
    fi
    rm -f "$DEMO/n$i.pid"
  done
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac
