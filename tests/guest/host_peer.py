#!/usr/bin/env python3
"""Host side of the nodeos test guest's network protocol (see README.md).

QEMU's `-netdev socket,udp=127.0.0.1:LISTEN,localaddr=127.0.0.1:QEMU` carries each
Ethernet frame (no FCS) as one UDP datagram: QEMU sends from 127.0.0.1:QEMU to
127.0.0.1:LISTEN and receives on 127.0.0.1:QEMU. This script binds LISTEN and:

 1. waits for the guest's announce frames: broadcast, ethertype 0x88b5, payload
    "NODEOS-GUEST frame <i>" (zero-padded to a 60-byte frame), i = 0..frames-1;
    the source MAC is the guest's MAC;
 2. sends `pings` frames to the guest MAC, ethertype 0x88b5, payload
    "NODEOS-HOST ping <i>", then (unless --no-done) one "NODEOS-HOST done"
    frame, which ends the guest's listening window early;
 3. expects for every one of them an echo frame from the guest to our MAC with
    payload "NODEOS-GUEST echo " + the payload text it received.

Everything stays on 127.0.0.1. Exit status 0 on success, 1 on failure.
Output lines start with "HOST-PEER: ".
"""
import argparse
import socket
import sys
import time

ETHERTYPE = 0x88B5
HOST_MAC = bytes.fromhex("020000000002")  # locally administered
BROADCAST = b"\xff" * 6


def log(msg):
    print(f"HOST-PEER: {msg}", flush=True)


def frame(dst, src, payload: bytes) -> bytes:
    f = dst + src + ETHERTYPE.to_bytes(2, "big") + payload
    return f.ljust(60, b"\0")


def parse(f: bytes):
    """Returns (dst, src, payload text) for an 0x88b5 frame, else None."""
    if len(f) < 14 or int.from_bytes(f[12:14], "big") != ETHERTYPE:
        return None
    payload = f[14:].split(b"\0", 1)[0]
    return f[0:6], f[6:12], payload.decode("ascii", "replace")


def mac_str(m: bytes) -> str:
    return ":".join(f"{b:02x}" for b in m)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--listen-port", type=int, required=True, help="UDP port QEMU sends to (udp=127.0.0.1:PORT)")
    ap.add_argument("--qemu-port", type=int, required=True, help="QEMU's local UDP port (localaddr=127.0.0.1:PORT)")
    ap.add_argument("--frames", type=int, default=4, help="announce frames the guest sends (its net_frames)")
    ap.add_argument("--pings", type=int, default=3, help="NODEOS-HOST frames to send")
    ap.add_argument("--no-done", action="store_true", help="do not send the final 'NODEOS-HOST done' frame")
    ap.add_argument("--timeout", type=float, default=60.0, help="overall seconds")
    ap.add_argument("--ready-file", help="create this file once the socket is bound (start QEMU after that)")
    args = ap.parse_args()

    qemu = ("127.0.0.1", args.qemu_port)
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind(("127.0.0.1", args.listen_port))
    deadline = time.monotonic() + args.timeout
    log(f"listening on 127.0.0.1:{args.listen_port}, qemu at 127.0.0.1:{args.qemu_port}")
    if args.ready_file:
        with open(args.ready_file, "w") as f:
            f.write("ready\n")

    def recv():
        left = deadline - time.monotonic()
        if left <= 0:
            return None
        s.settimeout(left)
        try:
            data, addr = s.recvfrom(65536)
        except socket.timeout:
            return None
        if addr != qemu:
            log(f"ignoring datagram from {addr}")
            return b""
        return data

    # 1. announce frames
    guest_mac = None
    seen = set()
    while len(seen) < args.frames:
        data = recv()
        if data is None:
            log(f"FAIL timeout waiting for guest frames, saw {sorted(seen)}")
            return 1
        p = parse(data)
        if not p:
            continue
        dst, src, text = p
        if text.startswith("NODEOS-GUEST frame "):
            if dst != BROADCAST or len(data) != 60:
                log(f"FAIL bad announce frame dst={mac_str(dst)} len={len(data)}")
                return 1
            guest_mac = src
            seen.add(int(text.split()[-1]))
            log(f"guest frame from {mac_str(src)}: {text}")
    if seen != set(range(args.frames)):
        log(f"FAIL unexpected announce indices {sorted(seen)}")
        return 1

    # 2. pings (+ done)
    sent = [f"NODEOS-HOST ping {i}" for i in range(args.pings)]
    if not args.no_done:
        sent.append("NODEOS-HOST done")
    for text in sent:
        s.sendto(frame(guest_mac, HOST_MAC, text.encode()), qemu)
        log(f"sent {text}")

    # 3. echoes
    want = {f"NODEOS-GUEST echo {t}" for t in sent}
    got = set()
    while got != want:
        data = recv()
        if data is None:
            log(f"FAIL timeout waiting for echoes, missing {sorted(want - got)}")
            return 1
        p = parse(data)
        if not p:
            continue
        dst, src, text = p
        if text in want:
            if dst != HOST_MAC or src != guest_mac:
                log(f"FAIL echo with wrong addresses dst={mac_str(dst)} src={mac_str(src)}")
                return 1
            got.add(text)
            log(f"echo: {text}")
    log(f"ok guest_mac={mac_str(guest_mac)} frames={len(seen)} echoes={len(got)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
