"""The run lifecycle as executors write it: matrices and their identities, a run's status
changes (planned, queued, running with its pid or instance, interrupted, failed), its
heartbeat, tail offsets and flags, and what executors read back (stale local runs, synced
artifacts, a completed run's prediction file)."""

from __future__ import annotations

import json
from typing import Any

from state import store
from state.data import record_snapshot, record_split
from state.records import RunStatus, SyncState

SANITY_PREFIX = "_sanity/"

__all__ = ["RunStatus", "sanity_run_id", "set_status", "update_run", "run_flags", "local_active_runs",
           "matrix_identities", "register_matrix", "synced_artifacts", "db_file"]


def sanity_run_id(run_id: str) -> str:
    """The state.db id of ``run_id``'s sanity run: the run directory's name under the matrix's
    out_root (``_sanity/<run_id>``); the row also carries ``sanity = 1``."""
    return SANITY_PREFIX + run_id


def set_status(db, run_id: str, status: RunStatus, message: str = "", source: str = "executor",
               **fields: Any) -> None:
    """Change a run's status (with its other ``fields``) and record the change as an event."""
    store.set_run_status(db, run_id, RunStatus(status).value, message, source=source, **fields)


def update_run(db, run_id: str, **fields: Any) -> None:
    """Set fields of a run (heartbeat, offsets, host, instance, flags) without a status change."""
    store.upsert_run(db, run_id, **fields)


def run_flags(db, run_id: str) -> dict:
    row = store.get_run(db, run_id)
    return json.loads(row["flags"]) if row and row["flags"] else {}


def local_active_runs(db, matrix_id: str) -> list[tuple[str, int | None]]:
    """(run id, pid) of the matrix's runs (sanity runs included) a local executor recorded as
    running or queued."""
    return [(r["id"], r["pid"]) for r in db.query(
        "SELECT id, pid FROM runs WHERE status IN (?, ?) AND executor = 'local' AND matrix_id = ?",
        [RunStatus.RUNNING.value, RunStatus.QUEUED.value, matrix_id])]


def matrix_identities(db, matrix_id: str) -> dict | None:
    """The snapshot / split / recipe identities pinned for a matrix, or None if it never ran."""
    return next(iter(db.query("SELECT snapshot_sha256, split_sha256, recipe_hash FROM matrices WHERE id = ?",
                              [matrix_id])), None)


def register_matrix(db, matrix_id: str, path: str, file_sha256: str, recipe_hash: str, snapshot_sha256: str,
                    snapshot_path: str, snapshot_rows: int | None, split_sha256: str, split_path: str,
                    split_sizes: dict[str, int | None]) -> None:
    """Record a matrix with its file and identities, and its snapshot and split."""
    with store.transaction(db):
        db.conn.execute(
            "INSERT INTO matrices(id, path, sha256, snapshot_sha256, split_sha256, recipe_hash, updated_at) "
            "VALUES (?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET path = excluded.path, sha256 = excluded.sha256, "
            "updated_at = excluded.updated_at",
            (matrix_id, path, file_sha256, snapshot_sha256, split_sha256, recipe_hash,
             store.now()))
        record_snapshot(db, snapshot_sha256, snapshot_path, snapshot_rows)
        record_split(db, split_sha256, snapshot_sha256, path=split_path,
                     **{p: split_sizes.get(p) for p in ("train", "val", "test")})


def synced_artifacts(db, run_id: str) -> list[dict]:
    """name, sha256, size of the run's artifacts verified in the local store (or its mirror)."""
    return list(db.query("SELECT name, sha256, size FROM artifacts WHERE owner_kind = 'run' AND run_id = ? "
                         "AND sync_state IN (?, ?)", [run_id, SyncState.VERIFIED.value, SyncState.MIRRORED.value]))


def db_file(db) -> str:
    """The file behind a connection ('' for an in-memory store)."""
    return db.execute("PRAGMA database_list").fetchone()[2]
