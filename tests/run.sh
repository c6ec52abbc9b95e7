#!/usr/bin/env bash
# The project's test command: builds the workspace and runs every test, including the
# end-to-end tests with real pm2 7.0.4 agents against the real `km` binary.
#
# Runs on a fresh Debian bookworm machine as root with only package registries reachable:
# installs node/npm, Chromium, redis-server and Pebble (an ACME CA) from Debian when
# missing, pm2 + @pm2/io + tx2 + pmx + @pm2/js-api + playwright-core + axe-core from npm into
# target/e2e-node, SecantusDB (a MongoDB-wire server) from PyPI, then builds and tests.
# Extra arguments go to the test binaries, e.g.
#   tests/run.sh                       # everything
#   tests/run.sh apps_and_custom       # only tests whose name matches
#   KM_E2E_KEEP=1 tests/run.sh ...     # keep temp dirs (km.log, PM2_HOME) for inspection
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

# Keep in sync with NPM_PACKAGES in tests/src/lib.rs.
# playwright-core drives Debian's /usr/bin/chromium (it never downloads a browser of its
# own); 1.65.1 was checked against Chromium 156 (launch, setContent, screenshot).
NPM_PACKAGES=(pm2@7.0.4 @pm2/io@6.1.0 tx2@1.0.5 pmx@1.6.8 @pm2/js-api@0.8.1 playwright-core@1.65.1 axe-core@4.14.1
    @opentelemetry/sdk-node@0.221.0 @opentelemetry/auto-instrumentations-node@0.79.0
    @opentelemetry/sdk-trace-base@2.10.0 @opentelemetry/resources@2.10.0
    @opentelemetry/exporter-trace-otlp-http@0.221.0 @opentelemetry/exporter-trace-otlp-proto@0.221.0
    @opentelemetry/exporter-zipkin@2.10.0)
TARGET_DIR="${CARGO_TARGET_DIR:-target}"
case "$TARGET_DIR" in /*) ;; *) TARGET_DIR="$ROOT/$TARGET_DIR" ;; esac
NODE_DIR="${KM_E2E_NODE_DIR:-$TARGET_DIR/e2e-node}"
export KM_E2E_NODE_DIR="$NODE_DIR"
# Every test runs: one that misses a server, client or tool fails (a plain `cargo test`
# skips those and says so).
export KM_E2E=1

section() { printf '\n==== %s ====\n' "$*"; }

section "toolchain"
if ! command -v cargo >/dev/null 2>&1; then
    echo "error: cargo not found (the workspace needs Rust >= 1.95 with edition 2024)" >&2
    exit 1
fi
cargo --version

# Installs Debian packages (root only; the machine reaches Debian's mirrors).
apt_install() {
    echo "installing Debian's $*"
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: $* required (apt-get install -y $* as root)" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq "$@" >/dev/null
}

section "node and npm"
if ! command -v node >/dev/null 2>&1 || ! command -v npm >/dev/null 2>&1; then
    apt_install nodejs npm
fi
echo "node $(node --version), npm $(npm --version)"

section "chromium"
# The browser tests launch it through playwright-core (chromium-driver is not needed).
if [ ! -x /usr/bin/chromium ]; then
    apt_install chromium
fi
/usr/bin/chromium --version 2>/dev/null || { echo "error: /usr/bin/chromium does not run" >&2; exit 1; }

section "npm packages (${NPM_PACKAGES[*]}) in $NODE_DIR"
installed() {
    local spec name version
    for spec in "${NPM_PACKAGES[@]}"; do
        name="${spec%@*}"
        version="${spec##*@}"
        node -e 'const p=require(process.argv[1]); if (p.version !== process.argv[2]) process.exit(1)' \
            "$NODE_DIR/node_modules/$name/package.json" "$version" 2>/dev/null || return 1
    done
}
if installed; then
    echo "already installed"
else
    mkdir -p "$NODE_DIR"
    [ -f "$NODE_DIR/package.json" ] || echo '{"name":"km-e2e-node","private":true}' >"$NODE_DIR/package.json"
    (cd "$NODE_DIR" && npm install --no-audit --no-fund --save-exact "${NPM_PACKAGES[@]}")
    installed || { echo "error: npm packages not installed in $NODE_DIR" >&2; exit 1; }
fi

# Real servers the store contract and scale-out tests start on free ports.
if ! command -v redis-server >/dev/null 2>&1; then
    section "redis-server (Debian)"
    apt_install redis-server
fi
# The Prometheus that scrapes km's metrics endpoints (tests/tests/prometheus.rs).
if ! command -v prometheus >/dev/null 2>&1; then
    section "prometheus (Debian)"
    apt_install prometheus
fi
# The ACME CA the gateway's TLS tests get certificates from (HTTP-01 against km).
if ! command -v pebble >/dev/null 2>&1; then
    section "pebble (Debian)"
    apt_install pebble
fi
# The appliance image's tests: debootstrap and systemd-nspawn boot the provisioned root
# filesystem (tests/tests/appliance_boot.rs), packer 1.6.6 validates packer/.
missing=()
for tool in debootstrap:debootstrap systemd-nspawn:systemd-container packer:packer nsenter:util-linux objcopy:binutils; do
    command -v "${tool%%:*}" >/dev/null 2>&1 || missing+=("${tool##*:}")
done
if [ "${#missing[@]}" -gt 0 ]; then
    section "image tools (Debian): ${missing[*]}"
    apt_install "${missing[@]}"
fi
# checkov (static analysis of terraform/) in a virtualenv of its own: its pins would
# change packages of the system's Python.
CHECKOV_VERSION=3.3.30
CHECKOV_DIR="$TARGET_DIR/checkov"
if ! "$CHECKOV_DIR/bin/checkov" --version 2>/dev/null | grep -qx "$CHECKOV_VERSION"; then
    section "checkov $CHECKOV_VERSION in $CHECKOV_DIR"
    python3 -m venv "$CHECKOV_DIR"
    "$CHECKOV_DIR/bin/pip" install -q --disable-pip-version-check "checkov==$CHECKOV_VERSION"
fi
export KM_E2E_CHECKOV="$CHECKOV_DIR/bin/checkov"
# aiosmtpd: the SMTP server of the setup checks' tests (tests/support/smtp_server.py).
PY_PACKAGES=(secantusdb==0.7.0b3 osmem-server==0.1.6 aiosmtpd==1.4.6)
section "python test servers (${PY_PACKAGES[*]})"
python3 -m pip install -q --disable-pip-version-check "${PY_PACKAGES[@]}"
command -v secantusd-py >/dev/null || { echo "error: secantusd-py not on PATH after pip install" >&2; exit 1; }

# The test builds trust the test licence key (tests/keys/test-licence.key); release
# builds never do. Every cargo command below takes the same features, so nothing is
# built twice.
FEATURES=(--features km-appliance/test-licence)

section "cargo build --workspace --all-targets ${FEATURES[*]}"
cargo build --workspace --all-targets "${FEATURES[@]}"

# The appliance's next version, for the image's upgrade test (tests/tests/appliance_boot.rs):
# a release build with one documents migration more (feature test-migration) and, given
# at build time, the public half of a licence key made here by `km licence keygen`.
NEXT_DIR="$TARGET_DIR/upgrade-next"
section "the next version for the upgrade test ($NEXT_DIR)"
mkdir -p "$NEXT_DIR"
[ -e "$NEXT_DIR/vendor.key" ] || "$TARGET_DIR/debug/km" licence keygen --out "$NEXT_DIR/vendor.key" >/dev/null
PUBLIC=$(sed -n 's/^# Public half.*: \([0-9a-f]\{64\}\)$/\1/p' "$NEXT_DIR/vendor.key")
KM_LICENCE_PUBLIC_KEYS="$PUBLIC" cargo build --release -p km-appliance -p km-wizard \
    --features km-appliance/test-licence,km-appliance/test-migration
cp "$TARGET_DIR/release/km" "$TARGET_DIR/release/km-wizard" "$NEXT_DIR/"
export KM_E2E_NEXT_DIR="$NEXT_DIR"

# --no-fail-fast: a failing test binary does not hide the results of the others.
section "cargo test --workspace ${FEATURES[*]} --no-fail-fast -- --test-threads=2 $*"
start=$(date +%s)
rc=0
cargo test --workspace "${FEATURES[@]}" --no-fail-fast -- --test-threads=2 "$@" || rc=$?
# The agent and API end-to-end tests once more, km on MongoDB, Elasticsearch and Redis.
section "end-to-end tests again on the scale-out stores (KM_E2E_STORES=scale-out)"
KM_E2E_STORES=scale-out cargo test -p km-e2e "${FEATURES[@]}" --no-fail-fast --test pm2_link --test api --test js_api --test web --test backup --test traces -- --test-threads=2 "$@" || rc=$?
# The same suites with every role in its own process behind the gateway, as the
# appliance's units run them.
section "end-to-end tests again with the roles apart (KM_E2E_ROLES=apart)"
KM_E2E_ROLES=apart cargo test -p km-e2e "${FEATURES[@]}" --no-fail-fast --test pm2_link --test api --test js_api --test web --test dashboard --test limits --test notifications --test alerts --test prometheus --test traces -- --test-threads=2 "$@" || rc=$?
section "tests finished in $(( $(date +%s) - start )) s (exit $rc)"
exit "$rc"
