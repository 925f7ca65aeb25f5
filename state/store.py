"""The state store: one SQLite file (``state.db``) shared by the executors, the lanes and the
console. This module owns the whole schema. Other parts add tables or columns by appending a
migration to ``MIGRATIONS`` here, never by creating tables of their own.

Concurrency model: WAL journal (readers never block the writer), a busy timeout so a writer
waits for another instead of failing, and short write transactions that start with
``BEGIN IMMEDIATE`` (take the write lock first, so a read-then-write transaction cannot hit
SQLite's un-retryable "snapshot is stale" busy error). The connection runs in autocommit
mode: a bare ``db.execute("INSERT ...")`` commits at once instead of leaving an implicit
transaction holding the lock; sqlite-utils' own writes use explicit BEGIN/COMMIT.
"""

from __future__ import annotations

import contextlib
import errno
import getpass
import json
import os
import sqlite3
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterable, Iterator

import sqlite_utils

from state.records import Artifact, Run, RunStatus, SyncState
from models.errors import NkoOpsError

BUSY_TIMEOUT_S = 60.0
TS_SQL = "(strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))"  # same format as now()

RUN_STATUSES = tuple(s.value for s in RunStatus)
SYNC_STATES = tuple(s.value for s in SyncState)


class StoreError(NkoOpsError, RuntimeError):
    pass


class StoreReadOnly(StoreError):
    """The state store exists but cannot be written (read-only file or disk)."""


def now() -> str:
    """UTC timestamp with milliseconds, e.g. ``2025-01-02T03:04:05.678Z`` (sorts as text)."""
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def user() -> str:
    """Who is acting, for the records (reviews, forced destroys). ``getpass.getuser`` fails in
    containers without a passwd entry for the uid; the uid then stands in."""
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return f"uid-{os.getuid()}"


def parse_ts(ts: str) -> datetime:
    return datetime.strptime(ts, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


# --------------------------------------------------------------------------- schema

_V1 = [
    f"""CREATE TABLE schema_migrations (
        version INTEGER PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL DEFAULT {TS_SQL})""",
    f"""CREATE TABLE snapshots (
        sha256 TEXT PRIMARY KEY, path TEXT, rows INTEGER,
        created_at TEXT NOT NULL DEFAULT {TS_SQL})""",
    f"""CREATE TABLE splits (
        sha256 TEXT PRIMARY KEY, snapshot_sha256 TEXT, seed INTEGER, path TEXT,
        train INTEGER, val INTEGER, test INTEGER,
        created_at TEXT NOT NULL DEFAULT {TS_SQL})""",
    f"""CREATE TABLE matrices (
        id TEXT PRIMARY KEY, path TEXT, sha256 TEXT,
        snapshot_sha256 TEXT, split_sha256 TEXT, recipe_hash TEXT,
        created_at TEXT NOT NULL DEFAULT {TS_SQL}, updated_at TEXT)""",
    f"""CREATE TABLE runs (
        id TEXT PRIMARY KEY, matrix_id TEXT, script TEXT, mode TEXT, seed INTEGER,
        flags TEXT NOT NULL DEFAULT '{{}}', config TEXT, config_sha256 TEXT, out_dir TEXT,
        status TEXT NOT NULL DEFAULT 'planned', executor TEXT, instance_id TEXT, pid INTEGER, host TEXT,
        heartbeat_at TEXT, epoch INTEGER, step INTEGER, train_loss REAL, val_loss REAL,
        best_val_loss REAL, best_epoch INTEGER, test_cer REAL, test_cer_toneless REAL,
        snapshot_sha256 TEXT, split_sha256 TEXT, recipe_hash TEXT,
        metrics_offset INTEGER NOT NULL DEFAULT 0, log_offset INTEGER NOT NULL DEFAULT 0,
        error TEXT, started_at TEXT, finished_at TEXT,
        created_at TEXT NOT NULL DEFAULT {TS_SQL}, updated_at TEXT)""",
    "CREATE INDEX runs_matrix ON runs(matrix_id)",
    "CREATE INDEX runs_status ON runs(status)",
    f"""CREATE TABLE events (
        id INTEGER PRIMARY KEY AUTOINCREMENT, ts TEXT NOT NULL DEFAULT {TS_SQL},
        source TEXT, run_id TEXT, instance_id TEXT, adapter_run_id TEXT,
        kind TEXT NOT NULL DEFAULT 'log', level TEXT NOT NULL DEFAULT 'info',
        message TEXT, data TEXT)""",
    "CREATE INDEX events_run ON events(run_id, id)",
    "CREATE INDEX events_instance ON events(instance_id, id)",
    "CREATE INDEX events_adapter ON events(adapter_run_id, id)",
    # One row per (run, kind, epoch, step, name): re-ingesting a metrics line is idempotent.
    f"""CREATE TABLE metrics (
        id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, kind TEXT NOT NULL,
        epoch INTEGER NOT NULL DEFAULT -1, step INTEGER NOT NULL DEFAULT -1,
        name TEXT NOT NULL, value REAL, ts TEXT NOT NULL DEFAULT {TS_SQL},
        UNIQUE(run_id, kind, epoch, step, name))""",
    "CREATE INDEX metrics_run_name ON metrics(run_id, name, kind, epoch, step)",
    f"""CREATE TABLE artifacts (
        id INTEGER PRIMARY KEY, owner_kind TEXT NOT NULL DEFAULT 'run', run_id TEXT NOT NULL,
        name TEXT NOT NULL, path TEXT, sha256 TEXT, size INTEGER,
        locations TEXT NOT NULL DEFAULT '[]', sync_state TEXT NOT NULL DEFAULT 'local',
        verified_at TEXT, created_at TEXT NOT NULL DEFAULT {TS_SQL}, updated_at TEXT,
        UNIQUE(owner_kind, run_id, name))""",
    "CREATE INDEX artifacts_sha ON artifacts(sha256)",
    f"""CREATE TABLE instances (
        id TEXT PRIMARY KEY, provider TEXT NOT NULL DEFAULT 'vast', label TEXT, run_id TEXT,
        gpu_name TEXT, num_gpus INTEGER, dph_total REAL, storage_cost REAL,
        actual_status TEXT, intended_status TEXT, cur_state TEXT, status_msg TEXT,
        ssh_host TEXT, ssh_port INTEGER, gpu_util REAL, start_date REAL,
        last_seen_at TEXT, destroyed_at TEXT, data TEXT,
        created_at TEXT NOT NULL DEFAULT {TS_SQL}, updated_at TEXT)""",
    f"""CREATE TABLE cost_samples (
        id INTEGER PRIMARY KEY, instance_id TEXT, run_id TEXT, ts TEXT NOT NULL DEFAULT {TS_SQL},
        dph_total REAL, storage_cost REAL, running_s REAL,
        compute_usd REAL, storage_usd REAL, total_usd REAL)""",
    "CREATE INDEX cost_samples_instance ON cost_samples(instance_id, ts)",
    f"""CREATE TABLE budgets (
        name TEXT PRIMARY KEY, cap_usd REAL, warn_usd REAL, poll_interval_s REAL,
        spent_usd REAL NOT NULL DEFAULT 0, source TEXT,
        created_at TEXT NOT NULL DEFAULT {TS_SQL}, updated_at TEXT)""",
    f"""CREATE TABLE adapter_runs (
        id TEXT PRIMARY KEY, name TEXT, status TEXT NOT NULL DEFAULT 'planned',
        hosts TEXT, model TEXT, data TEXT, config TEXT, world_size INTEGER,
        iteration INTEGER, heartbeat_at TEXT, adapter_path TEXT, error TEXT,
        started_at TEXT, finished_at TEXT,
        created_at TEXT NOT NULL DEFAULT {TS_SQL}, updated_at TEXT)""",
    f"""CREATE TABLE adapter_metrics (
        id INTEGER PRIMARY KEY, adapter_run_id TEXT NOT NULL, rank INTEGER NOT NULL DEFAULT 0,
        iteration INTEGER NOT NULL DEFAULT -1, name TEXT NOT NULL, value REAL,
        ts TEXT NOT NULL DEFAULT {TS_SQL},
        UNIQUE(adapter_run_id, rank, iteration, name))""",
    f"""CREATE TABLE proposals (
        id INTEGER PRIMARY KEY, feat_id TEXT NOT NULL, run_id TEXT, proposer TEXT,
        proposal TEXT, created_at TEXT NOT NULL DEFAULT {TS_SQL})""",
    "CREATE INDEX proposals_run ON proposals(run_id, feat_id)",
    f"""CREATE TABLE gate_decisions (
        id INTEGER PRIMARY KEY, feat_id TEXT NOT NULL, run_id TEXT, proposal_id INTEGER,
        partition TEXT, accepted INTEGER NOT NULL, rules TEXT NOT NULL DEFAULT '[]',
        edit_distance INTEGER, policy_hash TEXT, witness TEXT,
        asr_text TEXT, proposal TEXT, reference_text TEXT,
        created_at TEXT NOT NULL DEFAULT {TS_SQL})""",
    "CREATE INDEX gate_decisions_run ON gate_decisions(run_id, feat_id)",
    "CREATE INDEX gate_decisions_partition ON gate_decisions(partition, accepted)",
    f"""CREATE TABLE reviews (
        id INTEGER PRIMARY KEY, decision_id INTEGER NOT NULL,
        verdict TEXT NOT NULL CHECK (verdict IN ('agree', 'override')),
        note TEXT, reviewer TEXT, created_at TEXT NOT NULL DEFAULT {TS_SQL})""",
    "CREATE INDEX reviews_decision ON reviews(decision_id)",
    f"""CREATE TABLE promotions (
        id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, path TEXT, record_sha256 TEXT,
        created_at TEXT NOT NULL DEFAULT {TS_SQL})""",
]

# Thunder Train (backend/thunder): where a run lives on the hosts and the controller, its
# launcher, per-rank tail offsets of the metrics files, failure kind and the AGP eval result.
_THUNDER_ADAPTER_RUNS = [
    "ALTER TABLE adapter_runs ADD COLUMN run_dir TEXT",
    "ALTER TABLE adapter_runs ADD COLUMN local_dir TEXT",
    "ALTER TABLE adapter_runs ADD COLUMN launcher_pid INTEGER",
    "ALTER TABLE adapter_runs ADD COLUMN attempt INTEGER NOT NULL DEFAULT 0",
    "ALTER TABLE adapter_runs ADD COLUMN offsets TEXT NOT NULL DEFAULT '{}'",
    "ALTER TABLE adapter_runs ADD COLUMN error_kind TEXT",
    "ALTER TABLE adapter_runs ADD COLUMN agp_eval TEXT",
    "CREATE INDEX adapter_runs_status ON adapter_runs(status)",
    "CREATE INDEX adapter_metrics_run ON adapter_metrics(adapter_run_id, name, rank, iteration)",
]

# AGP rule `acoustic` (agp/gate.py): each decision's acoustic score and the margin it was held
# to, and how applying the proposal would change the row's edits against the reference
# (NULL when the reference was not known): the Gate pane's "accepted but worse" filter.
_GATE_ACOUSTIC = [
    "ALTER TABLE gate_decisions ADD COLUMN acoustic_delta REAL",
    "ALTER TABLE gate_decisions ADD COLUMN acoustic_margin REAL",
    "ALTER TABLE gate_decisions ADD COLUMN ref_edit_change INTEGER",
]

# Sanity runs (backend/matrix_run.py): a flag of their own instead of a "#sanity" suffix on
# their run and matrix ids; rows recorded the old way are converted (state/execution.py names
# a sanity run's row).
_RUN_SANITY = [
    "ALTER TABLE runs ADD COLUMN sanity INTEGER NOT NULL DEFAULT 0",
    "UPDATE runs SET sanity = 1, matrix_id = substr(matrix_id, 1, length(matrix_id) - 7) "
    "WHERE substr(matrix_id, -7) = '#sanity'",
    *(f"UPDATE {table} SET {col} = '_sanity/' || substr({col}, 1, length({col}) - 7) "
      f"WHERE substr({col}, -7) = '#sanity'"
      for table, col in (("runs", "id"), ("metrics", "run_id"), ("events", "run_id"), ("artifacts", "run_id"))),
]

# The AGP lane's result per run and proposer (state/agp_results.py): the evaluation of its gate
# decisions against the references, overall and per partition, for the tables.
_AGP_RESULTS = [
    f"""CREATE TABLE agp_results (
        id INTEGER PRIMARY KEY, run_id TEXT NOT NULL, proposer TEXT NOT NULL, partition TEXT NOT NULL,
        rows INTEGER NOT NULL, reference_chars INTEGER, proposed INTEGER, accepted INTEGER,
        improved INTEGER, neutral INTEGER, worse INTEGER,
        cer_before REAL, cer_ungated REAL, cer_gated REAL, delta_cer REAL, delta_ci_low REAL, delta_ci_high REAL,
        policy_hash TEXT, partition_source TEXT, created_at TEXT NOT NULL DEFAULT {TS_SQL},
        UNIQUE(run_id, proposer, partition))""",
]

# (version, name, statements). Append; never edit a migration that has shipped.
MIGRATIONS: list[tuple[int, str, list[str]]] = [
    (1, "initial schema", _V1),
    (2, "thunder adapter runs", _THUNDER_ADAPTER_RUNS),
    (3, "gate decisions: acoustic evidence", _GATE_ACOUSTIC),
    (4, "runs: sanity flag", _RUN_SANITY),
    (5, "agp lane results per run", _AGP_RESULTS),
]
SCHEMA_VERSION = MIGRATIONS[-1][0]


def _migrate(conn: sqlite3.Connection, path: str) -> None:
    conn.execute("BEGIN IMMEDIATE")
    try:
        current = _check_version(conn, path)
        for version, name, statements in MIGRATIONS:
            if version <= current:
                continue
            for sql in statements:
                conn.execute(sql)
            conn.execute("INSERT INTO schema_migrations(version, name) VALUES (?, ?)", (version, name))
            conn.execute(f"PRAGMA user_version = {int(version)}")
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


def _opening_error(path: str, e: BaseException, read_only: bool) -> StoreError:
    """One line naming the file for whatever opening ``path`` ran into."""
    text = str(e)
    if isinstance(e, sqlite3.DatabaseError) and ("not a database" in text or "malformed" in text):
        return StoreError(f"{path}: not a readable state store (corrupt, or not an SQLite file): {text}")
    unwritable = Path(path).exists() and not (os.access(path, os.W_OK) and os.access(Path(path).parent, os.W_OK))
    if unwritable or "readonly" in text or "read-only" in text or \
            (isinstance(e, OSError) and e.errno in (errno.EROFS, errno.EACCES)):
        return StoreReadOnly(f"{path}: cannot be written ({text}); commands that only read (runs list, matrix plan, "
                          "the console's views) open it read-only" + ("" if read_only else "; this one writes"))
    if isinstance(e, OSError):
        return StoreError(f"{getattr(e, 'filename', None) or path}: {e.strerror or e}")
    return StoreError(f"{path}: cannot open the state store: {text}")


def _check_path(path: str) -> None:
    if path != ":memory:" and Path(path).is_dir():
        raise StoreError(f"{path}: is a directory, not a state store file (--db names the file, e.g. state.db)")


def open_db(path: str | Path = "state.db", timeout: float = BUSY_TIMEOUT_S,
            read_only: bool = False) -> sqlite_utils.Database:
    """Open (creating and migrating when needed) the state store at ``path``. ``read_only``:
    for commands that only read: the file must exist, is never written (a backup on a
    read-only disk can be browsed) and must already have this code's schema. Every failure
    (corrupt file, newer schema, read-only file or disk, a directory) is a StoreError of one
    line naming the file."""
    path = str(path)
    _check_path(path)
    if read_only:
        return _open_read_only(path, timeout)
    conn = None
    try:
        if path != ":memory:":
            Path(path).parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(path, timeout=timeout, isolation_level=None, check_same_thread=False)
        conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        _check_version(conn, path)
        mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if path != ":memory:" and mode.lower() != "wal":
            raise StoreError(f"{path}: could not switch to WAL journal mode (got {mode!r})")
        conn.execute("PRAGMA synchronous = NORMAL")  # safe with WAL; commits are not fsync'd twice
        conn.execute("PRAGMA foreign_keys = ON")
        _migrate(conn, path)
    except StoreError:
        if conn is not None:
            conn.close()
        raise
    except (sqlite3.Error, OSError) as e:
        if conn is not None:
            conn.close()
        raise _opening_error(path, e, False) from None
    return sqlite_utils.Database(conn)


def _check_version(conn: sqlite3.Connection, path: str) -> int:
    current = conn.execute("PRAGMA user_version").fetchone()[0]
    if current > SCHEMA_VERSION:
        raise StoreError(f"{path}: schema version {current} is newer than this code knows "
                         f"({SCHEMA_VERSION}); update nko-ops")
    return current


def _open_read_only(path: str, timeout: float) -> sqlite_utils.Database:
    if path == ":memory:" or not Path(path).exists():
        raise StoreError(f"state store not found: {path}")
    uri = Path(path).resolve().as_uri()
    conn = None
    tries = ["?mode=ro"]
    if not os.access(Path(path).resolve().parent, os.W_OK):  # a read-only disk: nobody can change it
        tries.append("?mode=ro&immutable=1")  # (immutable: no -shm file needed, no changes seen)
    for extra in tries:
        try:
            conn = sqlite3.connect(uri + extra, uri=True, timeout=timeout, isolation_level=None,
                                   check_same_thread=False)
            conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
            current = _check_version(conn, path)
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            break
        except StoreError:
            conn.close()
            raise
        except sqlite3.DatabaseError as e:
            conn.close() if conn is not None else None
            conn = None
            if "not a database" in str(e) or "malformed" in str(e) or extra == tries[-1]:
                raise _opening_error(path, e, True) from None
    if current == 0:
        conn.close()
        raise StoreError(f"{path}: not an nko-ops state store (an empty or foreign SQLite file: no schema)")
    if current < SCHEMA_VERSION:
        conn.close()
        if os.access(path, os.W_OK) and os.access(Path(path).resolve().parent, os.W_OK):
            open_db(path, timeout).close()  # migrate it once, then read
            return _open_read_only(path, timeout)
        raise StoreError(f"{path}: schema version {current} is older than this code's ({SCHEMA_VERSION}) and the "
                         "file cannot be written to bring it up to date; copy it somewhere writable")
    return sqlite_utils.Database(conn)


def db_path(db: sqlite_utils.Database) -> str:
    """The file behind an open store ('' for an in-memory one)."""
    return db.execute("PRAGMA database_list").fetchone()[2] or ""


def schema_version(db: sqlite_utils.Database) -> int:
    return db.execute("PRAGMA user_version").fetchone()[0]


@contextlib.contextmanager
def transaction(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """A short write transaction that takes the write lock up front (``BEGIN IMMEDIATE``)."""
    conn = db.conn
    if conn.in_transaction:  # nested: join the outer transaction
        yield db
        return
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield db
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise
    else:
        conn.execute("COMMIT")


def _json(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False, sort_keys=True)


# --------------------------------------------------------------------------- events

_EVENT_COLS = ("ts", "source", "run_id", "instance_id", "adapter_run_id", "kind", "level", "message", "data")


def add_events(db: sqlite_utils.Database, events: Iterable[dict]) -> int:
    """Insert many events in one transaction; returns how many. Keys: ``message`` and any of
    ts, source, run_id, instance_id, adapter_run_id, kind, level, data (dict or JSON)."""
    rows = []
    stamp = now()
    for e in events:
        unknown = set(e) - set(_EVENT_COLS)
        if unknown:
            raise StoreError(f"event has unknown field(s) {sorted(unknown)}")
        rows.append((e.get("ts") or stamp, e.get("source"), e.get("run_id"), e.get("instance_id"),
                     e.get("adapter_run_id"), e.get("kind") or "log", e.get("level") or "info",
                     e.get("message"), _json(e.get("data"))))
    if not rows:
        return 0
    with transaction(db):
        db.conn.executemany(f"INSERT INTO events({', '.join(_EVENT_COLS)}) VALUES (?,?,?,?,?,?,?,?,?)", rows)
    return len(rows)


def add_event(db: sqlite_utils.Database, message: str, **fields: Any) -> None:
    add_events(db, [{"message": message, **fields}])


# --------------------------------------------------------------------------- runs

def upsert_run(db: sqlite_utils.Database, run_id: str, **fields: Any) -> None:
    """Create the run row if absent, then set ``fields`` (JSON-encoding dict/list values)."""
    if "status" in fields and fields["status"] not in RUN_STATUSES:
        raise StoreError(f"run {run_id}: unknown status {fields['status']!r} (one of {', '.join(RUN_STATUSES)})")
    values = {k: (_json(v) if isinstance(v, (dict, list)) else v) for k, v in fields.items()}
    values["updated_at"] = now()
    cols = ", ".join(f"{k} = ?" for k in values)
    with transaction(db):
        db.conn.execute("INSERT OR IGNORE INTO runs(id) VALUES (?)", (run_id,))
        db.conn.execute(f"UPDATE runs SET {cols} WHERE id = ?", (*values.values(), run_id))


def get_run(db: sqlite_utils.Database, run_id: str) -> dict | None:
    rows = list(db.query("SELECT * FROM runs WHERE id = ?", [run_id]))
    return rows[0] if rows else None


def run(db: sqlite_utils.Database, run_id: str) -> Run | None:
    """The run as a typed record (None when there is no such run)."""
    row = get_run(db, run_id)
    return Run.from_row(row) if row else None


def set_run_status(db: sqlite_utils.Database, run_id: str, status: str, message: str = "",
                   source: str = "executor", **fields: Any) -> None:
    """Change a run's status and record the change as an event, atomically."""
    with transaction(db):
        old = get_run(db, run_id)
        upsert_run(db, run_id, status=status, **fields)
        before = old["status"] if old else None
        text = f"{before or 'new'} -> {status}" + (f": {message}" if message else "")
        add_events(db, [{"run_id": run_id, "kind": "status", "source": source, "message": text,
                         "level": "error" if status == "failed" else "info",
                         "data": {"from": before, "to": status}}])


def heartbeat(db: sqlite_utils.Database, run_id: str, **fields: Any) -> None:
    upsert_run(db, run_id, heartbeat_at=now(), **fields)


# --------------------------------------------------------------------------- metrics

_METRIC_KEYS = ("kind", "epoch", "step", "time")


def metric_rows(run_id: str, line: dict) -> list[tuple]:
    """Long-format rows from one metrics.jsonl record: every numeric field other than the
    record's kind/epoch/step/time becomes (run_id, kind, epoch, step, name, value, ts)."""
    kind = str(line.get("kind") or "step")
    epoch = line.get("epoch")
    step = line.get("step")
    t = line.get("time")
    ts = (datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
          if isinstance(t, (int, float)) and not isinstance(t, bool) else now())
    rows = []
    for name, value in line.items():
        if name in _METRIC_KEYS or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        rows.append((run_id, kind, int(epoch) if isinstance(epoch, (int, float)) else -1,
                     int(step) if isinstance(step, (int, float)) else -1, name, float(value), ts))
    return rows


def add_metrics(db: sqlite_utils.Database, run_id: str, lines: Iterable[dict], **run_fields: Any) -> int:
    """Upsert the metrics of many metrics.jsonl records in one transaction (optionally also
    updating the run row, e.g. its tail offset, in the same transaction)."""
    rows = [r for line in lines for r in metric_rows(run_id, line)]
    with transaction(db):
        if rows:
            db.conn.executemany(
                "INSERT INTO metrics(run_id, kind, epoch, step, name, value, ts) VALUES (?,?,?,?,?,?,?) "
                "ON CONFLICT(run_id, kind, epoch, step, name) DO UPDATE SET value = excluded.value, ts = excluded.ts",
                rows)
        if run_fields:
            upsert_run(db, run_id, **run_fields)
    return len(rows)


def curve(db: sqlite_utils.Database, run_id: str, name: str, kind: str = "epoch") -> list[tuple[int, float]]:
    """(epoch or step, value) points of one metric, in order."""
    axis = "epoch" if kind == "epoch" else "step"
    return [(r[axis], r["value"]) for r in db.query(
        f"SELECT {axis}, value FROM metrics WHERE run_id = ? AND name = ? AND kind = ? ORDER BY {axis}",
        [run_id, name, kind])]


# --------------------------------------------------------------------------- artifacts

def record_artifacts(db: sqlite_utils.Database, run_id: str, files: Iterable[dict], owner_kind: str = "run",
                     sync_state: str = "local") -> None:
    """Register (or refresh) artifacts: dicts with name, path, sha256, size and optional
    locations (list) / sync_state."""
    stamp = now()
    with transaction(db):
        for f in files:
            state = f.get("sync_state", sync_state)
            if state not in SYNC_STATES:
                raise StoreError(f"artifact {f.get('name')}: unknown sync state {state!r}")
            locations = f.get("locations") or ([{"kind": "local", "path": f["path"]}] if f.get("path") else [])
            db.conn.execute(
                "INSERT INTO artifacts(owner_kind, run_id, name, path, sha256, size, locations, sync_state, "
                "verified_at, updated_at) VALUES (?,?,?,?,?,?,?,?,?,?) "
                "ON CONFLICT(owner_kind, run_id, name) DO UPDATE SET path = excluded.path, "
                "sha256 = excluded.sha256, size = excluded.size, locations = excluded.locations, "
                "sync_state = excluded.sync_state, verified_at = excluded.verified_at, updated_at = excluded.updated_at",
                (owner_kind, run_id, f["name"], f.get("path"), f.get("sha256"), f.get("size"),
                 _json(locations), state, f.get("verified_at", stamp), stamp))


def artifacts(db: sqlite_utils.Database, run_id: str, owner_kind: str = "run") -> list[Artifact]:
    """A run's (or adapter run's) artifacts as typed records, by name."""
    return [Artifact.from_row(r) for r in db.query(
        "SELECT * FROM artifacts WHERE owner_kind = ? AND run_id = ? ORDER BY name", [owner_kind, run_id])]
