#!/usr/bin/env python3
"""Verify a disk image written by the nodeos test guest (mode=blk or all).

Sector s (0 <= s < sectors), 512 bytes = 64 little-endian u64 words w[0..63]:
  w[0] = 0x4B42534F45444F4E   (the bytes "NODEOSBK")
  w[1] = s
  w[2] = seed
  w[j] = mix64(((s << 6) | j) ^ (seed << 32))  for j = 3..63
mix64 is the splitmix64 finalizer below. Exit 0 if every sector matches.

With --dirty-span N (mode=dirty dirty_blk=1 dirty_blk_span=N): block b (sectors
8b .. 8b+7, b < N) is either all zero (never written) or holds the pattern with
seed = its w[2], and that seed (the pass that wrote it) is b modulo N. At least
one block must have been written.
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


def verify_dirty(image, span):
    with open(image, "rb") as f:
        data = f.read(span * 8 * 512)
    written = []
    for b in range(span):
        blk = data[b * 4096:(b + 1) * 4096]
        if blk == bytes(len(blk)):
            continue
        seed = struct.unpack_from("<Q", blk, 16)[0]
        if seed % span != b or any(blk[k * 512:(k + 1) * 512] != sector_bytes(8 * b + k, seed) for k in range(8)):
            print(f"VERIFY-BLK: FAIL dirty block={b} seed={seed} image={image}")
            return 1
        written.append(seed)
    if not written:
        print(f"VERIFY-BLK: FAIL dirty no block written image={image}")
        return 1
    print(f"VERIFY-BLK: ok dirty span={span} blocks_written={len(written)} last_pass={max(written)} image={image}")
    return 0


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("image")
    ap.add_argument("--sectors", type=int, default=64)
    ap.add_argument("--seed", type=lambda v: int(v, 0), default=1)
    ap.add_argument("--dirty-span", type=int, default=0, help="check a dirty_blk=1 image of this span")
    args = ap.parse_args()
    if args.dirty_span:
        return verify_dirty(args.image, args.dirty_span)
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
