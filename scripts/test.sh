#!/usr/bin/env bash
# Runs every test of failsafe: lints, unit tests, and the integration tests
# that start real fsd processes on loopback. Needs only the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

cargo clippy --workspace --all-targets --locked -- -D warnings
cargo test --workspace --all-targets --locked
