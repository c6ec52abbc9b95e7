#!/usr/bin/env bash
# Installs the KM appliance on a Debian 12 (bookworm) system, as root:
#   bash provision.sh STAGING
# STAGING holds bin/km, bin/km-wizard, systemd/ (the units), files/ (helper scripts)
# and README.md. Packer runs it on the image's build instance; the boot test runs it in
# a chroot. Running it again upgrades the binaries and units and keeps the settings.
#
# KM_IMAGE_BUILD=1 (an image, not a live host) also removes what must differ between
# instances: the machine id, km's data, the wizard's token.
set -euo pipefail

STAGE="${1:?usage: provision.sh STAGING_DIR}"
UNIT_DIR=/usr/lib/systemd/system
PACKAGES=(redis-server ca-certificates curl)

log() { printf 'provision: %s\n' "$*"; }

for f in bin/km bin/km-wizard systemd/km.target systemd/km-wizard.service files/wizard-url files/motd; do
    [ -e "$STAGE/$f" ] || { echo "provision: $STAGE/$f is missing" >&2; exit 1; }
done

# Redis carries the bus between the roles (a Unix socket, no TCP port); curl asks the
# cloud's metadata service for the address the setup URL shows.
missing=()
for package in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q '^install ok installed$' \
        || missing+=("$package")
done
if [ "${#missing[@]}" -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

log "user km"
getent group km >/dev/null || groupadd --system km
id km >/dev/null 2>&1 || useradd --system --gid km --home-dir /var/lib/km --no-create-home \
    --shell /usr/sbin/nologin --comment "KM appliance" km
usermod -a -G redis km

log "binaries, units and helpers"
install -o root -g root -m 0755 "$STAGE/bin/km" "$STAGE/bin/km-wizard" /usr/bin/
install -o root -g root -m 0644 "$STAGE"/systemd/*.service "$STAGE"/systemd/*.target "$UNIT_DIR/"
install -d -o root -g root -m 0755 /usr/lib/km /usr/share/doc/km
install -o root -g root -m 0755 "$STAGE/files/wizard-url" /usr/lib/km/wizard-url
install -o root -g root -m 0755 "$STAGE/files/motd" /etc/update-motd.d/60-km
if [ -e "$STAGE/README.md" ]; then
    install -o root -g root -m 0644 "$STAGE/README.md" /usr/share/doc/km/README.md
fi

log "redis: a Unix socket for group redis, no TCP"
cat >/etc/redis/km-bus.conf <<'EOF'
# The KM appliance's bus between its roles (written by provision.sh).
port 0
unixsocket /run/redis/redis-server.sock
unixsocketperm 770
save ""
appendonly no
EOF
chown redis:redis /etc/redis/km-bus.conf
chmod 0640 /etc/redis/km-bus.conf
grep -qx 'include /etc/redis/km-bus.conf' /etc/redis/redis.conf \
    || echo 'include /etc/redis/km-bus.conf' >>/etc/redis/redis.conf

log "settings: /etc/km/km.env (kept if present)"
# Group km may only traverse /etc/km (km.env stays root's: systemd reads it for the
# units); certificates the wizard saves in tls/ take its setgid group km.
install -d -o root -g km -m 0710 /etc/km
install -d -o root -g km -m 2750 /etc/km/tls
if [ ! -e /etc/km/km.env ]; then
    umask 077
    cat >/etc/km/km.env <<'EOF'
# The KM appliance's settings, read by its units (EnvironmentFile=). The setup wizard
# writes the rest; `km config check --env-file /etc/km/km.env` validates this file.
KM_LISTEN=0.0.0.0:80
KM_HTTPS_LISTEN=0.0.0.0:443
KM_DATA_DIR=/var/lib/km
KM_WIZARD_URL=http://127.0.0.1:8090
EOF
fi
chmod 0600 /etc/km/km.env

log "enabling km.target, km-wizard.service and redis-server.service"
systemctl enable km.target km-wizard.service redis-server.service

if [ "${KM_IMAGE_BUILD:-0}" = 1 ]; then
    log "image: clearing the machine id, km's data and the wizard's state"
    rm -rf /var/lib/km /var/lib/km-wizard
    truncate -s 0 /etc/machine-id
    rm -f /var/lib/dbus/machine-id
fi
log "done: km $(/usr/bin/km --version 2>/dev/null || echo '?')"
