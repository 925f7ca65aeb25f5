"""state.db ingest rate: events written through `state.store.add_events` in batches (one
transaction per batch, as the executors and log tails write them), against one transaction
per event; and metrics.jsonl records through `add_metrics`. A fresh WAL database in a
temporary directory on the local disk.

    .venv/bin/python benchmarks/store_ingest.py
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from state import store  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--batch", type=int, default=1_000)
    ap.add_argument("--single", type=int, default=2_000, help="events written one transaction each")
    ap.add_argument("--metric-lines", type=int, default=20_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = store.open_db(Path(tmp) / "state.db")
        print(f"sqlite {db.execute('select sqlite_version()').fetchone()[0]}, journal "
              f"{db.execute('PRAGMA journal_mode').fetchone()[0]}, load average {os.getloadavg()[0]:.1f}")
        line = "epoch 12 step 34000: loss 0.8123 lr 2.10e-04 grad_norm 0.913"
        events = [{"message": f"{line} #{i}", "run_id": f"run-{i % 9}", "source": "trainer", "kind": "log"}
                  for i in range(args.events)]
        t = time.perf_counter()
        for i in range(0, len(events), args.batch):
            store.add_events(db, events[i:i + args.batch])
        dt = time.perf_counter() - t
        assert db.execute("SELECT count(*) FROM events").fetchone()[0] == args.events
        print(f"batched events: {args.events:,} in batches of {args.batch:,}: {dt:.2f} s = "
              f"{args.events / dt:,.0f} events/s")
        t = time.perf_counter()
        for e in events[: args.single]:
            store.add_events(db, [e])
        dt = time.perf_counter() - t
        print(f"one transaction per event: {args.single:,}: {dt:.2f} s = {args.single / dt:,.0f} events/s")
        lines = [{"kind": "step", "epoch": i // 100, "step": i, "train_loss": 1.0 / (i + 1), "lr": 3e-4,
                  "grad_norm": 0.9, "time": 1.7e9 + i} for i in range(args.metric_lines)]
        t = time.perf_counter()
        for i in range(0, len(lines), 500):
            store.add_metrics(db, "run-0", lines[i:i + 500])
        dt = time.perf_counter() - t
        n = db.execute("SELECT count(*) FROM metrics").fetchone()[0]
        print(f"metrics: {args.metric_lines:,} metrics.jsonl records ({n:,} rows) in batches of 500: {dt:.2f} s = "
              f"{args.metric_lines / dt:,.0f} records/s")
        db.close()


if __name__ == "__main__":
    main()
