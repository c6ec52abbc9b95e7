#!/usr/bin/env python3
"""The ingest benchmark: km (release) on a free loopback port, km-loadgen simulating
SERVERS x PROCESSES agents, km's CPU and memory read from /proc; then the same load
against a Node.js peer (scripts/peer/ingest.js: npm ws + JSON.parse + npm fast-json-patch,
no storage, the original backend's stack), measured the same way.

Usage: scripts/bench.py [--servers 2000] [--processes 8] [--seconds 60] [--logs-per-s 1]
                        [--stores embedded|scale-out] [--bin-dir DIR] [--no-peer] [--no-micro]
                        [--watch patches|statuses] [--only patches|logs]
                        [--restart [--licence-key FILE]]
e.g.   scripts/bench.py --bin-dir target/release --servers 500 --seconds 15 --no-micro

Two kinds of run: status:patch only, then with log lines and latency probes (send ->
visible through GET /api/bucket/:id/data/status). Each kind runs against km, then the
peer. Both are measured alike over the steady-state window after the ramp: CPU
(utime + stime) per frame received, peak VmRSS and per server, p50/p99 from km-loadgen.
--bin-dir DIR  takes km and km-loadgen from DIR instead of `cargo build --release`.
--no-peer      skips the peer (needs node >= 18; its deps are installed with `npm ci`
               into scripts/peer/node_modules when missing).
--no-micro     skips the in-process micro benchmark (`cargo bench --bench ingest`).
--watch MODE   km's runs have a browser watching the bucket over /primus (km-loadgen
               --watch): `patches` subscribes as the dashboard does (status patches as the
               agents sent them), `statuses` as a @pm2/js-api `status` listener (a whole
               status rendered after every patch). Compare with a run without it.
--only KIND    runs one kind: `patches` (status:patch only) or `logs` (with logs and probes).
--restart      instead: km is stopped (SIGTERM) and started again on the same port and data
               while every agent is linked; prints how long stopping, starting and linking
               every agent again took. With --licence-key FILE km runs with a licence
               signed by that key (`km licence sign`; km must trust the key, e.g. a build
               with the feature test-licence and tests/keys/test-licence.key).
With --stores scale-out, km runs on SecantusDB (MongoDB), osmem-server (Elasticsearch) and
redis-server, started here on free ports (tests/run.sh installs them), and the run also
reports what the events store received; the peer runs the same either way.
Prints one JSON line per run (km and peer rows have the same fields, "target" tells
which); the last line is the summary, with per kind the ratios km/peer of CPU per frame
and RSS per server, and both p99s ("vs_peer").
"""
import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PEER_DIR = os.path.join(ROOT, "scripts", "peer")
TICKS = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(url, body=None, token=None):
    req = urllib.request.Request(url, data=json.dumps(body).encode() if body is not None else None)
    req.add_header("content-type", "application/json")
    if token:
        req.add_header("authorization", f"Bearer {token}")
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def cpu_seconds(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS  # utime + stime


def memory_kb(pid):
    values = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0])
    return values


def wait_healthy(base, proc, what):
    for _ in range(100):
        if proc.poll() is not None:
            sys.exit(f"{what} exited with {proc.returncode} before answering /healthz")
        try:
            return call(f"{base}/healthz")
        except OSError:
            time.sleep(0.1)
    sys.exit(f"{what} did not answer /healthz within 10 s")


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def start_stores(data):
    """SecantusDB, osmem-server and redis-server on free ports; returns (processes, env)."""
    mongo_port, redis_port = free_port(), free_port()
    os.makedirs(f"{data}/mongo")
    mongo = subprocess.Popen(["secantusd-py", "--host", "127.0.0.1", "--port", str(mongo_port),
                              "--storage-path", f"{data}/mongo"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "",
                              "--appendonly", "no", "--dir", data], stdout=subprocess.DEVNULL)
    import osmem_server
    search = subprocess.Popen([os.path.join(os.path.dirname(osmem_server.__file__), "bin", "osmem-server"),
                               "-addr", "127.0.0.1:0", "-no-stdin-watch"], stdout=subprocess.PIPE, text=True)
    es_url = json.loads(search.stdout.readline())["url"]
    for port in (mongo_port, redis_port):
        for _ in range(150):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)
    env = {"KM_MONGO_URL": f"mongodb://127.0.0.1:{mongo_port}/km", "KM_ELASTICSEARCH_URL": es_url,
           "KM_REDIS_URL": f"redis://127.0.0.1:{redis_port}/"}
    return [mongo, redis, search], env


def measure(args, target, proc, base, loadgen_bin, lg_env, probe, watch=None):
    """Runs km-loadgen against `base` and measures `proc` (km or the peer) in the steady
    state, the same way for both. Returns (row, health at the window's start, health at
    its end, health after the run, window seconds); health is the target's /healthz."""
    cmd = [loadgen_bin, "--target", base, "--servers", str(args.servers), "--processes", str(args.processes),
           "--seconds", str(args.seconds), "--logs-per-s", str(args.logs_per_s if probe else 0)]
    if watch:
        cmd += ["--watch", watch]
    with tempfile.TemporaryFile(mode="w+") as errors:
        loadgen = subprocess.Popen(cmd, env=dict(os.environ, **lg_env), stdout=subprocess.PIPE, stderr=errors,
                                   text=True)
        try:
            # Steady state: after the ramp (connect rate 500/s) and a few seconds of settling.
            time.sleep(args.servers / 500 + 4)
            cpu0, t0 = cpu_seconds(proc.pid), time.monotonic()
            health0 = call(f"{base}/healthz")
            peak_rss = 0
            end = t0 + max(args.seconds - 6, 5)
            while time.monotonic() < end:
                time.sleep(1)
                peak_rss = max(peak_rss, memory_kb(proc.pid).get("VmRSS", 0))
            cpu1, t1 = cpu_seconds(proc.pid), time.monotonic()
            health1 = call(f"{base}/healthz")
            out, _ = loadgen.communicate(timeout=args.seconds + 120)
        finally:
            if loadgen.poll() is None:
                loadgen.kill()
                loadgen.wait()
        lines = out.strip().splitlines()
        if not lines:
            errors.seek(0)
            sys.exit(f"km-loadgen against {target} gave no result (exit {loadgen.returncode}):\n"
                     + "".join(errors.readlines()[-20:]))
        result = json.loads(lines[-1])
    health_end = call(f"{base}/healthz")
    cpu = (cpu1 - cpu0) / (t1 - t0)
    frames_per_s = result["frames_per_s"]
    row = {
        "target": target,
        "run": RUN_KINDS[probe],
        "servers": args.servers, "processes": args.processes,
        "servers_connected": result["servers_connected"],
        "frames_per_s": round(frames_per_s, 1),
        "patch_frame_bytes_avg": result["patch_frame_bytes_avg"],
        "p50_ms": result.get("p50_ms"), "p99_ms": result.get("p99_ms"),
        "latency_samples": result.get("latency_samples"), "latency_timeouts": result.get("latency_timeouts"),
        "probe_http_errors": result.get("probe_http_errors"),
        "cpu_cores": round(cpu, 3),
        "cpu_us_per_frame": round(cpu * 1e6 / frames_per_s, 2) if frames_per_s else None,
        "rss_mb": round(peak_rss / 1024, 1),
        "rss_per_server_kb": round(peak_rss / max(args.servers, 1), 1),
        "patch_frames_sent": result["patch_frames"],
        "resends": result.get("resends_received"),
        "disconnects": result.get("disconnects"),
    }
    if watch:
        row.update(watch=watch, watch_messages=result.get("watch_messages"),
                   watch_kb_per_s=round(result.get("watch_bytes", 0) / 1024
                                          / max(result["ramp_seconds"] + result["seconds"], 1), 1))
    return row, health0, health1, health_end, t1 - t0


RUN_KINDS = {False: "status:patch only", True: "with logs and latency probes"}


def setup_bucket(base):
    """A user and a bucket on a fresh km: (access token, bucket)."""
    user = call(f"{base}/api/oauth/register", {"username": "bench", "email": "bench@example.com",
                                                "password": "bench-password", "accept_terms": 1})
    token = user["access_token"]
    return token, call(f"{base}/api/bucket/create_classic", {"name": "bench"}, token)["bucket"]


def run_km(args, km_bin, loadgen_bin, probe):
    """km with its own setup: a user and a bucket (real keys and token), its stores, and
    its writer and ingest counters from /healthz."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    data = tempfile.mkdtemp(prefix="km-bench-")
    env = dict(os.environ, KM_LOG="warn")
    stores, stores_env = start_stores(data) if args.stores == "scale-out" else ([], {})
    env.update(stores_env)
    km = subprocess.Popen([km_bin, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data], env=env)
    try:
        wait_healthy(base, km, "km")
        token, bucket = setup_bucket(base)
        lg_env = {"KM_PUBLIC": bucket["public_id"], "KM_SECRET": bucket["secret_id"]}
        if probe or args.watch:
            lg_env.update(KM_TOKEN=token)
        if probe:
            lg_env.update(KM_BUCKET=bucket["_id"])
        row, health0, health1, health, secs = measure(args, "km", km, base, loadgen_bin, lg_env, probe, args.watch)
        writer0, writer1 = health0["writer"], health1["writer"]
        items = lambda w: w["events_written"] + w["metric_points_written"]
        batches = writer1["batches_written"] - writer0["batches_written"]
        row.update({
            "stores": args.stores,
            "store_docs_per_s": round((items(writer1) - items(writer0)) / secs, 1),
            "store_batch_size_avg": round((items(writer1) - items(writer0)) / batches, 1) if batches else None,
            "dropped_events": health["writer"]["dropped"],
            "patches_applied": health["ingest"]["patches"] - health["ingest"]["patches_failed"]
                               - health["ingest"]["patches_refused"],
            "patches_failed": health["ingest"]["patches_failed"],
        })
        return row
    finally:
        stop(km)
        for p in stores:
            p.kill()
            p.wait()
        subprocess.run(["rm", "-rf", data])


def run_peer(args, loadgen_bin, probe):
    """The Node.js peer (scripts/peer/ingest.js) under the same load; it takes any keys."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    peer = subprocess.Popen(["node", os.path.join(PEER_DIR, "ingest.js"), "--listen", f"127.0.0.1:{port}"],
                            stderr=subprocess.DEVNULL)
    try:
        wait_healthy(base, peer, "the Node.js peer")
        lg_env = {"KM_PUBLIC": "peer-public", "KM_SECRET": "peer-secret"}
        if probe:
            lg_env.update(KM_TOKEN="peer-token", KM_BUCKET="peer-bucket")
        row, _, _, health, _ = measure(args, "peer", peer, base, loadgen_bin, lg_env, probe)
        row.update({
            "node": subprocess.run(["node", "--version"], capture_output=True, text=True).stdout.strip(),
            "events_received": health["events"],
            "patches_applied": health["patches"] - health["patches_failed"],
            "patches_failed": health["patches_failed"],
        })
        return row
    finally:
        stop(peer)


def wait_linked(base, servers, deadline):
    """Seconds until /healthz counts `servers` agent sockets (None if not by `deadline`)."""
    start = time.monotonic()
    while time.monotonic() < deadline:
        try:
            if call(f"{base}/healthz")["agents"]["sockets"] >= servers:
                return time.monotonic() - start
        except OSError:
            pass
        time.sleep(0.1)
    return None


def run_restart(args, km_bin, loadgen_bin):
    """Every agent linked, km restarted: how long until every agent is linked again."""
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    data = tempfile.mkdtemp(prefix="km-bench-")
    env = dict(os.environ, KM_LOG="warn")
    if args.licence_key:
        licence = subprocess.run([km_bin, "licence", "sign", "--key", args.licence_key, "--customer", "bench",
                                  "--process-limit", str(args.servers * args.processes * 2), "--days", "30"],
                                 capture_output=True, text=True, check=True).stdout.strip()
        env["KM_DEDICATED_KEY"] = licence
    serve = [km_bin, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data]
    km = subprocess.Popen(serve, env=env)
    loadgen = None
    try:
        wait_healthy(base, km, "km")
        token, bucket = setup_bucket(base)
        lg_env = {"KM_PUBLIC": bucket["public_id"], "KM_SECRET": bucket["secret_id"]}
        cmd = [loadgen_bin, "--target", base, "--servers", str(args.servers), "--processes", str(args.processes),
               "--seconds", "3600", "--logs-per-s", "0"]
        loadgen = subprocess.Popen(cmd, env=dict(os.environ, **lg_env), stdout=subprocess.PIPE,
                                   stderr=subprocess.DEVNULL, text=True)
        linked = wait_linked(base, args.servers, time.monotonic() + args.servers / 500 + 120)
        if linked is None:
            sys.exit("not every agent linked before the restart")
        time.sleep(10)
        t0 = time.monotonic()
        stop(km)
        t1 = time.monotonic()
        km = subprocess.Popen(serve, env=env)
        wait_healthy(base, km, "km (restarted)")
        t2 = time.monotonic()
        relinked = wait_linked(base, args.servers, t1 + 120)
        health = call(f"{base}/healthz")
        usage = call(f"{base}/api/bucket/{bucket['_id']}/usage", token=token)
        loadgen.send_signal(signal.SIGINT)
        result = json.loads(loadgen.communicate(timeout=60)[0].strip().splitlines()[-1])
        return {
            "target": "km", "run": "restart", "servers": args.servers, "processes": args.processes,
            "licence": bool(args.licence_key), "usage": usage,
            "stop_s": round(t1 - t0, 2), "start_s": round(t2 - t1, 2),
            "relinked_s": round(relinked, 2) if relinked is not None else None,
            "sockets_after": health["agents"]["sockets"],
            "reconnect_failures": result.get("reconnect_failures"), "disconnects": result.get("disconnects"),
        }
    finally:
        if loadgen and loadgen.poll() is None:
            loadgen.kill()
            loadgen.wait()
        stop(km)
        subprocess.run(["rm", "-rf", data])


def ratio(a, b):
    return round(a / b, 2) if a is not None and b else None


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--logs-per-s", type=float, default=1)
    parser.add_argument("--stores", choices=["embedded", "scale-out"], default="embedded")
    parser.add_argument("--bin-dir", help="take km and km-loadgen from DIR instead of building them")
    parser.add_argument("--no-peer", action="store_true", help="skip the Node.js peer's runs")
    parser.add_argument("--no-micro", action="store_true", help="skip the in-process micro benchmark (cargo bench)")
    parser.add_argument("--watch", choices=["patches", "statuses"], help="a browser watches km's bucket")
    parser.add_argument("--only", choices=["patches", "logs"], help="run one kind only")
    parser.add_argument("--restart", action="store_true", help="measure linking again after km restarts")
    parser.add_argument("--licence-key", help="with --restart: run km with a licence signed by this key")
    args = parser.parse_args()
    if args.bin_dir:
        bin_dir = args.bin_dir
    else:
        subprocess.run(["cargo", "build", "--release", "-q", "-p", "km-appliance", "-p", "km-loadgen"], cwd=ROOT,
                       check=True)
        bin_dir = os.path.join(os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target")), "release")
    km_bin, loadgen_bin = (os.path.join(bin_dir, b) for b in ("km", "km-loadgen"))
    for b in (km_bin, loadgen_bin):
        if not os.access(b, os.X_OK):
            sys.exit(f"{b} is missing or not executable")
    if not args.no_peer:
        if not shutil.which("node"):
            sys.exit("node is not installed: install Node.js (18 or later) for the peer, or pass --no-peer")
        if not os.path.isdir(os.path.join(PEER_DIR, "node_modules")):
            subprocess.run(["npm", "ci", "--prefix", PEER_DIR, "--no-audit", "--no-fund"], check=True,
                           stdout=subprocess.DEVNULL)
    if args.restart:
        print(json.dumps(run_restart(args, km_bin, loadgen_bin)))
        return
    runs, vs_peer = [], {}
    kinds = {"patches": (False,), "logs": (True,)}.get(args.only, (False, True))
    for probe in kinds:
        km = run_km(args, km_bin, loadgen_bin, probe)
        runs.append(km)
        print(json.dumps(km), flush=True)
        if args.no_peer:
            continue
        peer = run_peer(args, loadgen_bin, probe)
        runs.append(peer)
        print(json.dumps(peer), flush=True)
        vs_peer[RUN_KINDS[probe]] = {
            "cpu_us_per_frame_km_over_peer": ratio(km["cpu_us_per_frame"], peer["cpu_us_per_frame"]),
            "rss_per_server_km_over_peer": ratio(km["rss_per_server_kb"], peer["rss_per_server_kb"]),
            "p99_ms_km": km["p99_ms"], "p99_ms_peer": peer["p99_ms"],
        }
    summary = {"summary": runs}
    if vs_peer:
        summary["vs_peer"] = vs_peer
    if not args.no_micro:
        micro = subprocess.run(["cargo", "bench", "-q", "-p", "km-appliance", "--bench", "ingest"], cwd=ROOT,
                               capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
        summary["in_process"] = json.loads(micro)
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
