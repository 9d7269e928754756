#!/usr/bin/env bash
# Runs every test of failsafe: lints, unit tests, and the integration tests
# that start real fsd processes on loopback. Needs only the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

# The FUSE tests mount as root through /dev/fuse; fuse3 brings fusermount3
# and /etc/fuse.conf for anyone running them differently.
if ! command -v fusermount3 >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    apt-get install -y -qq fuse3 >/dev/null 2>&1 || echo "note: could not install fuse3; continuing (root mounts need none)"
fi

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Integration tests start the fsd and mount binaries of the workspace.
cargo build --workspace --bins --locked
cargo test --workspace --all-targets --locked
