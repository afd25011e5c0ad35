#!/usr/bin/env bash
# Prints the path of the protoc shipped in the protoc-bin-vendored crate, so that
# crates whose build needs a protoc (etcd-client, for the benchmarks) build on a
# fresh machine without a system protobuf compiler.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo metadata --format-version 1 2>/dev/null | python3 -c '
import json, os, sys
for p in json.load(sys.stdin)["packages"]:
    if p["name"] == "protoc-bin-vendored-linux-x86_64":
        print(os.path.join(os.path.dirname(p["manifest_path"]), "bin", "protoc"))
        break
'
