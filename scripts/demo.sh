#!/usr/bin/env bash
# The main job: builds failsafe, starts a local three-host cluster (zones a, b,
# c) on loopback with its data under ./failsafe-demo, and shows its status.
# Stays in the foreground; Ctrl-C stops every host. Extra arguments go to
# `failsafe-demo` (see `--help`).
set -euo pipefail
cd "$(dirname "$0")/.."

cargo build --release --locked --bins
exec target/release/failsafe-demo "$@"
