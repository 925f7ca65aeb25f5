"""Thunder (MLX LoRA adapter) runs in state.db: ``adapter_runs`` (one row per run),
``adapter_metrics`` (one row per rank, iteration and metric), status changes as ``events``
and the run's files in ``artifacts`` (owner_kind ``adapter_run``). The one writer of
``adapter_runs`` and ``adapter_metrics``; ``adapter_run`` reads a row as an ``AdapterRun``."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, Iterable

import sqlite_utils

from state.records import AdapterRun, AdapterStatus
from state.store import StoreError, add_events, now, parse_ts, transaction

STATUSES = tuple(s.value for s in AdapterStatus)
TERMINAL = tuple(s.value for s in (AdapterStatus.COMPLETED, AdapterStatus.FAILED, AdapterStatus.HUNG,
                                   AdapterStatus.CANCELLED))
OWNER_KIND = "adapter_run"
# metrics-line fields that are bookkeeping, not metrics
_NOT_METRICS = {"kind", "rank", "attempt", "time", "iteration", "pid", "world_size"}


def _encode(v: Any) -> Any:
    return json.dumps(v, sort_keys=True, ensure_ascii=False) if isinstance(v, (dict, list)) else v


def get_adapter_run(db: sqlite_utils.Database, run_id: str) -> dict | None:
    rows = list(db.query("SELECT * FROM adapter_runs WHERE id = ?", [run_id]))
    return rows[0] if rows else None


def adapter_run(db: sqlite_utils.Database, run_id: str) -> AdapterRun | None:
    row = get_adapter_run(db, run_id)
    return AdapterRun.from_row(row) if row else None


def update_adapter_run(db: sqlite_utils.Database, run_id: str, **fields: Any) -> None:
    """Create the row if absent, then set ``fields`` (dict/list values stored as JSON)."""
    if "status" in fields and fields["status"] not in STATUSES:
        raise StoreError(f"adapter run {run_id}: unknown status {fields['status']!r} (one of {', '.join(STATUSES)})")
    values = {k: _encode(v) for k, v in fields.items()}
    values["updated_at"] = now()
    cols = ", ".join(f"{k} = ?" for k in values)
    with transaction(db):
        db.conn.execute("INSERT OR IGNORE INTO adapter_runs(id) VALUES (?)", (run_id,))
        db.conn.execute(f"UPDATE adapter_runs SET {cols} WHERE id = ?", (*values.values(), run_id))


def set_status(db: sqlite_utils.Database, run_id: str, status: str, message: str = "", level: str | None = None,
               **fields: Any) -> None:
    """Change a run's status and record the change as an event, in one transaction."""
    with transaction(db):
        old = get_adapter_run(db, run_id)
        before = old["status"] if old else None
        if status in TERMINAL and "finished_at" not in fields:
            fields["finished_at"] = now()
        update_adapter_run(db, run_id, status=status, **fields)
        text = f"{before or 'new'} -> {status}" + (f": {message}" if message else "")
        add_events(db, [{"adapter_run_id": run_id, "kind": "status", "source": "thunder", "message": text,
                         "level": level or ("error" if status in ("failed", "hung") else "info"),
                         "data": {"from": before, "to": status}}])


def log_event(db: sqlite_utils.Database, run_id: str, message: str, level: str = "info", kind: str = "log",
              data: dict | None = None) -> None:
    add_events(db, [{"adapter_run_id": run_id, "source": "thunder", "kind": kind, "level": level,
                     "message": message, "data": data}])


def metric_rows(run_id: str, line: dict) -> list[tuple]:
    """(adapter_run_id, rank, iteration, name, value, ts) for each numeric field of a train or
    val line."""
    if line.get("kind") not in ("train", "val"):
        return []
    t = line.get("time")
    ts = now()
    if isinstance(t, (int, float)):
        ts = datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    rows = []
    for name, value in line.items():
        if name in _NOT_METRICS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        rows.append((run_id, int(line.get("rank", 0)), int(line.get("iteration", -1)), name, float(value), ts))
    return rows


def add_metric_lines(db: sqlite_utils.Database, run_id: str, lines: Iterable[dict], **run_fields: Any) -> int:
    """Upsert the metrics of many lines and update the run row, in one transaction (so the
    stored tail offsets never run ahead of the stored metrics)."""
    rows = [r for line in lines for r in metric_rows(run_id, line)]
    with transaction(db):
        if rows:
            db.conn.executemany(
                "INSERT INTO adapter_metrics(adapter_run_id, rank, iteration, name, value, ts) VALUES (?,?,?,?,?,?) "
                "ON CONFLICT(adapter_run_id, rank, iteration, name) DO UPDATE SET value = excluded.value, "
                "ts = excluded.ts", rows)
        if run_fields:
            update_adapter_run(db, run_id, **run_fields)
    return len(rows)


def latest_metrics(db: sqlite_utils.Database, run_id: str) -> dict[int, dict]:
    """{rank: {name: (iteration, value)}} with each metric's latest value."""
    out: dict[int, dict] = {}
    for r in db.query(
            "SELECT m.rank, m.name, m.iteration, m.value FROM adapter_metrics m JOIN ("
            "  SELECT rank, name, MAX(iteration) AS it FROM adapter_metrics WHERE adapter_run_id = ? "
            "  GROUP BY rank, name) last ON m.rank = last.rank AND m.name = last.name AND m.iteration = last.it "
            "WHERE m.adapter_run_id = ? ORDER BY m.rank, m.name", [run_id, run_id]):
        out.setdefault(r["rank"], {})[r["name"]] = (r["iteration"], r["value"])
    return out


def series(db: sqlite_utils.Database, run_id: str, name: str, rank: int = 0) -> list[tuple[int, float]]:
    return [(r["iteration"], r["value"]) for r in db.query(
        "SELECT iteration, value FROM adapter_metrics WHERE adapter_run_id = ? AND name = ? AND rank = ? "
        "ORDER BY iteration", [run_id, name, rank])]


@dataclass
class AttemptProgress:
    """What the state store knows of a run's current attempt, for a monitor that (re)attaches
    or ``thunder status``. Times are seconds since the epoch."""

    started: float | None  # when the attempt was launched (its "-> running" status event)
    heartbeat: float | None  # when a monitor last ingested any line of this attempt
    last_report: dict[int, float] = field(default_factory=dict)  # rank -> newest sign of life
    reporting: set[int] = field(default_factory=set)  # ranks with a train/val report
    done: set[int] = field(default_factory=set)
    errors: dict[int, str] = field(default_factory=dict)


def _epoch(ts: str | None) -> float | None:
    return parse_ts(ts).timestamp() if ts else None


# The rank events (start/loaded/done/error) of one attempt since its launch: an event without
# an attempt number counts for the current one; one whose rank is not an integer is no rank's.
_RANK_EVENTS = """
    SELECT ts, json_extract(data, '$.rank'), json_extract(data, '$.kind'),
           CASE WHEN json_type(data, '$.error') IS NULL THEN 'error' ELSE json_extract(data, '$.error') END
    FROM events
    WHERE adapter_run_id = ?1 AND kind = 'rank' AND ts >= ?2 AND json_valid(data)
      AND json_type(data, '$.rank') = 'integer'
      AND (json_type(data, '$.attempt') IS NULL OR json_extract(data, '$.attempt') = ?3)
    ORDER BY id"""


def attempt_progress(db: sqlite_utils.Database, run_id: str, attempt: int, world_size: int) -> AttemptProgress:
    """Per rank: the newest report of the current attempt and whether it was a train/val one.

    Metric rows are the attempt's when stamped at or after its launch (a resumed attempt
    rewrites the iterations it repeats, so older rows belong to earlier attempts). Their
    ``ts`` is the rank host's clock, so it is capped at ``heartbeat_at`` (the controller's
    clock when the lines were ingested): a host clock running ahead cannot stretch a window.
    Rank events (start/loaded/done/error) are stamped by the controller. A rank with no sign
    of life since the launch counts from the launch."""
    row = get_adapter_run(db, run_id)
    if row is None:
        raise KeyError(f"no adapter run {run_id} in the state store")
    started_ts = db.execute("SELECT max(ts) FROM events WHERE adapter_run_id = ? AND kind = 'status' "
                            "AND json_extract(data, '$.to') = 'running'", [run_id]).fetchone()[0]
    started_ts = started_ts or row["started_at"]
    out = AttemptProgress(_epoch(started_ts), _epoch(row["heartbeat_at"]))
    if started_ts is None:
        return out
    cap = out.heartbeat if out.heartbeat is not None else out.started
    for rank, ts in db.execute("SELECT rank, max(ts) FROM adapter_metrics WHERE adapter_run_id = ? AND ts >= ? "
                               "GROUP BY rank", [run_id, started_ts]).fetchall():
        out.reporting.add(rank)
        out.last_report[rank] = min(_epoch(ts), cap)
    for ts, rank, kind, error in db.execute(_RANK_EVENTS, [run_id, started_ts, attempt]).fetchall():
        out.last_report[rank] = max(out.last_report.get(rank, 0.0), _epoch(ts))
        if kind == "done":
            out.done.add(rank)
        elif kind == "error":
            out.errors[rank] = error
    for rank in range(world_size):
        out.last_report[rank] = max(out.last_report.get(rank, out.started), out.started)
    return out
