#!/usr/bin/env bash
# Builds the Debian package, target/debian/failsafe_VERSION_ARCH.deb:
# fsd, fsctl, mount.failsafe, wiki-cgi and failsafe-chaos; the fsd unit and
# a mount unit to copy; /etc/failsafe/fsd.toml (a conffile); man pages and
# bash/zsh completions made from the commands' own definitions
# (`--generate`); the `failsafe` system user, made by postinst. Install it
# with `apt install ./target/debian/failsafe_*.deb`.
#
#   scripts/package.sh [--debug] [--no-build] [--out DIR]
#
# --debug packages the debug build (the test does, to stay quick);
# --no-build packages what target/ holds. Needs dpkg-deb (every Debian has
# it) and the Rust toolchain.
set -euo pipefail
cd "$(dirname "$0")/.."

profile=release
build=1
out=target/debian
while [ $# -gt 0 ]; do
    case "$1" in
        --debug) profile=debug ;;
        --no-build) build=0 ;;
        --out) out="$2"; shift ;;
        *) echo "usage: scripts/package.sh [--debug] [--no-build] [--out DIR]" >&2; exit 2 ;;
    esac
    shift
done

if [ "$build" = 1 ]; then
    if [ "$profile" = release ]; then
        cargo build --release --locked --workspace --bins
    else
        cargo build --locked --workspace --bins
    fi
fi
bin="${CARGO_TARGET_DIR:-target}/$profile"
for b in fsd fsctl mount-failsafe wiki-cgi failsafe-chaos; do
    [ -x "$bin/$b" ] || { echo "package: $bin/$b is missing (build first, or drop --no-build)" >&2; exit 1; }
done

version=$(sed -n 's/^version = "\(.*\)"/\1/p' Cargo.toml | head -n1)
arch=$(dpkg --print-architecture)
root=$(mktemp -d)
trap 'rm -rf "$root"' EXIT

# The programs. mount(8) runs /sbin/mount.<type>, which is /usr/sbin on a
# merged-/usr Debian.
install -D -m 0755 "$bin/fsd" "$root/usr/sbin/fsd"
install -D -m 0755 "$bin/fsctl" "$root/usr/bin/fsctl"
install -D -m 0755 "$bin/mount-failsafe" "$root/usr/sbin/mount.failsafe"
install -D -m 0755 "$bin/wiki-cgi" "$root/usr/bin/wiki-cgi"
install -D -m 0755 "$bin/failsafe-chaos" "$root/usr/bin/failsafe-chaos"

# Configuration and units.
install -D -m 0644 packaging/fsd.toml.example "$root/etc/failsafe/fsd.toml"
install -D -m 0644 packaging/systemd/fsd.service "$root/usr/lib/systemd/system/fsd.service"
sed -i 's|/usr/local/bin/fsd|/usr/sbin/fsd|' "$root/usr/lib/systemd/system/fsd.service"
doc="$root/usr/share/doc/failsafe"
install -D -m 0644 README.md "$doc/README.md"
for f in packaging/systemd/srv-wiki.mount packaging/fstab.example \
    packaging/lighttpd/wiki-cgi.conf packaging/nginx/wiki-cgi.conf \
    packaging/prometheus/failsafe-alerts.yml packaging/grafana/failsafe-dashboard.json; do
    install -D -m 0644 "$f" "$doc/examples/$(basename "$(dirname "$f")")-$(basename "$f")"
done
cat > "$doc/copyright" <<EOF
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: failsafe
License: Apache-2.0

Files: *
License: Apache-2.0
 On Debian systems the full text is in /usr/share/common-licenses/Apache-2.0.
EOF

# Man pages and completions from the commands' own definitions; the two
# commands without clap have theirs written by hand.
man="$root/usr/share/man"
install -d "$man/man1" "$man/man8" \
    "$root/usr/share/bash-completion/completions" "$root/usr/share/zsh/vendor-completions"
for spec in fsd:8 fsctl:8 failsafe-chaos:1; do
    b=${spec%:*} s=${spec#*:}
    "$bin/$b" --generate man | gzip -9n > "$man/man$s/$b.$s.gz"
    "$bin/$b" --generate bash > "$root/usr/share/bash-completion/completions/$b"
    "$bin/$b" --generate zsh > "$root/usr/share/zsh/vendor-completions/_$b"
done
gzip -9n < packaging/man/mount.failsafe.8 > "$man/man8/mount.failsafe.8.gz"
gzip -9n < packaging/man/wiki-cgi.1 > "$man/man1/wiki-cgi.1.gz"

# The package's own files.
install -d "$root/DEBIAN"
installed_kb=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
cat > "$root/DEBIAN/control" <<EOF
Package: failsafe
Version: $version
Architecture: $arch
Maintainer: failsafe maintainers <maintainers@failsafe.invalid>
Installed-Size: $installed_kb
Depends: adduser, libc6
Recommends: fuse3
Suggests: lighttpd | nginx
Section: admin
Priority: optional
Homepage: https://github.com/failsafe/failsafe
Description: replicated filesystem for file-based wikis
 failsafe keeps a directory on storage hosts in several cities: web hosts
 mount it (mount -t failsafe) as an ordinary directory, and any one host
 can be unplugged, shipped and plugged back in without the wiki noticing.
 This package holds the storage daemon (fsd), its admin tool (fsctl), the
 mount helper (mount.failsafe), a small wiki engine (wiki-cgi) and the
 fault-injection harness (failsafe-chaos).
EOF
echo /etc/failsafe/fsd.toml > "$root/DEBIAN/conffiles"
cat > "$root/DEBIAN/postinst" <<'EOF'
#!/bin/sh
# The unprivileged user fsd runs as, and its data directory. fsd is not
# started: it needs a credential and /etc/failsafe/fsd.toml first.
set -e
if [ "$1" = configure ]; then
    if ! getent passwd failsafe >/dev/null; then
        adduser --system --group --home /var/lib/failsafe --no-create-home \
            --shell /usr/sbin/nologin --quiet failsafe
    fi
    install -d -m 0700 -o failsafe -g failsafe /var/lib/failsafe
    if [ -d /run/systemd/system ]; then
        systemctl daemon-reload || true
    fi
fi
exit 0
EOF
cat > "$root/DEBIAN/prerm" <<'EOF'
#!/bin/sh
# A host being removed stops serving first (the cluster limps until it is
# back or removed from the cluster with `fsctl host remove`).
set -e
if [ "$1" = remove ] && [ -d /run/systemd/system ]; then
    systemctl stop fsd.service >/dev/null 2>&1 || true
fi
exit 0
EOF
cat > "$root/DEBIAN/postrm" <<'EOF'
#!/bin/sh
# The data in /var/lib/failsafe (blocks, the tracker's state, the host's
# identity) is never removed by the package: it belongs to the cluster.
set -e
if [ -d /run/systemd/system ]; then
    systemctl daemon-reload >/dev/null 2>&1 || true
fi
exit 0
EOF
chmod 0755 "$root/DEBIAN/postinst" "$root/DEBIAN/prerm" "$root/DEBIAN/postrm"

mkdir -p "$out"
deb="$out/failsafe_${version}_${arch}.deb"
# A debug build's package is for the test: not worth compressing.
compress=()
[ "$profile" = debug ] && compress=(-Znone)
dpkg-deb --root-owner-group "${compress[@]}" --build "$root" "$deb" >/dev/null
echo "$deb"
