"""Everything the console reads from ``state.db``: read-only queries (the console's one write,
a review verdict, goes through ``state.agp.add_review``).

Plain functions over a ``sqlite_utils.Database`` from ``state.store.open_db``; they run in
Textual thread workers, never on the UI thread. Each returns small frozen dataclasses so a
pane can compare a new result with the one on screen and skip redrawing when nothing changed.
Times are passed in (``now``, unix seconds) so tests and snapshots are deterministic.
"""

from __future__ import annotations

import contextlib
import functools
import json
import shlex
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Iterator

import sqlite_utils

from models.bundle import BUNDLE_FILES

# Worst first: a run's sync column leads with the state that needs attention.
SYNC_ORDER = ("missing", "remote-only", "transferring", "local", "verified", "mirrored")
STALE_HEARTBEAT_S = 600.0


# --------------------------------------------------------------------------- matrix

@dataclass(frozen=True)
class RunRow:
    id: str
    matrix_id: str
    script: str
    mode: str
    seed: int | None
    status: str
    epoch: int | None
    val_loss: float | None
    best_val_loss: float | None
    best_epoch: int | None
    test_cer: float | None
    artifacts: int
    sync: str


def matrix(db: sqlite_utils.Database) -> list[RunRow]:
    """All runs, grouped by matrix, with artifact counts and a sync summary."""
    marks = ",".join("?" * len(BUNDLE_FILES))
    artifacts = {run_id: (n, states) for run_id, n, states in db.execute(
        f"""SELECT run_id, sum(name IN ({marks}) AND sync_state != 'missing'), group_concat(sync_state)
            FROM artifacts WHERE owner_kind = 'run' GROUP BY run_id""", BUNDLE_FILES).fetchall()}
    out = []
    for row in db.execute("""
            SELECT id, matrix_id, script, mode, seed, status, epoch, val_loss, best_val_loss, best_epoch, test_cer
            FROM runs ORDER BY coalesce(matrix_id, ''), created_at, id""").fetchall():
        n, states = artifacts.get(row[0], (0, None))
        out.append(RunRow(row[0], row[1] or "", row[2] or "", row[3] or "", *row[4:], n, sync_summary(states)))
    return out


@functools.lru_cache(maxsize=4096)  # a handful of distinct patterns across a whole matrix
def sync_summary(states: str | None) -> str:
    """'verified' when every artifact agrees, else counts worst first: '2 remote-only, 7 verified'."""
    if not states:
        return "—"
    counts = Counter(states.split(","))
    if len(counts) == 1:
        return next(iter(counts))
    rank = {s: i for i, s in enumerate(SYNC_ORDER)}
    return ", ".join(f"{n} {s}" for s, n in sorted(counts.items(), key=lambda kv: rank.get(kv[0], -1)))


@dataclass(frozen=True)
class RunDetail:
    id: str
    status: str
    train_curve: tuple[tuple[int, float], ...]
    val_curve: tuple[tuple[int, float], ...]
    best_val_loss: float | None
    best_epoch: int | None
    test_cer: float | None
    test_cer_toneless: float | None
    out_dir: str
    error: str
    command: str


def run_detail(db: sqlite_utils.Database, run_id: str) -> RunDetail | None:
    rows = list(db.query("""
        SELECT r.*, m.path AS matrix_path,
               (SELECT p.path FROM promotions p WHERE p.run_id = r.id ORDER BY p.id DESC LIMIT 1) AS promotion
        FROM runs r LEFT JOIN matrices m ON m.id = r.matrix_id WHERE r.id = ?""", [run_id]))
    if not rows:
        return None
    r = rows[0]

    def points(name: str) -> tuple[tuple[int, float], ...]:
        return tuple((e, v) for e, v in db.execute(
            "SELECT epoch, value FROM metrics WHERE run_id = ? AND name = ? AND kind = 'epoch' "
            "AND value IS NOT NULL ORDER BY epoch", [run_id, name]).fetchall())

    return RunDetail(r["id"], r["status"], points("train_loss"), points("val_loss"),
                     r["best_val_loss"], r["best_epoch"], r["test_cer"], r["test_cer_toneless"],
                     r["out_dir"] or "", r["error"] or "", reproduction_command(r))


def reproduction_command(run: dict) -> str:
    """The shell command(s) that re-run this run, one per line.

    A promoted run has its config written next to its promotion record (backend/promote.py),
    so training it again is one command; a completed run is promoted first; a run that has
    not completed is run (or resumed) through its matrix. Completed runs also get the
    command that re-decodes their predictions byte for byte.
    """
    rid, q = run["id"], shlex.quote
    config = (run.get("config") or "").strip()
    retrain_dir = q(f"runs/reproduce/{rid}")
    if run.get("promotion"):
        cfg = Path(run["promotion"]).with_name(f"{rid}.config.json")
        lines = [f"nko-ops train --config {q(str(cfg))} --out-dir {retrain_dir}"]
    elif config and not config.startswith("{"):  # a path to the run's config file
        lines = [f"nko-ops train --config {q(config)}"]
    elif run.get("status") == "completed":
        lines = [f"nko-ops promote {q(rid)}",
                 f"nko-ops train --config {q(f'reports/promotions/{rid}.config.json')} --out-dir {retrain_dir}"]
    elif run.get("matrix_path"):
        lines = [f"nko-ops matrix run {q(run['matrix_path'])} --executor {q(run.get('executor') or 'local')} "
                 f"--only {q(rid)}"]
    else:
        return "(no config, promotion or matrix recorded for this run)"
    if run.get("status") == "completed" and run.get("out_dir"):
        lines.append(f"nko-ops evaluate --run {q(run['out_dir'])}")
    return "\n".join(lines)


# --------------------------------------------------------------------------- gate

@dataclass(frozen=True)
class GateFilter:
    partition: str | None = None  # one of PARTITIONS, or None for all
    accepted: bool | None = None  # True accepted, False rejected, None both
    unreviewed: bool = False
    worse: bool = False  # only accepted decisions whose proposal is further from the reference
    offset: int = 0
    limit: int = 500

    def where(self) -> tuple[str, list]:
        clauses, args = [], []
        if self.partition is not None:
            clauses.append("d.partition = ?")
            args.append(self.partition)
        if self.accepted is not None:
            clauses.append("d.accepted = ?")
            args.append(1 if self.accepted else 0)
        if self.unreviewed:
            clauses.append("NOT EXISTS (SELECT 1 FROM reviews v WHERE v.decision_id = d.id)")
        if self.worse:
            clauses.append("d.accepted = 1 AND d.ref_edit_change > 0")
        return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


@dataclass(frozen=True)
class DecisionRow:
    id: int
    feat_id: str
    run_id: str
    partition: str
    accepted: bool
    rules: tuple[str, ...]
    edit_distance: int | None
    asr_text: str
    proposal: str
    reference_text: str
    policy_hash: str
    witness: str
    verdict: str  # latest review verdict, '' when none
    note: str
    acoustic_delta: float | None = None  # the proposal's acoustic score (agp rule acoustic)
    acoustic_margin: float | None = None  # the margin of the row's partition, None when not checked
    ref_edit_change: int | None = None  # edits(ref, proposal) - edits(ref, ASR); None without a reference


@dataclass(frozen=True)
class GatePage:
    filter: GateFilter
    total: int  # decisions matching the filter
    rows: tuple[DecisionRow, ...] = field(default_factory=tuple)


def _rules(text: str | None) -> tuple[str, ...]:
    try:
        value = json.loads(text or "[]")
    except json.JSONDecodeError:
        return (str(text),)
    return tuple(str(x) for x in value) if isinstance(value, list) else (str(value),)


def gate_decisions(db: sqlite_utils.Database, flt: GateFilter = GateFilter()) -> GatePage:
    """One page of decisions (newest first) matching ``flt``, with each one's latest review."""
    where, args = flt.where()
    total = db.execute(f"SELECT count(*) FROM gate_decisions d{where}", args).fetchone()[0]
    sql = f"""
        SELECT d.id, d.feat_id, d.run_id, d.partition, d.accepted, d.rules, d.edit_distance,
               d.asr_text, d.proposal, d.reference_text, d.policy_hash, d.witness,
               v.verdict, v.note, d.acoustic_delta, d.acoustic_margin, d.ref_edit_change
        FROM (SELECT * FROM gate_decisions d{where} ORDER BY d.id DESC LIMIT ? OFFSET ?) d
        LEFT JOIN reviews v ON v.id = (SELECT max(id) FROM reviews WHERE decision_id = d.id)
        ORDER BY d.id DESC"""
    rows = tuple(
        DecisionRow(r[0], r[1] or "", r[2] or "", r[3] or "", bool(r[4]), _rules(r[5]), r[6],
                    r[7] or "", r[8] or "", r[9] or "", r[10] or "", r[11] or "", r[12] or "", r[13] or "",
                    r[14], r[15], r[16])
        for r in db.execute(sql, [*args, flt.limit, flt.offset]).fetchall())
    return GatePage(flt, total, rows)


# --------------------------------------------------------------------------- instances, cost

@dataclass(frozen=True)
class InstanceRow:
    id: str
    label: str
    run_id: str
    gpu: str
    dph: float | None
    status: str
    uptime_s: float | None
    spend_usd: float | None
    gpu_util: float | None
    idle_s: float | None  # None when working (or unknown)


@dataclass(frozen=True)
class Budget:
    name: str
    cap_usd: float | None
    warn_usd: float | None
    spent_usd: float

    @property
    def fraction(self) -> float | None:
        return self.spent_usd / self.cap_usd if self.cap_usd else None


def _ts(text: str | None) -> float | None:
    """Unix time of a store timestamp (``2025-01-02T03:04:05.678Z``), None if absent or bad."""
    if not text:
        return None
    try:  # fromisoformat is ~10x faster than strptime; the spend curve parses thousands
        return datetime.fromisoformat(text.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def instances(db: sqlite_utils.Database, now: float) -> list[InstanceRow]:
    """Instances the store knows, live ones first.

    Spend is the instance's latest cost sample (the ledger is cumulative). Idle time is what
    the Vast lane's kill-idle measures (backend/vast/idle.py): since its GPU utilisation went
    under the configured threshold (``low_util_since``, kept at every poll) or the last trainer
    heartbeat on it, whichever is later.
    """
    sql = """
        SELECT i.id, i.label, i.run_id, i.gpu_name, i.num_gpus, i.dph_total, i.actual_status,
               i.cur_state, i.destroyed_at, i.start_date, i.gpu_util,
               CASE WHEN json_valid(i.data) THEN json_extract(i.data, '$.low_util_since') END AS low_since,
               (SELECT c.total_usd FROM cost_samples c WHERE c.instance_id = i.id
                  ORDER BY c.ts DESC, c.id DESC LIMIT 1) AS spend,
               (SELECT r.heartbeat_at FROM runs r WHERE r.id = i.run_id) AS heartbeat
        FROM instances i
        ORDER BY (i.destroyed_at IS NOT NULL), i.created_at, i.id"""
    beats = dict(db.execute("SELECT instance_id, max(heartbeat_at) FROM runs "
                            "WHERE instance_id IS NOT NULL GROUP BY instance_id").fetchall())
    out = []
    for (iid, label, run_id, gpu, n_gpus, dph, actual, cur, destroyed, start, util, low_since, spend,
         beat) in db.execute(sql).fetchall():
        beat = max((b for b in (beat, beats.get(iid)) if b), default=None)
        status = "destroyed" if destroyed else (actual or cur or "?")
        live = not destroyed
        uptime = now - start if (start and live) else None
        idle = None
        if live and status == "running" and low_since is not None:
            since = max(x for x in (_ts(beat), low_since) if x is not None)
            idle = max(0.0, now - since)
        gpu_label = f"{n_gpus}× {gpu}" if gpu and n_gpus and n_gpus > 1 else (gpu or "?")
        out.append(InstanceRow(str(iid), label or "", run_id or "", gpu_label, dph, status, uptime,
                               spend, util, idle))
    return out


def budget(db: sqlite_utils.Database) -> Budget | None:
    """The budget row (the first by name when there are several) with the spend so far.

    Spend is the larger of the budget row's ledger and the sum of each instance's latest
    cost sample: both only grow, and whichever was written last is the fresher one."""
    rows = db.execute("SELECT name, cap_usd, warn_usd, spent_usd FROM budgets ORDER BY name LIMIT 1").fetchall()
    sampled = total_spend(db)
    if not rows:
        return Budget("", None, None, sampled) if sampled else None
    name, cap, warn, spent = rows[0]
    return Budget(name, cap, warn, max(spent or 0.0, sampled))


# Each instance's first and last cost sample and its latest total, with index lookups only
# (cost_samples_instance): the distinct instance ids come from a skip scan of the index (each
# step seeks the next id), so none of this reads the samples themselves.
_SPANS = """
    WITH RECURSIVE ids(iid) AS (
        SELECT min(instance_id) FROM cost_samples
        UNION ALL
        SELECT (SELECT min(instance_id) FROM cost_samples WHERE instance_id > iid) FROM ids WHERE iid IS NOT NULL),
    spans AS (
        SELECT iid,
               (SELECT min(ts) FROM cost_samples WHERE instance_id = iid AND total_usd IS NOT NULL) AS first,
               (SELECT ts FROM cost_samples WHERE instance_id = iid AND total_usd IS NOT NULL
                  ORDER BY ts DESC, id DESC LIMIT 1) AS last,
               (SELECT total_usd FROM cost_samples WHERE instance_id = iid AND total_usd IS NOT NULL
                  ORDER BY ts DESC, id DESC LIMIT 1) AS final
        FROM ids WHERE iid IS NOT NULL)"""


def total_spend(db: sqlite_utils.Database) -> float:
    """The sum of every instance's latest cumulative total."""
    return db.execute(f"{_SPANS} SELECT coalesce(sum(final), 0.0) FROM spans").fetchone()[0]


def spend_curve(db: sqlite_utils.Database, points: int = 200) -> tuple[tuple[float, float], ...]:
    """(unix time, total spend across instances) at ``points`` evenly spaced times from the
    first cost sample to the last: at each, every instance's latest cumulative total, summed.

    Only instances with samples on both sides of a time need a lookup there (one index seek
    each), so the cost grows with the points and the instances alive at once, not with the
    number of samples (one per instance per poll, for months)."""
    sql = f"""{_SPANS},
    bounds AS (SELECT min(first) AS t0, max(last) AS t1, julianday(min(first)) AS j0, julianday(max(last)) AS j1
               FROM spans WHERE first IS NOT NULL),
    times(k, t) AS (
        SELECT 0, t0 FROM bounds WHERE t0 IS NOT NULL
        UNION ALL
        SELECT k + 1, CASE WHEN k + 2 >= :n THEN t1
                           ELSE strftime('%Y-%m-%dT%H:%M:%fZ', j0 + (j1 - j0) * (k + 1) / (:n - 1)) END
        FROM times, bounds WHERE k + 1 < :n AND t1 > t0)
    SELECT t.t, sum(CASE WHEN s.last <= t.t THEN s.final ELSE
                        (SELECT c.total_usd FROM cost_samples c WHERE c.instance_id = s.iid AND c.ts <= t.t
                           AND c.total_usd IS NOT NULL ORDER BY c.ts DESC, c.id DESC LIMIT 1) END)
    FROM times t JOIN spans s ON s.first <= t.t
    GROUP BY t.k ORDER BY t.k"""
    return tuple((x, v) for ts, v in db.execute(sql, {"n": max(points, 1)}).fetchall() if (x := _ts(ts)) is not None)


# --------------------------------------------------------------------------- adapters

# Metric names as mlx-lm's TrainingCallback reports them (issue 7 stores them unchanged).
TRAIN_LOSS, VAL_LOSS, TOKENS_PER_S = "train_loss", "val_loss", "tokens_per_second"


@dataclass(frozen=True)
class AdapterRow:
    id: str
    name: str
    status: str
    hosts: str
    world_size: int | None
    iteration: int | None
    train_loss: float | None
    val_loss: float | None
    tokens_per_s: float | None
    heartbeat_age_s: float | None
    error: str


def _hosts(text: str | None) -> str:
    if not text:
        return ""
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        return text
    if isinstance(value, list):
        return ", ".join(str(h.get("host") or h.get("name") or h) if isinstance(h, dict) else str(h)
                         for h in value)
    return str(value)


def adapters(db: sqlite_utils.Database, now: float) -> list[AdapterRow]:
    def last(name: str) -> str:
        return (f"(SELECT m.value FROM adapter_metrics m WHERE m.adapter_run_id = a.id AND m.name = '{name}' "
                f"AND m.rank = 0 ORDER BY m.iteration DESC LIMIT 1)")

    sql = f"""SELECT a.id, a.name, a.status, a.hosts, a.world_size, a.iteration, a.heartbeat_at, a.error,
                     {last(TRAIN_LOSS)}, {last(VAL_LOSS)}, {last(TOKENS_PER_S)}
              FROM adapter_runs a ORDER BY a.created_at DESC, a.id"""
    out = []
    for (aid, name, status, hosts, world, it, beat, error, tl, vl, tps) in db.execute(sql).fetchall():
        b = _ts(beat)
        out.append(AdapterRow(aid, name or "", status, _hosts(hosts), world, it, tl, vl, tps,
                              (now - b) if b is not None else None, error or ""))
    return out


def adapter_curve(db: sqlite_utils.Database, adapter_run_id: str, name: str) -> tuple[tuple[int, float], ...]:
    """Rank 0's (iteration, value) points of one adapter metric."""
    return tuple(db.execute("SELECT iteration, value FROM adapter_metrics WHERE adapter_run_id = ? "
                            "AND name = ? AND rank = 0 AND value IS NOT NULL ORDER BY iteration",
                            [adapter_run_id, name]).fetchall())


# --------------------------------------------------------------------------- logs

@dataclass(frozen=True)
class LogSource:
    kind: str  # 'run' or 'instance'
    id: str
    status: str
    where: str  # 'local', 'vast 1234', 'run-x' (an instance's run)

    @property
    def key(self) -> str:
        return f"{self.kind}:{self.id}"


def log_sources(db: sqlite_utils.Database, limit: int = 300) -> list[LogSource]:
    """What the Logs pane can follow: live instances, then runs (running first, then newest first)."""
    out = [LogSource("instance", str(iid), status or "?", run_id or label or "—") for iid, label, run_id, status in
           db.execute("SELECT id, label, run_id, actual_status FROM instances WHERE destroyed_at IS NULL "
                      "ORDER BY created_at, id").fetchall()]
    for rid, status, executor, iid in db.execute(
            "SELECT id, status, executor, instance_id FROM runs "
            "ORDER BY status = 'running' DESC, created_at DESC, id LIMIT ?", [limit]).fetchall():
        out.append(LogSource("run", rid, status, f"vast {iid}" if iid else (executor or "local")))
    return out


@dataclass(frozen=True)
class LogEvent:
    id: int
    ts: str
    kind: str
    level: str
    message: str


@dataclass(frozen=True)
class TailPlan:
    """Where one source's lines come from: the events already in state.db (``history``, up
    to ``last_event_id``) and, when its run has a live Vast instance with an SSH address,
    the instance to tail ``train.log`` on (``ssh_host``/``ssh_port``)."""

    run_id: str | None
    instance_id: str | None
    status: str
    ssh_host: str | None
    ssh_port: int | None
    history: tuple[LogEvent, ...]
    last_event_id: int


def _events(db: sqlite_utils.Database, run_id: str | None, instance_id: str | None, after: int = 0,
            limit: int = 1000, newest: bool = False) -> list[LogEvent]:
    # Two indexed lookups (events_run, events_instance) rather than one OR over the table.
    parts, args = [], []
    if run_id:
        parts.append("SELECT id, ts, kind, level, message FROM events WHERE run_id = ? AND id > ?")
        args += [run_id, after]
    if instance_id:
        parts.append("SELECT id, ts, kind, level, message FROM events WHERE instance_id = ? AND id > ?")
        args += [instance_id, after]
    if not parts:
        return []
    order = "DESC" if newest else ""
    rows = db.execute(f"SELECT * FROM ({' UNION '.join(parts)}) ORDER BY id {order} LIMIT ?", [*args, limit]).fetchall()
    events = [LogEvent(i, ts or "", kind or "log", level or "info", msg or "") for i, ts, kind, level, msg in rows]
    return events[::-1] if newest else events


def tail_plan(db: sqlite_utils.Database, kind: str, source_id: str, history: int = 500) -> TailPlan:
    """Call inside one read transaction (``read_snapshot``) together with anything that reads
    the run's log offset, so the history and the offset describe the same moment."""
    run_id = instance_id = None
    status = "?"
    if kind == "run":
        run = next(iter(db.query("SELECT status, instance_id FROM runs WHERE id = ?", [source_id])), None) or {}
        run_id, instance_id, status = source_id, run.get("instance_id"), run.get("status") or "not in state.db"
    else:
        instance_id = source_id
        run = next(iter(db.query("SELECT r.id FROM runs r WHERE r.instance_id = ? "
                                 "ORDER BY r.created_at DESC, r.id DESC LIMIT 1", [source_id])), None)
        inst = next(iter(db.query("SELECT run_id FROM instances WHERE id = ?", [source_id])), None)
        run_id = (run or {}).get("id") or (inst or {}).get("run_id")
    inst = next(iter(db.query("SELECT actual_status, destroyed_at, ssh_host, ssh_port FROM instances WHERE id = ?",
                              [instance_id])), None) if instance_id else None
    if kind == "instance":
        status = "destroyed" if inst and inst["destroyed_at"] else ((inst or {}).get("actual_status") or "?")
    live = bool(inst and not inst["destroyed_at"] and inst["actual_status"] == "running"
                and inst["ssh_host"] and inst["ssh_port"] and run_id)
    last = db.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
    return TailPlan(run_id, instance_id, status, inst["ssh_host"] if live else None,
                    int(inst["ssh_port"]) if live else None,
                    tuple(_events(db, run_id, instance_id, limit=history, newest=True)), last)


def new_events(db: sqlite_utils.Database, run_id: str | None, instance_id: str | None, after: int) -> list[LogEvent]:
    return _events(db, run_id, instance_id, after=after)


@contextlib.contextmanager
def read_snapshot(db: sqlite_utils.Database) -> Iterator[sqlite_utils.Database]:
    """Several reads that see one consistent state (the connections are in autocommit mode)."""
    if db.conn.in_transaction:
        yield db
        return
    db.conn.execute("BEGIN")
    try:
        yield db
    finally:
        db.conn.execute("COMMIT")


# --------------------------------------------------------------------------- sync

@dataclass(frozen=True)
class SyncRunRow:
    run_id: str
    status: str
    instance_id: str
    files: int
    bytes: int
    sync: str  # sync_summary of its artifacts


@dataclass(frozen=True)
class ArtifactRow:
    name: str
    state: str
    size: int | None
    sha256: str
    locations: tuple[str, ...]
    verified_at: str


def sync_runs(db: sqlite_utils.Database) -> list[SyncRunRow]:
    """Runs with artifacts (or on an instance), those needing attention first."""
    out = [SyncRunRow(rid, status or "—", iid or "", n, size or 0, sync_summary(states)) for rid, n, size, states, status, iid in
           db.execute("""SELECT a.run_id, count(*), sum(a.size), group_concat(a.sync_state), r.status, r.instance_id
                         FROM artifacts a LEFT JOIN runs r ON r.id = a.run_id
                         WHERE a.owner_kind = 'run' GROUP BY a.run_id""").fetchall()]
    out += [SyncRunRow(rid, status, iid, 0, 0, "—") for rid, status, iid in db.execute(
        "SELECT id, status, instance_id FROM runs WHERE instance_id IS NOT NULL AND NOT EXISTS "
        "(SELECT 1 FROM artifacts a WHERE a.owner_kind = 'run' AND a.run_id = runs.id)").fetchall()]
    rank = {s: i for i, s in enumerate(SYNC_ORDER)}

    def worst(r: SyncRunRow) -> int:
        first = r.sync.split(",")[0].split()[-1]
        return rank.get(first, len(SYNC_ORDER))

    return sorted(out, key=lambda r: (worst(r), r.run_id))


def _locations(text: str | None) -> tuple[str, ...]:
    try:
        locs = json.loads(text or "[]")
    except json.JSONDecodeError:
        return (str(text),)
    out = []
    for loc in locs if isinstance(locs, list) else []:
        kind = loc.get("kind", "?") if isinstance(loc, dict) else str(loc)
        if kind == "instance":
            out.append(f"instance {loc.get('instance_id')}")
        elif kind == "mirror":
            out.append(f"mirror {loc.get('host', '')}".strip())
        else:
            out.append(kind)
    return tuple(out)


def run_artifacts(db: sqlite_utils.Database, run_id: str) -> list[ArtifactRow]:
    return [ArtifactRow(name, state, size, sha or "", _locations(locs), (verified or "")[:19].replace("T", " "))
            for name, state, size, sha, locs, verified in db.execute(
                "SELECT name, sync_state, size, sha256, locations, verified_at FROM artifacts "
                "WHERE owner_kind = 'run' AND run_id = ? ORDER BY name", [run_id]).fetchall()]


def last_sync(db: sqlite_utils.Database, run_id: str) -> LogEvent | None:
    row = db.execute("SELECT id, ts, kind, level, message FROM events WHERE run_id = ? AND kind = 'sync' "
                     "ORDER BY id DESC LIMIT 1", [run_id]).fetchone()
    return LogEvent(row[0], row[1] or "", row[2], row[3], row[4] or "") if row else None


# --------------------------------------------------------------------------- status bar

class EventAlerts:
    """Alerts the Vast lane raises through events: a run whose latest sync failed (until a
    sync succeeds) and an instance whose destroy failed (until it is destroyed or lost).

    Events only grow, so each refresh reads just the rows added since the last one."""

    def __init__(self) -> None:
        self.last_id = 0
        self.sync_failed: dict[str, str] = {}  # run id -> message of its failed sync
        self.destroy_failed: set[str] = set()

    def update(self, db: sqlite_utils.Database) -> None:
        top = db.execute("SELECT coalesce(max(id), 0) FROM events").fetchone()[0]
        if top < self.last_id:  # a different (or rebuilt) store: start over
            self.__init__()
        for kind, level, run_id, iid, msg in db.execute(
                "SELECT kind, level, run_id, instance_id, message FROM events WHERE id > ? AND id <= ? AND kind IN "
                "('sync', 'destroy-failed', 'instance-destroyed', 'instance-lost') ORDER BY id",
                [self.last_id, top]).fetchall():
            if kind == "sync" and run_id:
                if level == "error":
                    self.sync_failed[run_id] = msg or ""
                else:
                    self.sync_failed.pop(run_id, None)
            elif kind == "destroy-failed" and iid:
                self.destroy_failed.add(iid)
            elif iid:
                self.destroy_failed.discard(iid)
        self.last_id = top

    def alerts(self) -> list[str]:
        out = []
        if self.sync_failed:
            runs = sorted(self.sync_failed)
            out.append(f"sync failed for {len(runs)} run{'s' * (len(runs) > 1)} ({', '.join(runs[:3])}"
                       f"{', …' if len(runs) > 3 else ''})")
        if self.destroy_failed:
            ids = sorted(self.destroy_failed)
            out.append(f"destroy failed: instance{'s' * (len(ids) > 1)} {', '.join(ids[:3])} still billing")
        return out


# --------------------------------------------------------------------------- status bar

@dataclass(frozen=True)
class Status:
    budget: Budget | None
    running_instances: int
    runs_by_status: tuple[tuple[str, int], ...]
    alerts: tuple[str, ...]


def status(db: sqlite_utils.Database, now: float, events: EventAlerts | None = None) -> Status:
    b = budget(db)
    running = db.execute("SELECT count(*) FROM instances WHERE destroyed_at IS NULL "
                         "AND actual_status = 'running'").fetchone()[0]
    by_status = tuple(db.execute("SELECT status, count(*) FROM runs GROUP BY status ORDER BY status").fetchall())
    alerts = []
    if b and b.cap_usd and b.spent_usd >= b.cap_usd:
        alerts.append(f"over budget (${b.spent_usd:.2f} ≥ ${b.cap_usd:.2f})")
    elif b and b.warn_usd and b.spent_usd >= b.warn_usd:
        alerts.append(f"budget warning (${b.spent_usd:.2f} ≥ ${b.warn_usd:.2f})")
    hung = db.execute("SELECT count(*) FROM adapter_runs WHERE status = 'hung'").fetchone()[0]
    if hung:
        alerts.append(f"{hung} hung adapter run{'s' * (hung > 1)}")
    missing = db.execute("SELECT count(DISTINCT run_id) FROM artifacts WHERE sync_state = 'missing'").fetchone()[0]
    if missing:
        alerts.append(f"sync failure: {missing} run{'s' * (missing > 1)} with missing artifacts")
    if events is not None:
        events.update(db)
        alerts += events.alerts()
    failed = dict(by_status).get("failed", 0)
    if failed:
        alerts.append(f"{failed} failed run{'s' * (failed > 1)}")
    stale = sum(1 for (beat,) in db.execute("SELECT heartbeat_at FROM runs WHERE status = 'running'").fetchall()
                if (t := _ts(beat)) is not None and now - t > STALE_HEARTBEAT_S)
    if stale:
        alerts.append(f"{stale} running run{'s' * (stale > 1)} without a heartbeat for {STALE_HEARTBEAT_S / 60:.0f} min")
    return Status(b, running, by_status, tuple(alerts))
