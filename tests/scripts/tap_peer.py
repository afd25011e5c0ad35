#!/usr/bin/env python3
"""Host side of the test guest's net check, on a tap device (run as root,
in the namespace that holds the tap).

Sends `--frames` broadcast frames (ethertype 0x88b5, payload "NODEOS-HOST ping
<i>") every 200 ms until it has seen the guest's echo of each, and records the
guest's own "NODEOS-GUEST frame <i>" frames. Prints one line:
`TAP-PEER: ok guest_mac=.. guest_frames=N echoes=M` or `TAP-PEER: FAIL ..`,
and exits 0 only when every ping was echoed.
"""
import argparse
import select
import socket
import sys
import time

ETHERTYPE = 0x88B5


def frame(payload: bytes) -> bytes:
    src = bytes.fromhex("020000aabbcc")
    body = b"\xff" * 6 + src + ETHERTYPE.to_bytes(2, "big") + payload
    return body.ljust(60, b"\0")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("tap")
    ap.add_argument("--frames", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=120.0)
    a = ap.parse_args()
    deadline = time.monotonic() + a.timeout
    s = None
    while s is None:
        try:
            s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
            s.bind((a.tap, 0))
        except OSError as e:
            s = None
            if time.monotonic() > deadline:
                print(f"TAP-PEER: FAIL cannot open {a.tap}: {e}", flush=True)
                return 1
            time.sleep(0.1)
    pings = [f"NODEOS-HOST ping {i}".encode() for i in range(a.frames)]
    echoed = set()
    guest_frames = 0
    guest_mac = "?"
    next_send = 0.0
    while time.monotonic() < deadline and len(echoed) < len(pings):
        now = time.monotonic()
        if now >= next_send:
            for i, p in enumerate(pings):
                if i not in echoed:
                    s.send(frame(p))
            next_send = now + 0.2
        r, _, _ = select.select([s], [], [], 0.05)
        if not r:
            continue
        data = s.recv(2048)
        if len(data) < 14 or int.from_bytes(data[12:14], "big") != ETHERTYPE:
            continue
        payload = data[14:].rstrip(b"\0")
        if payload.startswith(b"NODEOS-GUEST frame"):
            guest_frames += 1
            guest_mac = data[6:12].hex(":")
        elif payload.startswith(b"NODEOS-GUEST echo "):
            text = payload[len(b"NODEOS-GUEST echo "):]
            for i, p in enumerate(pings):
                if text == p:
                    echoed.add(i)
    if len(echoed) == len(pings):
        print(f"TAP-PEER: ok guest_mac={guest_mac} guest_frames={guest_frames} echoes={len(echoed)}", flush=True)
        return 0
    print(f"TAP-PEER: FAIL guest_frames={guest_frames} echoes={len(echoed)}/{len(pings)}", flush=True)
    return 1


if __name__ == "__main__":
    sys.exit(main())
