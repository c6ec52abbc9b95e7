#!/usr/bin/env bash
# Builds the appliance's Debian package, km_<version>_<arch>.deb:
#   packaging/build-deb.sh [--bin-dir DIR] [--version V] [--out DIR]
# --bin-dir  the directory holding km and km-wizard (default: builds them with
#            `cargo build --release --locked -p km-appliance -p km-wizard`)
# --version  the package's version (default: Cargo.toml's [workspace.package] version)
# --out      where the package goes (default: target/deb)
# KM_DEB_COMPRESSION: xz (the default), gzip or none.
# The binaries are stripped; the package holds the units, the km user (sysusers), its
# directories (tmpfiles), the helper scripts and the maintainer scripts of debian/.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
HERE="$ROOT/packaging"
BIN_DIR=
VERSION=
OUT="$ROOT/target/deb"
while [ $# -gt 0 ]; do
    case "$1" in
    --bin-dir) BIN_DIR="$2"; shift 2 ;;
    --version) VERSION="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    *) echo "usage: $0 [--bin-dir DIR] [--version V] [--out DIR]" >&2; exit 2 ;;
    esac
done
if [ -z "$BIN_DIR" ]; then
    (cd "$ROOT" && cargo build --release --locked -p km-appliance -p km-wizard)
    BIN_DIR="$ROOT/target/release"
fi
if [ -z "$VERSION" ]; then
    VERSION=$(awk '/^\[workspace\.package\]/{p=1; next} /^\[/{p=0} p && /^version *=/{gsub(/[" ]/, "", $0); sub(/version=/, ""); print; exit}' "$ROOT/Cargo.toml")
fi
case "$VERSION" in
'' | *[!0-9A-Za-z.+~-]*) echo "build-deb: not a Debian version: '$VERSION'" >&2; exit 1 ;;
esac
for bin in km km-wizard; do
    [ -x "$BIN_DIR/$bin" ] || { echo "build-deb: $BIN_DIR/$bin is missing" >&2; exit 1; }
done
ARCH=$(dpkg --print-architecture)

PKG=$(mktemp -d)
chmod 0755 "$PKG"
trap 'rm -rf "$PKG"' EXIT
install -d -m 0755 "$PKG/DEBIAN" "$PKG/usr/bin" "$PKG/usr/lib/systemd/system" \
    "$PKG/usr/lib/sysusers.d" "$PKG/usr/lib/tmpfiles.d" "$PKG/usr/lib/km" \
    "$PKG/usr/share/doc/km" "$PKG/etc/update-motd.d"
for bin in km km-wizard; do
    objcopy --strip-all "$BIN_DIR/$bin" "$PKG/usr/bin/$bin"
    chmod 0755 "$PKG/usr/bin/$bin"
done
install -m 0644 "$ROOT"/systemd/*.service "$ROOT"/systemd/*.path "$ROOT"/systemd/*.target "$PKG/usr/lib/systemd/system/"
install -m 0644 "$HERE/km.sysusers" "$PKG/usr/lib/sysusers.d/km.conf"
install -m 0644 "$HERE/km.tmpfiles" "$PKG/usr/lib/tmpfiles.d/km.conf"
install -m 0755 "$HERE/files/wizard-url" "$PKG/usr/lib/km/wizard-url"
install -m 0755 "$HERE/files/motd" "$PKG/etc/update-motd.d/60-km"
install -m 0644 "$ROOT/README.md" "$PKG/usr/share/doc/km/README.md"
install -m 0755 "$HERE"/debian/preinst "$HERE"/debian/postinst "$HERE"/debian/prerm \
    "$HERE"/debian/postrm "$PKG/DEBIAN/"
echo /etc/update-motd.d/60-km >"$PKG/DEBIAN/conffiles"
SIZE=$(du -sk --exclude=DEBIAN "$PKG" | cut -f1)
cat >"$PKG/DEBIAN/control" <<CONTROL
Package: km
Version: $VERSION
Architecture: $ARCH
Maintainer: ${KM_DEB_MAINTAINER:-KM appliance <root@localhost>}
Installed-Size: $SIZE
Depends: libc6 (>= 2.36), systemd, redis-server, ca-certificates, curl
Section: admin
Priority: optional
Homepage: ${KM_DEB_HOMEPAGE:-https://km.example.com}
Description: KM appliance: a self-hosted PM2 Plus (Keymetrics) backend
 Unmodified PM2 agents link to it with KEYMETRICS_NODE=<url> pm2 link; the
 unmodified @pm2/js-api client and the dashboard talk to it. Every role runs as
 its own systemd unit (km.target); the setup wizard (km-wizard) configures it.
CONTROL
mkdir -p "$OUT"
DEB="$OUT/km_${VERSION}_${ARCH}.deb"
dpkg-deb --root-owner-group "-Z${KM_DEB_COMPRESSION:-xz}" --build "$PKG" "$DEB" >/dev/null
echo "$DEB"
