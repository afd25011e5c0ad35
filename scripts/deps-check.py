#!/usr/bin/env python3
"""Fails when a workspace crate depends on one that the layering rules forbid.

Two kinds of rules (STYLE.md):
- ALLOWED: the workspace crates a crate may name in its own Cargo.toml (any kind
  of dependency). Every workspace crate must be listed, so a new crate cannot
  slip in without a rule.
- NEVER_REACHES: crates a crate must not reach at all, however indirectly,
  through normal and build dependencies (what ships in its code): the VM
  worker's crate never links the metadata store, the data path of the block
  layer and the switch never link the control plane.
"""
import json
import subprocess
import sys

ALLOWED = {
    "nodeos-types": set(),
    "nodeos-proto": set(),
    "nodeos-hv": {"nodeos-types"},
    # The pool CA, credentials, roles and TLS: needs only the pool key.
    "nodeos-auth": {"nodeos-types", "nodeos-proto"},
    "nodeos-meta": {"nodeos-types", "nodeos-proto", "nodeos-auth"},
    "nodeos-pool": {"nodeos-types", "nodeos-meta"},
    # The block layer's data path: replicas, the volume client, NBD. No meta.
    "nodeos-block": {"nodeos-types", "nodeos-auth"},
    # The block layer's control plane: volume records, placement, controller.
    "nodeos-volumes": {"nodeos-types", "nodeos-meta", "nodeos-block"},
    # The DHCP wire format, shared by the switch, the PXE server and PID 1's client.
    "nodeos-dhcp": {"nodeos-types"},
    "nodeos-switch": {"nodeos-types", "nodeos-dhcp"},
    "nodeos-vmm": {"nodeos-types", "nodeos-hv", "nodeos-block", "nodeos-switch", "nodeos-auth"},
    # The pool's network records over meta, and the agent driving the switch.
    "nodeos-network": {"nodeos-types", "nodeos-meta", "nodeos-switch"},
    # nodeos-image: a rolling upgrade checks the image hash over the stored files.
    "nodeos-compute": {"nodeos-types", "nodeos-meta", "nodeos-vmm", "nodeos-block", "nodeos-volumes",
                       "nodeos-network", "nodeos-switch", "nodeos-image", "nodeos-auth"},
    # The image format, shared by image-builder and the node that serves its own image.
    "nodeos-image": set(),
    # The PXE server and its agent over meta.
    "nodeos-pxe": {"nodeos-types", "nodeos-meta", "nodeos-dhcp", "nodeos-image"},
    "nodeos-api": {"nodeos-types", "nodeos-proto", "nodeos-meta", "nodeos-pool",
                   "nodeos-compute", "nodeos-block", "nodeos-volumes", "nodeos-switch",
                   "nodeos-network", "nodeos-pxe", "nodeos-image", "nodeos-auth"},
    "nodeos-tests": {"nodeos-types", "nodeos-proto"},
    "nodeos-bench": {"nodeos-types", "nodeos-proto"},
    "image-builder": {"nodeos-types", "nodeos-image"},
    # The binary is the composition root: it may wire everything.
    "nodeos": None,
}

CONTROL_PLANE = {"nodeos-meta", "nodeos-volumes", "nodeos-network", "nodeos-pool", "nodeos-compute",
                 "nodeos-api", "nodeos-pxe", "nodeos"}
NEVER_REACHES = {
    "nodeos-vmm": CONTROL_PLANE,
    "nodeos-hv": CONTROL_PLANE | {"nodeos-block", "nodeos-switch", "nodeos-vmm"},
    "nodeos-block": CONTROL_PLANE,
    "nodeos-switch": CONTROL_PLANE,
    "nodeos-dhcp": CONTROL_PLANE | {"nodeos-switch"},
    "nodeos-types": CONTROL_PLANE,
    "nodeos-auth": CONTROL_PLANE,
}


def main() -> int:
    meta = json.loads(subprocess.check_output(
        ["cargo", "metadata", "--format-version", "1", "--no-deps", "--offline"]))
    members = {p["name"] for p in meta["packages"]}
    shipped = {p["name"]: set() for p in meta["packages"]}
    bad = []
    for p in meta["packages"]:
        name = p["name"]
        for d in p["dependencies"]:
            if d["name"] in members and d["name"] != name and d.get("kind") != "dev":
                shipped[name].add(d["name"])
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

    def reach(start):
        """Every crate `start` reaches, with one path to each."""
        paths = {start: [start]}
        todo = [start]
        while todo:
            cur = todo.pop()
            for nxt in sorted(shipped.get(cur, ())):
                if nxt not in paths:
                    paths[nxt] = paths[cur] + [nxt]
                    todo.append(nxt)
        return paths

    for name, forbidden in NEVER_REACHES.items():
        if name not in members:
            continue
        for target, path in sorted(reach(name).items()):
            if target in forbidden:
                bad.append(f"{name} reaches {target}: {' -> '.join(path)}")

    for b in bad:
        print(f"deps-check: {b}", file=sys.stderr)
    if not bad:
        print(f"deps-check: {len(meta['packages'])} crates follow the layering rules")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
