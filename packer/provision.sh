#!/usr/bin/env bash
# Installs the KM appliance's package on a Debian 12 (bookworm) system, as root:
#   bash provision.sh STAGING
# STAGING holds one km_<version>_<arch>.deb (packaging/build-deb.sh makes it). Packer
# runs this on the image's build instance; the boot test runs it in a chroot. The
# package does the installing (user, directories, units, Redis socket, settings file);
# this script adds what a package cannot do: keep a copy of itself for `km-wizard
# upgrade` to roll back to, and with KM_IMAGE_BUILD=1 (an image, not a live host)
# remove what must differ between instances: the machine id, km's data, the wizard's
# token. Running it again with a newer package upgrades (`km-wizard upgrade` is the
# safer way on a configured appliance: it rolls back by itself).
set -euo pipefail

STAGE="${1:?usage: provision.sh STAGING_DIR}"
log() { printf 'provision: %s\n' "$*"; }

shopt -s nullglob
debs=("$STAGE"/km_*.deb)
[ "${#debs[@]}" -eq 1 ] || { echo "provision: expected one km_*.deb in $STAGE, found ${#debs[@]}" >&2; exit 1; }
deb="${debs[0]}"

log "installing $(basename "$deb") and what it depends on"
export DEBIAN_FRONTEND=noninteractive
if ! dpkg -i "$deb"; then
    # Dependencies missing: apt installs them and finishes configuring km.
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends -f
fi
dpkg-query -W -f='${Status}' km | grep -q '^install ok installed$' \
    || { echo "provision: the km package is not installed" >&2; exit 1; }
install -d -m 0700 /var/cache/km/packages
install -m 0600 "$deb" /var/cache/km/packages/

if [ "${KM_IMAGE_BUILD:-0}" = 1 ]; then
    log "image: clearing the machine id, km's data and the wizard's state"
    rm -rf /var/lib/km /var/lib/km-wizard
    truncate -s 0 /etc/machine-id
    rm -f /var/lib/dbus/machine-id
fi
log "done: km $(/usr/bin/km --version 2>/dev/null || echo '?')"
