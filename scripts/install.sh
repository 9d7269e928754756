#!/usr/bin/env bash
# Builds failsafe and installs fsd, fsctl and the mount helper, so that
# `mount -t failsafe` and /etc/fstab lines work; creates the unprivileged
# `failsafe` user fsd runs as and installs its systemd unit (not enabled).
# Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
PREFIX="${PREFIX:-/usr/local}"

cargo build --release --locked --bins
install -D -m 0755 target/release/fsd "$PREFIX/bin/fsd"
install -D -m 0755 target/release/fsctl "$PREFIX/bin/fsctl"
# mount(8) runs /sbin/mount.<type> for `mount -t <type>`.
install -D -m 0755 target/release/mount-failsafe /sbin/mount.failsafe
if ! id failsafe >/dev/null 2>&1; then
    useradd --system --user-group --home-dir /var/lib/failsafe --no-create-home \
        --shell /usr/sbin/nologin failsafe
fi
install -d -m 0700 -o failsafe -g failsafe /var/lib/failsafe
# /etc/failsafe holds fsd.toml and credentials; the CA (ca/) only on the
# admin's machine.
install -d -m 0755 /etc/failsafe
if [ -d /etc/systemd/system ]; then
    install -m 0644 packaging/systemd/fsd.service /etc/systemd/system/fsd.service
fi
echo "installed: $PREFIX/bin/fsd $PREFIX/bin/fsctl /sbin/mount.failsafe, user failsafe, fsd.service"
echo "next: fsctl host cert --out /var/lib/failsafe/host.cred (then chown failsafe: it), /etc/failsafe/fsd.toml, systemctl enable --now fsd"
