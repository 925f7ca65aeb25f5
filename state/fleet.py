"""The rented fleet in state.db: instances (what a poll saw, what this project recorded about
each: its run, offer, remote root, trainer starts, billing, idle start), cost samples and the
budget's spend, and the artifact rows the sync and the destroy rule read and write.

An instance's ``data`` JSON holds what only this project knows about it (keys written by the
Vast lane: ``offer``, ``registered_at``, ``remote_root``, ``trainer_started_at``,
``trainer_runs``, ``billed_until``, ``rate``, ``storage_rate``, ``compute_usd``, ``storage_usd``,
``running_s``, ``gone``, ``low_util_since``)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from state import store
from state.records import SyncState

UNVERIFIED = (SyncState.REMOTE_ONLY.value, SyncState.TRANSFERRING.value)
VERIFIED = (SyncState.VERIFIED.value, SyncState.MIRRORED.value)


@dataclass
class InstanceRecord:
    """One row of ``instances``, its ``data`` JSON decoded."""

    id: str
    provider: str = "vast"
    label: str | None = None
    run_id: str | None = None
    actual_status: str | None = None
    gpu_util: float | None = None
    dph_total: float | None = None
    ssh_host: str | None = None
    ssh_port: int | None = None
    last_seen_at: str | None = None
    destroyed_at: str | None = None
    data: dict = field(default_factory=dict)

    @classmethod
    def from_row(cls, row: dict) -> "InstanceRecord":
        return cls(str(row["id"]), row["provider"], row["label"], row["run_id"], row["actual_status"],
                   row["gpu_util"], row["dph_total"], row["ssh_host"], row["ssh_port"], row["last_seen_at"],
                   row["destroyed_at"], json.loads(row["data"]) if row["data"] else {})


@dataclass
class CostSample:
    """One poll's charge of an instance: its rates then and its cumulative totals."""

    instance_id: str
    run_id: str | None
    ts: str
    dph_total: float
    storage_cost: float
    running_s: float
    compute_usd: float
    storage_usd: float

    @property
    def total_usd(self) -> float:
        return self.compute_usd + self.storage_usd


# --------------------------------------------------------------------------- instances

def instance(db, iid: str) -> InstanceRecord | None:
    row = next(iter(db.query("SELECT * FROM instances WHERE id = ?", [str(iid)])), None)
    return InstanceRecord.from_row(row) if row else None


def instance_data(db, iid: str) -> dict:
    """The instance's ``data`` JSON ({} when unknown)."""
    rec = instance(db, iid)
    return rec.data if rec else {}


def live_instances(db, provider: str = "vast") -> list[InstanceRecord]:
    """The provider's instances not recorded as destroyed or gone."""
    return [InstanceRecord.from_row(r) for r in
            db.query("SELECT * FROM instances WHERE destroyed_at IS NULL AND provider = ?", [provider])]


def register_instance(db, iid: str, label: str, run_id: str | None, data: dict, provider: str = "vast") -> None:
    """Record an instance this project created (for ``run_id``), with its data."""
    db.conn.execute(
        "INSERT INTO instances(id, provider, label, run_id, data, updated_at) VALUES (?, ?, ?, ?, ?, ?) "
        "ON CONFLICT(id) DO UPDATE SET run_id = excluded.run_id, label = excluded.label, data = excluded.data",
        (str(iid), provider, label, run_id, json.dumps(data), store.now()))


def ensure_instance(db, iid: str, provider: str = "vast") -> None:
    """An instance row (with nothing known yet) unless there is one."""
    db.conn.execute("INSERT OR IGNORE INTO instances(id, provider) VALUES (?, ?)", (str(iid), provider))


def set_instance_data(db, iid: str, data: dict, touch: bool = True) -> None:
    """Replace the instance's data JSON (``touch``: also its updated_at)."""
    if touch:
        db.conn.execute("UPDATE instances SET data = ?, updated_at = ? WHERE id = ?",
                        (json.dumps(data), store.now(), str(iid)))
    else:
        db.conn.execute("UPDATE instances SET data = ? WHERE id = ?", (json.dumps(data), str(iid)))


def update_instance(db, iid: str, values: dict[str, Any]) -> None:
    """Set columns of an instance row (what a poll saw; ``data`` given as JSON text)."""
    values = {**values, "updated_at": store.now()}
    cols = ", ".join(f"{k} = ?" for k in values)
    db.conn.execute(f"UPDATE instances SET {cols} WHERE id = ?", (*values.values(), str(iid)))


def mark_instance_gone(db, iid: str, at: str, status: str, data: dict) -> None:
    """The instance is no more (``status``: destroyed by us, or gone from the account)."""
    db.conn.execute("UPDATE instances SET destroyed_at = ?, actual_status = ?, data = ?, updated_at = ? WHERE id = ?",
                    (at, status, json.dumps(data), store.now(), str(iid)))


def mark_destroyed(db, iid: str, at: str) -> None:
    """Record that an instance was destroyed at ``at`` (kept as first recorded if it already was)."""
    db.conn.execute("UPDATE instances SET destroyed_at = ?, actual_status = 'destroyed', updated_at = ? "
                    "WHERE id = ? AND destroyed_at IS NULL", (at, store.now(), str(iid)))


def is_ours(db, iid: str) -> bool:
    """Whether this project created the instance (for a run)."""
    return db.execute("SELECT 1 FROM instances WHERE id = ? AND run_id IS NOT NULL", [str(iid)]).fetchone() is not None


def trainer_start_recorded(db, iid: str) -> bool:
    """Whether an event records a trainer started on the instance."""
    return db.execute("SELECT 1 FROM events WHERE instance_id = ? AND kind = 'remote-start' LIMIT 1",
                      [str(iid)]).fetchone() is not None


def last_heartbeat(db, iid: str) -> str | None:
    """The newest trainer heartbeat (timestamp text) of any run on the instance."""
    row = db.execute("SELECT max(heartbeat_at) FROM runs WHERE instance_id = ?", [str(iid)]).fetchone()
    return row[0] if row and row[0] else None


# --------------------------------------------------------------------------- artifacts held by instances

def unverified_on_instance(db, iid: str) -> list[str]:
    """``run_id/name`` of the artifacts state.db knows the instance holds (a location on it)
    that are not verified locally."""
    rows = db.execute(
        "SELECT a.run_id, a.name FROM artifacts a WHERE a.owner_kind = 'run' AND a.sync_state IN (?, ?) "
        "AND EXISTS (SELECT 1 FROM json_each(a.locations) l WHERE json_extract(l.value, '$.instance_id') = ?)",
        [*UNVERIFIED, str(iid)]).fetchall()
    return [f"{rid}/{name}" for rid, name in rows]


def mark_missing(db, items: list[str]) -> None:
    """The ``run_id/name`` artifacts given up (a forced destroy): missing, unless verified since."""
    with store.transaction(db):
        for item in items:
            rid, _, name = item.partition("/")
            db.conn.execute("UPDATE artifacts SET sync_state = ?, updated_at = ? WHERE owner_kind = 'run' AND "
                            "run_id = ? AND name = ? AND sync_state IN (?, ?)",
                            (SyncState.MISSING.value, store.now(), rid, name, *UNVERIFIED))


def artifact(db, run_id: str, name: str) -> dict | None:
    return next(iter(db.query("SELECT * FROM artifacts WHERE owner_kind = 'run' AND run_id = ? AND name = ?",
                              [run_id, name])), None)


def forget_unverified(db, run_id: str, name: str) -> None:
    """Drop an artifact row that was never verified (a file that vanished from the instance)."""
    with store.transaction(db):
        db.conn.execute("DELETE FROM artifacts WHERE owner_kind = 'run' AND run_id = ? AND name = ? "
                        "AND sync_state IN (?, ?)", (run_id, name, *UNVERIFIED))


# --------------------------------------------------------------------------- cost and budget

def add_cost_sample(db, s: CostSample) -> None:
    db.conn.execute(
        "INSERT INTO cost_samples(instance_id, run_id, ts, dph_total, storage_cost, running_s, compute_usd, "
        "storage_usd, total_usd) VALUES (?,?,?,?,?,?,?,?,?)",
        (s.instance_id, s.run_id, s.ts, s.dph_total, s.storage_cost, s.running_s, s.compute_usd, s.storage_usd,
         s.total_usd))


def cost_samples(db, iid: str) -> list[CostSample]:
    """The instance's cost samples, oldest first."""
    return [CostSample(r["instance_id"], r["run_id"], r["ts"], r["dph_total"], r["storage_cost"], r["running_s"],
                       r["compute_usd"], r["storage_usd"]) for r in
            db.query("SELECT * FROM cost_samples WHERE instance_id = ? ORDER BY id", [str(iid)])]


def run_spend(db, run_id: str) -> float:
    """USD charged to instances that ran ``run_id`` (latest cumulative total per instance)."""
    return sum(r[0] or 0.0 for r in db.execute(
        "SELECT c.total_usd FROM cost_samples c WHERE c.run_id = ? AND c.id = (SELECT max(id) FROM "
        "cost_samples d WHERE d.instance_id = c.instance_id)", [run_id]).fetchall())


def upsert_budget(db, name: str, cap_usd: float, warn_usd: float, poll_interval_s: float, source: str | None) -> None:
    with store.transaction(db):
        db.conn.execute(
            "INSERT INTO budgets(name, cap_usd, warn_usd, poll_interval_s, source, updated_at) "
            "VALUES (?,?,?,?,?,?) ON CONFLICT(name) DO UPDATE SET cap_usd = excluded.cap_usd, "
            "warn_usd = excluded.warn_usd, poll_interval_s = excluded.poll_interval_s, "
            "source = excluded.source, updated_at = excluded.updated_at",
            (name, cap_usd, warn_usd, poll_interval_s, source, store.now()))


def add_spend(db, name: str, usd: float) -> None:
    db.conn.execute("UPDATE budgets SET spent_usd = spent_usd + ?, updated_at = ? WHERE name = ?",
                    (usd, store.now(), name))


def spent(db, name: str) -> float:
    row = next(iter(db.query("SELECT spent_usd FROM budgets WHERE name = ?", [name])), None)
    return float(row["spent_usd"]) if row else 0.0


def budget_alert_recorded(db, kind: str, name: str) -> bool:
    """Whether a budget event of ``kind`` (budget-warn, budget-over) was recorded for ``name``."""
    return db.execute("SELECT 1 FROM events WHERE kind = ? AND json_extract(data, '$.budget') = ? LIMIT 1",
                      [kind, name]).fetchone() is not None
