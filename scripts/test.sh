#!/usr/bin/env bash
# Runs every test of failsafe: lints, unit tests, and the integration tests
# that start real fsd processes on loopback. Needs only the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

# Packages the tests use; the tests themselves install nothing. Installed
# quietly when we are root with apt-get; a test whose package is missing
# says so and skips.
can_apt() { [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; }
# The FUSE tests mount as root through /dev/fuse; fuse3 brings fusermount3
# and /etc/fuse.conf for anyone running them differently.
if ! command -v fusermount3 >/dev/null 2>&1 && can_apt; then
    apt-get install -y -qq fuse3 >/dev/null 2>&1 || echo "note: could not install fuse3; continuing (root mounts need none)"
fi
# fsd/daemon/tests/dokuwiki.rs runs Debian's unmodified DokuWiki on a mount.
if ! { [ -e /usr/share/dokuwiki/doku.php ] && [ -e /usr/bin/php-cgi ] && [ -e /usr/sbin/lighttpd ]; } && can_apt; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dokuwiki php-cgi lighttpd >/dev/null 2>&1 \
        || echo "note: could not install dokuwiki, php-cgi and lighttpd; continuing (the DokuWiki test will skip)"
fi
# The chaos CI set's clock-skew scenario runs web hosts under libfaketime.
if ! ls /usr/lib/*/faketime/libfaketimeMT.so.1 >/dev/null 2>&1 && can_apt; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends faketime >/dev/null 2>&1 \
        || echo "note: could not install faketime; continuing (the chaos CI set will fail on clock-skew)"
fi
# The demo's test looks at the status page and the wiki in a real browser.
if ! command -v chromium >/dev/null 2>&1 && can_apt; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null 2>&1 \
        || echo "note: could not install chromium; continuing (the demo's test checks its pages over HTTP only)"
fi

# A run builds everything once, from a fresh clone in CI: incremental
# compilation only doubles what lands on disk (a CI run once failed with no
# space left on the device) and slows a clean build. Set CARGO_INCREMENTAL=1
# to keep it while iterating.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

cargo fmt --all --check
cargo clippy --workspace --all-targets --locked -- -D warnings
# Integration tests start the fsd and mount binaries of the workspace.
cargo build --workspace --bins --locked
cargo test --workspace --all-targets --locked
