#!/usr/bin/env bash
# What the tests need from the machine, in one list, and its installation.
#
#   scripts/test-deps.sh          check; as root, install what is missing (apt-get), then check again
#   scripts/test-deps.sh --check  check only; exit 1 naming what is missing
#   scripts/test-deps.sh --list   print the package names (one per line)
#
# Each line below is a Debian package and what proves it works: commands that must run
# (`cmd:NAME`) or files that must exist (`file:GLOB`). A package counts as present only when
# every proof holds, not when dpkg says it is installed: installing one package can remove
# another's commands (qemu-system-x86 from the base release replaces a newer qemu-utils from
# backports and takes qemu-img with it), so everything is checked again after the install.
# `make test` and `.ci/run` both run this script; not as root, a missing package stops the run
# at once with the `apt-get install` line to type.
set -euo pipefail

REQUIREMENTS=(
  "iproute2         cmd:ip"                          # network namespaces and bridges of the pool tests
  "python3          cmd:python3"                     # scripts/deps-check.py, the test guest's helpers
  "qemu-utils       cmd:qemu-img cmd:qemu-nbd cmd:qemu-io"  # images converted into volumes over NBD
  "fio              cmd:fio"                         # fio's nbd engine against the NBD server
  "busybox-static   cmd:busybox"                     # udhcpc, ping, arping, nc, tftp, udhcpd as stock clients
  "linux-image-amd64 file:/boot/vmlinuz-*"           # the kernel and modules of the node image
  "libc6-dev        file:/usr/lib/x86_64-linux-gnu/libc.a"  # nodeos is linked statically for the image
  "qemu-system-x86  cmd:qemu-system-x86_64"          # the QEMU pool and PXE tests boot the image
  "ipxe-qemu        file:/usr/lib/ipxe/qemu/efi-virtio.rom"  # the NIC boot ROM of the PXE test
  "e2fsprogs        cmd:mkfs.ext4 cmd:debugfs"       # the QEMU machines' data disks; the Linux guest's root read back
  "cpio             cmd:cpio"                        # the Linux guest's initramfs
  "acpica-tools     cmd:acpiexec"                    # ACPICA interprets the VMM's DSDT in the ACPI tests
  "dosfstools       cmd:fsck.fat"                    # checks the cloud-init seed's FAT images
  "etcd-server      cmd:etcd"                        # the peer of `make bench-meta`
  "etcd-client      cmd:etcdctl"
)
# Packages built from one source package that must come from the same release (a newer
# qemu-utils from backports next to the base release's qemu-system-x86 is removed by apt).
SAME_RELEASE=(qemu-system-x86 qemu-utils)

mode=install
case "${1:-}" in
  --check) mode=check ;;
  --list) mode=list ;;
  "") ;;
  *) echo "usage: $0 [--check|--list]" >&2; exit 2 ;;
esac

package_of() { echo "${1%% *}"; }

# Prints the first proof of `$1` (a requirement line) that fails, or nothing.
failing_proof() {
  local proof proofs
  # `read -a` splits on blanks without expanding the globs of `file:` proofs.
  read -ra proofs <<<"${1#* }"
  for proof in "${proofs[@]}"; do
    case "$proof" in
      cmd:*) command -v "${proof#cmd:}" >/dev/null 2>&1 || { echo "${proof#cmd:} (command)"; return; } ;;
      file:*) compgen -G "${proof#file:}" >/dev/null || { echo "${proof#file:}"; return; } ;;
    esac
  done
}

missing_packages() {
  local line
  for line in "${REQUIREMENTS[@]}"; do
    [[ -n "$(failing_proof "$line")" ]] && package_of "$line"
  done
  return 0
}

report() {
  local line why
  for line in "${REQUIREMENTS[@]}"; do
    why="$(failing_proof "$line")"
    [[ -n "$why" ]] && echo "test-deps: missing $why, from the package $(package_of "$line")" >&2
  done
  return 0
}

if [[ $mode == list ]]; then
  for line in "${REQUIREMENTS[@]}"; do package_of "$line"; done
  exit 0
fi

mapfile -t missing < <(missing_packages)
if ((${#missing[@]} == 0)); then
  echo "test-deps: all ${#REQUIREMENTS[@]} test packages present"
  exit 0
fi
report
if [[ $mode == check ]]; then
  exit 1
fi
is_root=0
[[ $(id -u) == 0 ]] && is_root=1
export DEBIAN_FRONTEND=noninteractive
if ((is_root)); then
  command -v apt-get >/dev/null || { echo "test-deps: no apt-get on this machine; install the packages above by hand" >&2; exit 1; }
  # Versions are chosen below from the package lists: read fresh ones first.
  apt-get update -qq
fi
# The SAME_RELEASE group, when any of it is missing, is installed whole at the first member's
# candidate version (its members share one source package, so one version string).
install=()
touched=0
for m in "${missing[@]}"; do
  in_group=0
  for p in "${SAME_RELEASE[@]}"; do [[ $m == "$p" ]] && in_group=1; done
  if ((in_group)); then touched=1; else install+=("$m"); fi
done
if ((touched)); then
  candidate="$(apt-cache policy "${SAME_RELEASE[0]}" | awk '/Candidate:/ {print $2}')"
  [[ -n "$candidate" && "$candidate" != "(none)" ]] || { echo "test-deps: apt has no ${SAME_RELEASE[0]}" >&2; exit 1; }
  for p in "${SAME_RELEASE[@]}"; do install+=("$p=$candidate"); done
fi
if ((!is_root)); then
  echo "test-deps: the tests need these packages; as root, run:" >&2
  echo "  apt-get install -y --allow-downgrades ${install[*]}" >&2
  exit 1
fi
echo "test-deps: installing ${install[*]}"
apt-get install -y -qq --allow-downgrades "${install[@]}" >/dev/null

mapfile -t still < <(missing_packages)
if ((${#still[@]})); then
  report
  echo "test-deps: still missing after the install: ${still[*]}" >&2
  exit 1
fi
echo "test-deps: all ${#REQUIREMENTS[@]} test packages present"
