"""`nko-ops matrix plan FILE`: the runs of a matrix, what already exists for each, and a
time / cost forecast. Read-only: it creates no state store and starts nothing.

Forecast per run = epochs still to do × seconds per epoch, an upper bound (early stopping
ends runs sooner). Seconds per epoch, first available of: the median ``epoch_time_s`` of
this matrix's full runs in state.db; its sanity runs' median scaled by full / subset train
utterances; the matrix's ``forecast.epoch_seconds``. Cost = run-hours × ``forecast.usd_per_hour``.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path

from backend.matrix import Identity, Matrix, load_matrix, resolve
from models.bundle import learning_curve


@dataclass
class PlannedRun:
    run_id: str
    script: str
    mode: str
    seed: int
    optional: bool
    epochs: int
    state: str
    epochs_done: int = 0
    test_cer: float | None = None
    seconds_left: float | None = None


@dataclass
class Plan:
    matrix: Matrix
    identity: Identity
    runs: list[PlannedRun]
    epoch_seconds: float | None
    epoch_seconds_source: str
    notes: list[str] = field(default_factory=list)

    def totals(self, with_optional: bool = False, parallel: int = 1) -> dict:
        sel = [r for r in self.runs if with_optional or not r.optional]
        left = [r.seconds_left for r in sel if r.seconds_left is not None]
        unknown = [r.run_id for r in sel if r.seconds_left is None and r.state not in ("complete", "imported")]
        gpu_s = sum(left)
        rate = self.matrix.forecast.usd_per_hour
        return {"runs": len(sel), "to_do": sum(r.state not in ("complete", "imported") for r in sel),
                "gpu_hours": gpu_s / 3600, "wall_hours_local": gpu_s / 3600 / max(1, parallel),
                "usd": gpu_s / 3600 * rate, "usd_per_hour": rate, "unknown": unknown}


def _last_epoch(run_dir: Path) -> int:
    return max((r["epoch"] for r in learning_curve(run_dir) if isinstance(r.get("epoch"), int)), default=0)


def _epoch_seconds(m: Matrix, db, train_size: int | None) -> tuple[float | None, str]:
    if db is not None:
        full = [r["value"] for r in db.query(
            "SELECT value FROM metrics JOIN runs ON runs.id = metrics.run_id WHERE runs.matrix_id = ? "
            "AND runs.sanity = 0 AND metrics.name = 'epoch_time_s' AND metrics.kind = 'epoch'", [m.matrix_id])]
        if full:
            return statistics.median(full), f"median of {len(full)} measured epoch(s) in state.db"
        sanity = [r["value"] for r in db.query(
            "SELECT value FROM metrics JOIN runs ON runs.id = metrics.run_id WHERE runs.matrix_id = ? "
            "AND runs.sanity = 1 AND metrics.name = 'epoch_time_s' AND metrics.kind = 'epoch'", [m.matrix_id])]
        if sanity and train_size:
            scale = train_size / m.sanity.subset.train
            return statistics.median(sanity) * scale, (f"sanity epochs scaled ×{scale:.1f} "
                                                       f"(train {train_size} / subset {m.sanity.subset.train})")
    if m.forecast.epoch_seconds:
        return m.forecast.epoch_seconds, "the matrix's forecast.epoch_seconds" + (
            f" ({m.forecast.source})" if m.forecast.source else "")
    return None, "no timing yet (run the sanity step, or set forecast.epoch_seconds)"


def plan_matrix(matrix_path: str | Path, db_path: str | Path | None = "state.db") -> Plan:
    from models.config import RunConfig

    m = load_matrix(matrix_path)
    ident = resolve(m)
    db = None
    if db_path is not None and Path(db_path).exists():
        from state.store import open_db

        db = open_db(db_path, read_only=True)
    try:
        epoch_s, source = _epoch_seconds(m, db, ident.split_sizes.get("train"))
        runs = []
        for spec in m.runs:
            epochs = RunConfig.model_validate(m.run_config(spec)).train.epochs
            d = m.out_dir(spec)
            row = next(iter(db.query("SELECT * FROM runs WHERE id = ?", [spec.run_id])), None) if db else None
            pr = PlannedRun(spec.run_id, spec.script, spec.mode, spec.seed, spec.optional, epochs, "to train")
            if (d / "manifest.json").exists():
                pr.state, pr.epochs_done = "complete", epochs
                try:
                    pr.test_cer = json.loads((d / "results.json").read_text(encoding="utf-8")).get("test_cer")
                except (OSError, ValueError):
                    pass
            elif row and row["status"] == "completed":
                pr.state, pr.test_cer = ("imported" if row["executor"] == "import" else "complete"), row["test_cer"]
            elif row and row["status"] == "running":
                age = ""
                if row["heartbeat_at"]:
                    from state.store import parse_ts

                    age = f", heartbeat {time.time() - parse_ts(row['heartbeat_at']).timestamp():.0f} s ago"
                pr.state = f"running (pid {row['pid']}{age})"
                pr.epochs_done = _last_epoch(d)
            elif (d / "last.pt").exists():
                pr.epochs_done = _last_epoch(d)
                pr.state = f"resumable after epoch {pr.epochs_done}"
            elif spec.import_from:
                pr.state = ("import available" if Path(spec.import_from).is_dir()
                            else "to train (import_from not found)")
            if row and row["status"] == "failed" and pr.state.startswith(("to train", "resumable")):
                pr.state += f"; last attempt failed: {(row['error'] or '')[:80]}"
            if pr.state not in ("complete", "imported", "import available") and epoch_s is not None:
                pr.seconds_left = max(0, epochs - pr.epochs_done) * epoch_s
            runs.append(pr)
    finally:
        if db is not None:
            db.close()
    return Plan(m, ident, runs, epoch_s, source)


def format_plan(p: Plan, with_optional: bool = False, parallel: int = 1) -> str:
    m, ident = p.matrix, p.identity
    out = [f"matrix {m.matrix_id} ({m.path}): {len(m.runs)} runs, "
           f"{sum(r.optional for r in m.runs)} optional; out_root {m.out_root}"]
    for label, value, path in (("snapshot", ident.snapshot_sha256, m.snapshot), ("split", ident.split_sha256, m.split),
                               ("features", ident.recipe_hash, m.features)):
        out.append(f"  {label:<9} {path}  " + (f"{value[:16]}…" if value else "NOT AVAILABLE"))
    for prob in ident.problems:
        out.append(f"  problem: {prob}")
    out.append("")
    head = f"  {'run':<28} {'script':<6} {'mode':<10} {'seed':>4} {'epochs':>6}  {'forecast':>9}  state"
    out.append(head)
    for r in p.runs:
        fc = "—" if r.seconds_left is None else (f"{r.seconds_left / 3600:.1f} h" if r.seconds_left >= 3600
                                                 else f"{r.seconds_left / 60:.1f} min")
        state = r.state + (f" (test CER {r.test_cer:.4f})" if r.test_cer is not None else "")
        opt = " [optional]" if r.optional else ""
        out.append(f"  {r.run_id:<28} {r.script:<6} {r.mode:<10} {r.seed:>4} {r.epochs:>6}  {fc:>9}  {state}{opt}")
    t = p.totals(with_optional, parallel)
    out.append("")
    out.append("  seconds per epoch: " + (f"{p.epoch_seconds:.1f}" if p.epoch_seconds else "unknown")
               + f" — {p.epoch_seconds_source}")
    scope = "all runs" if with_optional else "required runs (add --with-optional for the rest)"
    if p.epoch_seconds is None:
        out.append(f"  forecast, {scope}: {t['to_do']} of {t['runs']} to do; no time or cost forecast yet")
        return "\n".join(out)
    out.append(f"  forecast, {scope}: {t['to_do']} of {t['runs']} to do, {t['gpu_hours']:.2f} run-hours "
               f"(upper bound: early stopping ends runs sooner); local wall time with --parallel {parallel}: "
               f"{t['wall_hours_local']:.2f} h")
    if t["usd_per_hour"]:
        out.append(f"  cost at ${t['usd_per_hour']:.2f}/h: ${t['usd']:.2f} (local executor: no charge)")
    if t["unknown"]:
        out.append(f"  no forecast for: {', '.join(t['unknown'])}")
    return "\n".join(out)
