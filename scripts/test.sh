#!/usr/bin/env bash
# The project's test command (the README's second line): unit, property and integration tests
# against real components (TLS sockets on loopback, SQLite, kernel FUSE mounts, namespaces).
set -euo pipefail
cd "$(dirname "$0")/.."
# Two test binaries at a time: the integration tests spawn real servers and 2 cores are shared.
cargo test --locked -- --test-threads=4
