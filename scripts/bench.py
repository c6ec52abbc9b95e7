#!/usr/bin/env python3
"""The ingest benchmark: km (release) on a free loopback port, km-loadgen simulating
SERVERS x PROCESSES agents, km's CPU and memory read from /proc.

Usage: scripts/bench.py [--servers 2000] [--processes 8] [--seconds 60] [--logs-per-s 1]
                        [--stores embedded|scale-out]
With --stores scale-out, km runs on SecantusDB (MongoDB), osmem-server (Elasticsearch) and
redis-server, started here on free ports (tests/run.sh installs them), and the run also
reports what the events store received.
Prints one JSON line per run; the last line is the summary.
"""
import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
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


def wait_healthy(base, proc):
    for _ in range(100):
        if proc.poll() is not None:
            sys.exit(f"km exited with {proc.returncode} before answering /healthz")
        try:
            return call(f"{base}/healthz")
        except OSError:
            time.sleep(0.1)
    sys.exit("km did not answer /healthz within 10 s")


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


def run(args, km_bin, loadgen_bin, probe):
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    data = tempfile.mkdtemp(prefix="km-bench-")
    env = dict(os.environ, KM_LOG="warn")
    stores, stores_env = start_stores(data) if args.stores == "scale-out" else ([], {})
    env.update(stores_env)
    km = subprocess.Popen([km_bin, "serve", "--listen", f"127.0.0.1:{port}", "--data-dir", data], env=env)
    try:
        wait_healthy(base, km)
        user = call(f"{base}/api/oauth/register", {"username": "bench", "email": "bench@example.com",
                                                    "password": "bench-password", "accept_terms": 1})
        token = user["access_token"]
        bucket = call(f"{base}/api/bucket/create_classic", {"name": "bench"}, token)["bucket"]
        cmd = [loadgen_bin, "--target", base, "--servers", str(args.servers), "--processes", str(args.processes),
               "--seconds", str(args.seconds), "--logs-per-s", str(args.logs_per_s if probe else 0)]
        lg_env = dict(os.environ, KM_PUBLIC=bucket["public_id"], KM_SECRET=bucket["secret_id"])
        if probe:
            lg_env.update(KM_TOKEN=token, KM_BUCKET=bucket["_id"])
        loadgen = subprocess.Popen(cmd, env=lg_env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        # Steady state: after the ramp (connect rate 500/s) and a few seconds of settling.
        ramp = args.servers / 500 + 4
        time.sleep(ramp)
        cpu0, t0 = cpu_seconds(km.pid), time.monotonic()
        health0 = call(f"{base}/healthz")
        window = max(args.seconds - 6, 5)
        peak_rss = 0
        end = t0 + window
        while time.monotonic() < end:
            time.sleep(1)
            peak_rss = max(peak_rss, memory_kb(km.pid).get("VmRSS", 0))
        cpu1, t1 = cpu_seconds(km.pid), time.monotonic()
        writer1 = call(f"{base}/healthz")["writer"]
        out, _ = loadgen.communicate(timeout=args.seconds + 120)
        result = json.loads(out.strip().splitlines()[-1])
        health = call(f"{base}/healthz")
        km_cpu = (cpu1 - cpu0) / (t1 - t0)
        writer0 = health0["writer"]
        items = lambda w: w["events_written"] + w["metric_points_written"]
        batches = writer1["batches_written"] - writer0["batches_written"]
        frames_per_s = result["frames_per_s"]
        return {
            "run": "with logs and latency probes" if probe else "status:patch only",
            "servers": args.servers, "processes": args.processes,
            "servers_connected": result["servers_connected"],
            "frames_per_s": round(frames_per_s, 1),
            "patch_frame_bytes_avg": result["patch_frame_bytes_avg"],
            "p50_ms": result.get("p50_ms"), "p99_ms": result.get("p99_ms"),
            "latency_samples": result.get("latency_samples"), "latency_timeouts": result.get("latency_timeouts"),
            "km_cpu_cores": round(km_cpu, 3),
            "km_cpu_us_per_frame": round(km_cpu * 1e6 / frames_per_s, 2) if frames_per_s else None,
            "km_rss_mb": round(peak_rss / 1024, 1),
            "km_rss_per_server_kb": round(peak_rss / max(args.servers, 1), 1),
            "stores": args.stores,
            "store_docs_per_s": round((items(writer1) - items(writer0)) / (t1 - t0), 1),
            "store_batch_size_avg": round((items(writer1) - items(writer0)) / batches, 1) if batches else None,
            "resends": result.get("resends_received"),
            "dropped_events": health["writer"]["dropped"],
            "patches_failed": health["ingest"]["patches_failed"],
        }
    finally:
        km.send_signal(signal.SIGTERM)
        try:
            km.wait(timeout=30)
        except subprocess.TimeoutExpired:
            km.kill()
        for p in stores:
            p.kill()
            p.wait()
        subprocess.run(["rm", "-rf", data])


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--servers", type=int, default=2000)
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--seconds", type=int, default=60)
    parser.add_argument("--logs-per-s", type=float, default=1)
    parser.add_argument("--stores", choices=["embedded", "scale-out"], default="embedded")
    args = parser.parse_args()
    subprocess.run(["cargo", "build", "--release", "-q", "-p", "km-appliance", "-p", "km-loadgen"], cwd=ROOT, check=True)
    target = os.environ.get("CARGO_TARGET_DIR", os.path.join(ROOT, "target"))
    km_bin, loadgen_bin = (os.path.join(target, "release", b) for b in ("km", "km-loadgen"))
    runs = [run(args, km_bin, loadgen_bin, probe) for probe in (False, True)]
    for r in runs:
        print(json.dumps(r), flush=True)
    micro = subprocess.run(["cargo", "bench", "-q", "-p", "km-appliance", "--bench", "ingest"], cwd=ROOT,
                           capture_output=True, text=True, check=True).stdout.strip().splitlines()[-1]
    print(json.dumps({"summary": runs, "in_process": json.loads(micro)}))


if __name__ == "__main__":
    main()
