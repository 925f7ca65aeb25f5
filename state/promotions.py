"""Promotions in state.db: ``promotions`` rows, one per promoted run record file."""

from __future__ import annotations

import sqlite_utils

from state.store import add_event, transaction


def record_promotion(db: sqlite_utils.Database, run_id: str, path: str, record_sha256: str) -> bool:
    """Record that ``run_id`` was promoted to the record file ``path`` (with its sha256), and
    the event, once: returns False (and writes nothing) when the same promotion is recorded."""
    with transaction(db):
        if db.conn.execute("SELECT 1 FROM promotions WHERE run_id = ? AND path = ? AND record_sha256 = ?",
                           (run_id, str(path), record_sha256)).fetchone() is not None:
            return False
        db.conn.execute("INSERT INTO promotions(run_id, path, record_sha256) VALUES (?,?,?)",
                        (run_id, str(path), record_sha256))
        add_event(db, f"promoted: {path}", run_id=run_id, kind="promotion", source="promote")
    return True
