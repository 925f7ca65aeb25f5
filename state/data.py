"""The data identities in state.db: ``snapshots`` (a corpus snapshot by its sha256) and
``splits`` (a train/val/test split of a snapshot by its sha256).

One writer for each table. A row is created the first time a hash is seen; a later writer
that knows more (the matrix knows the snapshot's path and row count, an imported bundle's
split.json knows the split's seed) fills the columns still NULL and never overwrites a
known value: an identity is a hash, so what is recorded for it does not change.
"""

from __future__ import annotations

import sqlite_utils

from state.store import transaction


def record_snapshot(db: sqlite_utils.Database, sha256: str, path: str | None = None,
                    rows: int | None = None) -> None:
    """Record a snapshot; fills its path and row count where they were not known yet."""
    with transaction(db):
        db.conn.execute(
            "INSERT INTO snapshots(sha256, path, rows) VALUES (?,?,?) ON CONFLICT(sha256) DO UPDATE SET "
            "path = coalesce(snapshots.path, excluded.path), rows = coalesce(snapshots.rows, excluded.rows)",
            (sha256, None if path is None else str(path), rows))


def record_split(db: sqlite_utils.Database, sha256: str, snapshot_sha256: str | None = None,
                 seed: int | None = None, path: str | None = None, train: int | None = None,
                 val: int | None = None, test: int | None = None) -> None:
    """Record a split of a snapshot; fills whatever of its snapshot, seed, path and sizes
    was not known yet."""
    cols = ("snapshot_sha256", "seed", "path", "train", "val", "test")
    fill = ", ".join(f"{c} = coalesce(splits.{c}, excluded.{c})" for c in cols)
    with transaction(db):
        db.conn.execute(
            f"INSERT INTO splits(sha256, {', '.join(cols)}) VALUES (?,?,?,?,?,?,?) "
            f"ON CONFLICT(sha256) DO UPDATE SET {fill}",
            (sha256, snapshot_sha256, seed, None if path is None else str(path), train, val, test))
