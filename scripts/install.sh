#!/usr/bin/env bash
# Builds failsafe and installs fsd, fsctl and the mount helper, so that
# `mount -t failsafe` and /etc/fstab lines work. Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX="${PREFIX:-/usr/local}"

cargo build --release --locked --bins
install -D -m 0755 target/release/fsd "$PREFIX/bin/fsd"
install -D -m 0755 target/release/fsctl "$PREFIX/bin/fsctl"
# mount(8) runs /sbin/mount.<type> for `mount -t <type>`.
install -D -m 0755 target/release/mount-failsafe /sbin/mount.failsafe
echo "installed: $PREFIX/bin/fsd $PREFIX/bin/fsctl /sbin/mount.failsafe"
