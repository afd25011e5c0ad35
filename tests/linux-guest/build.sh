#!/usr/bin/env bash
# Builds the Linux guest of the QEMU proof test (tests/tests/linux_guest.rs) into OUT:
# - vmlinuz: this machine's Debian kernel, unchanged;
# - initrd.img: busybox and the modules the guest needs (virtio, ext4, vfat, the ACPI button,
#   evdev), an /init that mounts the root volume (/dev/vda, ext4) and switches to it;
# - beat-initrd.img: the live-migration guest, a heartbeat without a root volume (see below);
# - rootfs.img: the root file system (ext4, 32 MiB) with busybox and /sbin/proof, which runs the
#   checks and prints one `guest-check: <check> <uptime> <details>` line each.
# Usage: build.sh OUT [KERNEL_RELEASE]
set -euo pipefail
OUT=${1:?usage: build.sh OUT [KERNEL_RELEASE]}
KVER=${2:-$(ls /lib/modules | sort -V | tail -1)}
MODDIR=/lib/modules/$KVER
BUSYBOX=$(command -v busybox)
[ -f "/boot/vmlinuz-$KVER" ] || { echo "build.sh: /boot/vmlinuz-$KVER is missing (linux-image-amd64)" >&2; exit 1; }
file -L "$BUSYBOX" 2>/dev/null | grep -q 'statically linked' || ldd "$BUSYBOX" 2>&1 | grep -q 'not a dynamic' \
  || { echo "build.sh: $BUSYBOX is not static (busybox-static)" >&2; exit 1; }
mkdir -p "$OUT"
W=$(mktemp -d "$OUT/work.XXXXXX")
trap 'rm -rf "$W"' EXIT

# Module paths (relative to MODDIR) with their dependencies, dependencies first; names the kernel
# has built in are skipped.
closure() {
  python3 - "$MODDIR" "$@" <<'PY'
import sys
d, want = sys.argv[1], sys.argv[2:]
norm = lambda s: s.replace('-', '_')
dep = {}
for l in open(d + '/modules.dep'):
    k, v = l.split(':', 1)
    dep[k] = v.split()
by_name = {norm(k.rsplit('/', 1)[1].split('.ko')[0]): k for k in dep}
builtin = {norm(l.strip().rsplit('/', 1)[1].split('.ko')[0]) for l in open(d + '/modules.builtin')}
out = []
def add(p):
    for q in dep[p]:
        add(q)
    if p not in out:
        out.append(p)
for n in map(norm, want):
    if n in by_name:
        add(by_name[n])
    elif n not in builtin:
        sys.exit(f'build.sh: no module {n} in {d}')
print('\n'.join(out))
PY
}

root_dirs() { mkdir -p "$1"/{bin,sbin,proc,sys,dev,tmp,etc,mnt,run,seed}; cp "$BUSYBOX" "$1/bin/busybox"
  for a in $("$BUSYBOX" --list | grep -vx busybox); do [ -e "$1/bin/$a" ] || ln -s busybox "$1/bin/$a"; done; }

# The initramfs: modules, then the root volume.
I=$W/initrd; root_dirs "$I"; mkdir -p "$I/mods" "$I/newroot"
: > "$I/mods/order"
for m in $(closure virtio_pci virtio_blk virtio_net virtio_rng crc32c_generic ext4 vfat nls_cp437 nls_ascii nls_utf8 button evdev); do
  f=$(basename "$m"); case $f in
    *.ko) cp "$MODDIR/$m" "$I/mods/$f" ;;
    *.ko.xz) xz -dc "$MODDIR/$m" > "$I/mods/${f%.xz}"; f=${f%.xz} ;;
    *.ko.zst) zstd -qdc "$MODDIR/$m" > "$I/mods/${f%.zst}"; f=${f%.zst} ;;
  esac
  echo "$f" >> "$I/mods/order"
done
cat > "$I/init" <<'SH'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod /mods/$m || echo "guest-fail: insmod $m"; done
for i in $(seq 100); do [ -b /dev/vda ] && break; sleep 0.1; done
mount -t ext4 /dev/vda /newroot || { echo "guest-fail: cannot mount the root volume /dev/vda"; sleep 5; poweroff -f; }
mount --move /dev /newroot/dev; mount --move /proc /newroot/proc; mount --move /sys /newroot/sys
exec switch_root /newroot /sbin/proof
SH
chmod +x "$I/init"
(cd "$I" && find . | cpio -o -H newc --quiet) | gzip -1 > "$OUT/initrd.img"

# The live-migration guest (tests/tests/linux_migrate.rs): the same modules, no root volume; its
# /init brings eth0 up at beat.ip (a /24) and prints one line a second, through the tty (the
# UART's interrupts) and through the kernel log (printk writes the console by polling):
#   guest-beat: <n> <uptime> <unix time> gw=ok|lost peer=ok|lost|- disk=ok|err|-
#   guest-kbeat: <n>
# Each beat pings beat.gw and beat.peer (if given) once, and writes "beat <n>" to the first
# sector of /dev/vda (if there is one) with a flush.
B=$W/beat; root_dirs "$B"; cp -r "$I/mods" "$B/mods"
cat > "$B/init" <<'SH'
#!/bin/sh
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
for m in $(cat /mods/order); do insmod /mods/$m 2>/dev/null; done
arg() { tr ' ' '\n' < /proc/cmdline | sed -n "s/^beat\.$1=//p"; }
ip=$(arg ip); gw=$(arg gw); peer=$(arg peer)
for i in $(seq 100); do [ -e /sys/class/net/eth0 ] && break; sleep 0.1; done
ip link set lo up; ip link set eth0 up; ip addr add "$ip/24" dev eth0
n=0
while :; do
  n=$((n+1))
  # The kernel log first: printk writes the console at once, while the tty drains its line
  # through the UART during the second this beat sleeps, so the two never interleave.
  echo "guest-kbeat: $n" > /dev/kmsg
  if ping -c 1 -W 1 "$gw" >/dev/null 2>&1; then g=ok; else g=lost; fi
  p=-; [ -n "$peer" ] && { ping -c 1 -W 1 "$peer" >/dev/null 2>&1 && p=ok || p=lost; }
  d=-; [ -b /dev/vda ] && { echo "beat $n" | dd of=/dev/vda bs=512 count=1 conv=fsync,notrunc 2>/dev/null && d=ok || d=err; }
  echo "guest-beat: $n $(cut -d' ' -f1 /proc/uptime) $(date -u +%s) gw=$g peer=$p disk=$d"
  sleep 1
done
SH
chmod +x "$B/init"
(cd "$B" && find . | cpio -o -H newc --quiet) | gzip -1 > "$OUT/beat-initrd.img"

# The root file system: busybox and the checks.
R=$W/root; root_dirs "$R"; mkdir -p "$R/etc/acpi/PWRF"
cat > "$R/sbin/proof" <<'SH'
#!/bin/sh
# The proof guest: one `guest-check:` line per check, then it waits for the ACPI power button.
up() { cut -d' ' -f1 /proc/uptime; }
say() { echo "guest-check: $1 $(up) $2"; }
fail() { echo "guest-fail: $*"; }
mount -t tmpfs tmp /tmp; mount -t tmpfs run /run
say userspace "root=$(awk '$2=="/"{print $1}' /proc/mounts)"
# cloud-init's NoCloud seed: the FAT disk holding meta-data (nodeos attaches it last).
seed=""
for d in /dev/vd?; do
  [ "$d" = /dev/vda ] && continue
  if mount -t vfat -o ro "$d" /seed 2>/dev/null; then
    [ -f /seed/meta-data ] && { seed=$d; break; }
    umount /seed
  fi
done
if [ -n "$seed" ]; then
  # user-data here is a shell fragment: TOKEN=... PEER=...
  . /seed/user-data
  host=$(sed -n 's/^local-hostname: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' /seed/meta-data)
  inst=$(sed -n 's/^instance-id: *"\{0,1\}\([^"]*\)"\{0,1\}$/\1/p' /seed/meta-data)
  hostname "$host"
  say cloud-init "hostname=$host instance=$inst seed=$seed"
else
  fail "cloud-init: no seed disk with meta-data among $(echo /dev/vd?)"
fi
# The root volume: a file the host reads back through the NBD export.
echo "proof $TOKEN" > /proof.txt && sync && say volume "token=$TOKEN"
say vcpus "online=$(cat /sys/devices/system/cpu/online) count=$(grep -c ^processor /proc/cpuinfo)"
say clock "date=$(date -u +%s) rtc=$(cat /sys/class/rtc/rtc0/since_epoch 2>/dev/null || echo none)"
# The pool network: a lease from the switch's DHCP, then the gateway and the other VM.
cat > /tmp/dhcp <<'EOS'
#!/bin/sh
[ "$1" = bound ] || exit 0
ip addr add "$ip/${mask:-24}" dev "$interface"
[ -n "$router" ] && ip route add default via "${router%% *}"
echo "$ip ${router%% *}" > /tmp/lease
EOS
chmod +x /tmp/dhcp
ip link set lo up; ip link set eth0 up
if udhcpc -i eth0 -n -q -t 20 -T 3 -s /tmp/dhcp >/dev/null 2>&1; then
  read ip gw < /tmp/lease
  say dhcp "ip=$ip gateway=$gw"
  # The gateway at once; the other VM once it is up (it may boot later).
  if ping -c 3 -W 3 "$gw" >/dev/null 2>&1; then
    ok=""
    for i in $(seq 150); do ping -c 1 -W 2 "$PEER" >/dev/null 2>&1 && { ok=1; break; }; sleep 1; done
    [ -n "$ok" ] && say ping "gateway=$gw peer=$PEER" || fail "ping: the peer $PEER does not answer"
  else
    fail "ping: the gateway $gw does not answer"
  fi
else
  fail "dhcp: no lease on eth0"
fi
# Graceful stop: the ACPI power button (GED) → busybox acpid → poweroff (ACPI S5).
printf '#!/bin/sh\necho "guest-check: power-button $(cut -d" " -f1 /proc/uptime)"\nsync\nmount -o remount,ro /\npoweroff -f\n' > /etc/acpi/PWRF/00000080
chmod +x /etc/acpi/PWRF/00000080
acpid -d >/dev/null 2>&1 &
say ready ""
while :; do sleep 1000; done
SH
chmod +x "$R/sbin/proof"
rm -f "$OUT/rootfs.img"
truncate -s 32M "$OUT/rootfs.img"
mkfs.ext4 -q -F -L proof-root -d "$R" "$OUT/rootfs.img"
cp "/boot/vmlinuz-$KVER" "$OUT/vmlinuz"
echo "build.sh: $OUT: kernel $KVER, initrd $(stat -c %s "$OUT/initrd.img") bytes, rootfs 32 MiB"
