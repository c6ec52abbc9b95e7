#!/usr/bin/env python3
"""Rows per second SQLite takes into km's metric table (same schema and indexes, WAL,
synchronous=NORMAL, transactions of 8,192 rows, INSERT OR IGNORE), with content ids of
random order (km before 2026-12-06) and with the time first (km now), side by side.

Usage: scripts/sqlite_ids.py [ROWS]   (default 4,000,000 per kind; a minute of 18,000
servers' metric points is ~1.7 M rows)
"""
import hashlib
import os
import sqlite3
import sys
import tempfile
import time

SCHEMA = """PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;
CREATE TABLE metrics (bucket_id TEXT NOT NULL, server_name TEXT NOT NULL,
  app_name TEXT NOT NULL, pm_id INTEGER NOT NULL, name TEXT NOT NULL, unit TEXT,
  agg_type TEXT, at INTEGER NOT NULL, avg REAL NOT NULL, min REAL NOT NULL,
  max REAL NOT NULL, last REAL NOT NULL, count INTEGER NOT NULL, cid TEXT);
CREATE INDEX metrics_by_bucket ON metrics(bucket_id, at);
CREATE INDEX metrics_by_time ON metrics(at);
CREATE UNIQUE INDEX metrics_by_cid ON metrics(cid);"""
BATCH = 8192


def run(kind, rows, directory):
    db = sqlite3.connect(os.path.join(directory, f"{kind}.db"), isolation_level=None)
    db.executescript(SCHEMA)
    at, written, start = 1_795_314_180_000, 0, time.time()
    while written < rows:
        batch = []
        for i in range(written, written + BATCH):
            digest = hashlib.sha256(str(i).encode()).hexdigest()[:32]
            cid = digest if kind == "random" else f"{at:012x}{digest}"
            batch.append(("b", f"srv-{i % 18000}", "app", i % 8, "Heap Usage", "%", None,
                          at, 1.0, 1.0, 1.0, 1.0, 60, cid))
        db.execute("BEGIN")
        db.executemany("INSERT OR IGNORE INTO metrics VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", batch)
        db.execute("COMMIT")
        written += BATCH
        if written % (BATCH * 25) == 0:
            at += 60_000
    rate = written / (time.time() - start)
    print(f'{{"ids": "{kind}", "rows": {written}, "rows_per_s": {rate:.0f}}}', flush=True)


def main():
    rows = int(sys.argv[1]) if len(sys.argv) > 1 else 4_000_000
    with tempfile.TemporaryDirectory() as directory:
        for kind in ("random", "time-first"):
            run(kind, rows, directory)


if __name__ == "__main__":
    main()
