#!/usr/bin/env python3
"""Verify a disk image written by the nodeos test guest (mode=blk or all).

Sector s (0 <= s < sectors), 512 bytes = 64 little-endian u64 words w[0..63]:
  w[0] = 0x4B42534F45444F4E   (the bytes "NODEOSBK")
  w[1] = s
  w[2] = seed
  w[j] = mix64(((s << 6) | j) ^ (seed << 32))  for j = 3..63
mix64 is the splitmix64 finalizer below. Exit 0 if every sector matches.
"""
import argparse
import struct
import sys

M64 = (1 << 64) - 1
MAGIC = 0x4B42534F45444F4E


def mix64(x):
    x &= M64
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & M64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & M64
    x ^= x >> 31
    return x


def sector_bytes(s, seed):
    w = [MAGIC, s, seed] + [mix64(((s << 6) | j) ^ (seed << 32)) for j in range(3, 64)]
    return struct.pack("<64Q", *w)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image")
    ap.add_argument("--sectors", type=int, default=64)
    ap.add_argument("--seed", type=lambda v: int(v, 0), default=1)
    args = ap.parse_args()
    with open(args.image, "rb") as f:
        data = f.read(args.sectors * 512)
    for s in range(args.sectors):
        got = data[s * 512:(s + 1) * 512]
        if got != sector_bytes(s, args.seed):
            print(f"VERIFY-BLK: FAIL sector={s} image={args.image}")
            return 1
    print(f"VERIFY-BLK: ok sectors={args.sectors} seed={args.seed} image={args.image}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
