#!/usr/bin/env bash
# What the gateway's forwarding costs: km's roles apart (release build) on a temporary
# Redis, then wrk on the api role directly and through the gateway, same request.
#   scripts/bench_gateway.sh [seconds] [connections]
# Needs redis-server and wrk (apt-get install redis-server wrk).
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
SECONDS_EACH="${1:-10}"
CONNECTIONS="${2:-16}"
KM="${KM_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release/km}"
[ -x "$KM" ] || { echo "build it first: cargo build --release -p km-appliance" >&2; exit 1; }
DIR="$(mktemp -d)"
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
REDIS_PORT=$(port); GATEWAY=$(port); API=$(port)
cleanup() { kill $(jobs -p) 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$DIR"; }
trap cleanup EXIT
redis-server --port "$REDIS_PORT" --save '' --appendonly no >"$DIR/redis.log" 2>&1 &
export KM_REDIS_URL="redis://127.0.0.1:$REDIS_PORT" KM_DATA_DIR="$DIR" KM_LOG=warn \
    KM_LISTEN="127.0.0.1:$GATEWAY" KM_API_LISTEN="127.0.0.1:$API" \
    KM_AUTH_LISTEN="127.0.0.1:$(port)" KM_REALTIME_LISTEN="127.0.0.1:$(port)" \
    KM_INTERACTOR_LISTEN="127.0.0.1:$(port)" KM_WORKERS_LISTEN="127.0.0.1:$(port)"
sleep 0.5
for role in gateway api auth realtime interactor workers; do
    "$KM" serve --role "$role" >"$DIR/$role.log" 2>&1 &
done
for _ in $(seq 50); do
    curl -fs "http://127.0.0.1:$GATEWAY/healthz" >/dev/null 2>&1 && break
    sleep 0.1
done
PATH_="/api/openapi.json"
for target in "api role directly|$API" "through the gateway|$GATEWAY"; do
    name="${target%%|*}"; p="${target##*|}"
    echo "== GET $PATH_, $name (wrk -t2 -c$CONNECTIONS -d${SECONDS_EACH}s)"
    wrk -t2 -c"$CONNECTIONS" -d"${SECONDS_EACH}s" --latency "http://127.0.0.1:$p$PATH_" \
        | grep -E "Requests/sec|Latency|50%|99%"
done
