#!/usr/bin/env python3
"""Fails when a workspace crate depends on one that the layering rules forbid.

The rules (STYLE.md): types <- hv <- vmm; types/proto <- meta <- block; switch
needs only types; vmm may use block and switch but never meta or api; api never
touches hv; tests see only proto and types. Every workspace crate must be listed
here, so a new crate cannot slip in without a rule.
"""
import json
import subprocess
import sys

ALLOWED = {
    "nodeos-types": set(),
    "nodeos-proto": set(),
    "nodeos-hv": {"nodeos-types"},
    "nodeos-meta": {"nodeos-types", "nodeos-proto"},
    "nodeos-pool": {"nodeos-types", "nodeos-meta"},
    "nodeos-block": {"nodeos-types", "nodeos-meta"},
    "nodeos-switch": {"nodeos-types"},
    "nodeos-vmm": {"nodeos-types", "nodeos-hv", "nodeos-block", "nodeos-switch"},
    # The pool's network records over meta, and the agent driving the switch.
    "nodeos-network": {"nodeos-types", "nodeos-meta", "nodeos-switch"},
    "nodeos-compute": {"nodeos-types", "nodeos-meta", "nodeos-vmm", "nodeos-block",
                       "nodeos-network", "nodeos-switch"},
    # The image format, shared by image-builder and the node that serves its own image.
    "nodeos-image": set(),
    # The PXE server (its DHCP wire constants are the switch's) and the agent over meta.
    "nodeos-pxe": {"nodeos-types", "nodeos-meta", "nodeos-switch", "nodeos-image"},
    "nodeos-api": {"nodeos-types", "nodeos-proto", "nodeos-meta", "nodeos-pool",
                   "nodeos-compute", "nodeos-block", "nodeos-switch", "nodeos-network",
                   "nodeos-pxe"},
    "nodeos-tests": {"nodeos-types", "nodeos-proto"},
    "nodeos-bench": {"nodeos-types", "nodeos-proto"},
    "image-builder": {"nodeos-types", "nodeos-image"},
    # The binary is the composition root: it may wire everything.
    "nodeos": None,
}


def main() -> int:
    meta = json.loads(subprocess.check_output(
        ["cargo", "metadata", "--format-version", "1", "--no-deps", "--offline"]))
    members = {p["name"] for p in meta["packages"]}
    bad = []
    for p in meta["packages"]:
        name = p["name"]
        if name not in ALLOWED:
            bad.append(f"{name}: no layering rule; add it to scripts/deps-check.py")
            continue
        allowed = ALLOWED[name]
        if allowed is None:
            continue
        for d in p["dependencies"]:
            if d["name"] in members and d["name"] != name and d["name"] not in allowed:
                kind = d.get("kind") or "normal"
                bad.append(f"{name} depends on {d['name']} ({kind}); allowed: {sorted(allowed) or 'none'}")
    for b in bad:
        print(f"deps-check: {b}", file=sys.stderr)
    if not bad:
        print(f"deps-check: {len(meta['packages'])} crates follow the layering rules")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
