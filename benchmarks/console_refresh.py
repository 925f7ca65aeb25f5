"""Console refresh time on a large state.db (issue 8: < 100 ms).

Builds a state.db with 1,000 runs (30 epochs of train/val loss each, nine bundle artifacts,
100 trainer log lines as events, a sync event for each Vast run, 5% of them failed),
50 instances (100 cost samples each), 10,000 gate decisions (2,000 reviewed) and 20 adapter
runs, then times, on a headless console (Textual ``run_test``):

* ``read``  — the worker's database work for one refresh (status bar + the pane's queries);
* ``apply`` — putting the result into the widgets on the UI thread;
* ``total`` — from asking for a refresh to the widgets being updated (worker start, read,
  hand-over to the UI thread, apply).

Each for every pane on its own (what one poll tick does: status bar + the visible pane) and
for all six panes at once; the first (cold, tables filled from empty) refresh is reported
apart from the steady state (data unchanged) and from a refresh after one run changed.

    .venv/bin/python benchmarks/console_refresh.py [--repeats 20] [--db /tmp/console-bench.db]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

from state.store import open_db, transaction, upsert_run
from models.bundle import BUNDLE_FILES, PARTITIONS
from console.app import ConsoleApp

NOW = 1735819200.0
RULES = ("empty", "no_op", "script", "frozen", "quarantine", "budget", "length_ratio", "new_word")
NKO = [chr(c) for c in range(0x07CA, 0x07EB)]


def ts(t: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(t))


def words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(NKO) for _ in range(rng.randint(2, 6))) for _ in range(n))


def build(path: Path, runs: int = 1000, instances: int = 50, decisions: int = 10_000, seed: int = 0) -> None:
    rng = random.Random(seed)
    db = open_db(path)
    with transaction(db):
        for r in range(runs):
            rid = f"run-{r:04d}"
            status = rng.choice(("completed", "completed", "running", "failed", "queued"))
            upsert_run(db, rid, matrix_id=f"m{r // 100}", script=rng.choice(("nko", "latin")),
                       mode=rng.choice(("baseline", "trajectory", "tar", "ttt")), seed=42 + r % 3, status=status,
                       executor="vast" if r % 2 else "local", instance_id=str(r % instances),
                       config=f"configs/runs/{rid}.json", out_dir=f"runs/{rid}", epoch=30, val_loss=0.7,
                       best_val_loss=0.65, best_epoch=28, test_cer=0.2 + rng.random() / 10,
                       heartbeat_at=ts(NOW - rng.randint(0, 900)))
        db.conn.executemany(
            "INSERT INTO metrics(run_id, kind, epoch, step, name, value) VALUES (?, 'epoch', ?, -1, ?, ?)",
            [(f"run-{r:04d}", e, name, 3.0 / (e + 1)) for r in range(runs) for e in range(30)
             for name in ("train_loss", "val_loss")])
        db.conn.executemany(
            "INSERT INTO artifacts(run_id, name, path, sha256, size, sync_state) VALUES (?, ?, ?, ?, ?, ?)",
            [(f"run-{r:04d}", name, f"runs/run-{r:04d}/{name}", f"{r:032x}{j:032x}", 1000,
              rng.choice(("verified", "verified", "remote-only", "mirrored")))
             for r in range(runs) for j, name in enumerate(BUNDLE_FILES) if rng.random() < 0.95])
        for i in range(instances):
            db.execute("INSERT INTO instances(id, label, run_id, gpu_name, num_gpus, dph_total, actual_status, "
                       "gpu_util, start_date) VALUES (?, ?, ?, 'RTX_4090', 1, ?, 'running', ?, ?)",
                       [str(i), f"run-{i:04d}", f"run-{i:04d}", 0.4 + i / 100, rng.choice((0.0, 95.0)),
                        NOW - 3600 * (1 + i % 10)])
            db.conn.executemany(
                "INSERT INTO cost_samples(instance_id, ts, dph_total, running_s, total_usd) VALUES (?, ?, ?, ?, ?)",
                [(str(i), ts(NOW - 60 * (100 - k)), 0.5, 60.0 * k, 0.5 * k / 60) for k in range(100)])
        db.execute("INSERT INTO budgets(name, cap_usd, warn_usd, spent_usd) VALUES ('bundle', 100, 80, 40)")
        db.conn.executemany(
            "INSERT INTO events(run_id, source, kind, message) VALUES (?, 'trainer', 'log', ?)",
            [(f"run-{r:04d}", f"epoch {e // 4} step {e} loss {3.0 / (e + 1):.4f}") for r in range(runs)
             for e in range(100)])
        db.conn.executemany(
            "INSERT INTO events(run_id, instance_id, source, kind, level, message) VALUES (?, ?, 'vast', 'sync', ?, ?)",
            [(f"run-{r:04d}", str(r % instances), lvl := ("error" if rng.random() < 0.05 else "info"),
              f"sync from instance {r % instances}: " + ("1 NOT synced" if lvl == "error" else "9 verified"))
             for r in range(1, runs, 2)])
        db.conn.executemany(
            "INSERT INTO gate_decisions(feat_id, run_id, partition, accepted, rules, edit_distance, policy_hash, "
            "witness, asr_text, proposal, reference_text) VALUES (?, ?, ?, ?, ?, ?, 'p', 'w', ?, ?, ?)",
            [(f"bam_{d:06d}", f"run-{d % runs:04d}", rng.choice(PARTITIONS), int(acc := rng.random() < 0.4),
              json.dumps([] if acc else rng.sample(RULES, 2)), rng.randint(0, 6),
              words(rng, 6), words(rng, 6), words(rng, 6)) for d in range(decisions)])
        db.conn.executemany("INSERT INTO reviews(decision_id, verdict, note, reviewer) VALUES (?, 'agree', NULL, 'b')",
                            [(d,) for d in rng.sample(range(1, decisions + 1), decisions // 5)])
        for a in range(20):
            db.execute("INSERT INTO adapter_runs(id, name, status, hosts, world_size, iteration, heartbeat_at) "
                       "VALUES (?, ?, 'running', '[\"mac-a\", \"mac-b\"]', 2, 500, ?)",
                       [f"tt-{a:03d}", f"lora-{a}", ts(NOW - 30)])
            db.conn.executemany(
                "INSERT INTO adapter_metrics(adapter_run_id, rank, iteration, name, value) VALUES (?, ?, ?, ?, ?)",
                [(f"tt-{a:03d}", rank, it, name, 1.0 / it) for rank in (0, 1) for it in range(10, 510, 10)
                 for name in ("train_loss", "tokens_per_second")])
    db.conn.close()


class TimedApp(ConsoleApp):
    """The console with a hook that says when a refresh has reached the widgets."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.applied = asyncio.Event()
        self.apply_s: list[float] = []
        self.read_s: list[float] = []

    def load_all(self, db, now, panes):
        t0 = time.perf_counter()
        out = super().load_all(db, now, panes)
        self.read_s.append(time.perf_counter() - t0)
        return out

    def apply(self, status, panes, results) -> None:
        t0 = time.perf_counter()
        super().apply(status, panes, results)
        self.apply_s.append(time.perf_counter() - t0)
        self.applied.set()


async def time_refresh(app: TimedApp, pilot, panes) -> tuple[float, float, float]:
    await pilot.pause()
    app.applied.clear()
    t0 = time.perf_counter()
    app.refresh_panes(panes)
    await app.applied.wait()
    total = time.perf_counter() - t0
    await pilot.pause()  # let the screen repaint before the next round
    return total, app.read_s[-1], app.apply_s[-1]


def ms(xs: list[float]) -> str:
    xs = sorted(xs)
    p95 = xs[min(len(xs) - 1, round(0.95 * (len(xs) - 1)))]
    return f"median {1000 * statistics.median(xs):6.1f} ms   p95 {1000 * p95:6.1f} ms"


async def bench(path: Path, repeats: int) -> dict:
    app = TimedApp(path, interval=3600, clock=lambda: NOW, cloud_poll=0)
    report: dict = {}
    async with app.run_test(size=(160, 50)) as pilot:
        await asyncio.sleep(0.5)
        await pilot.pause()
        panes = app.panes()
        cold = await time_refresh(app, pilot, panes)
        report["all panes, cold (tables filled from empty)"] = [cold]
        for name, sel in [("all panes", panes)] + [(f"{p.title} + status bar", [p]) for p in panes]:
            report[name + ", steady"] = [await time_refresh(app, pilot, sel) for _ in range(repeats)]
        writer = open_db(path)
        changed = []
        for i in range(repeats):
            upsert_run(writer, f"run-{i:04d}", epoch=31 + i)  # one cell changes per refresh
            changed.append(await time_refresh(app, pilot, [panes[0]]))
        report["Matrix + status bar, one run changed"] = changed
        writer.conn.close()
    return report


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=20)
    ap.add_argument("--db", default="", help="where to build the state.db (default: a temporary dir)")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(args.db) if args.db else Path(tmp) / "state.db"
        if not path.exists():
            t0 = time.perf_counter()
            build(path)
            print(f"built {path} in {time.perf_counter() - t0:.1f} s "
                  "(1,000 runs, 100,000 log events, 50 instances, 10,000 decisions)")
        report = asyncio.run(bench(path, args.repeats))
    for name, samples in report.items():
        total, read, apply_ = zip(*samples)
        print(f"{name:45s} total {ms(list(total))}   read {ms(list(read))}   apply {ms(list(apply_))}")


if __name__ == "__main__":
    main()
