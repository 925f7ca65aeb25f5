"""The AGP lane's result per run and proposer, in state.db (table ``agp_results``).

The lane (agp/pipeline.py ``run_lane``) records, next to its gate decisions, the evaluation
of those decisions against the references: rows, proposals, accepted / improved / neutral /
worse, and CER before, ungated and gated with the paired-bootstrap 95% CI of gated − before,
overall and for each partition that has rows. A rerun of the lane replaces the run's record.
The tables (backend/tables.py) read it back with ``agp_results``.
"""

from __future__ import annotations

from dataclasses import dataclass

import sqlite_utils

from state.store import transaction

OVERALL = "overall"
_COLUMNS = ("rows", "reference_chars", "proposed", "accepted", "improved", "neutral", "worse", "cer_before",
            "cer_ungated", "cer_gated", "delta_cer", "delta_ci_low", "delta_ci_high", "policy_hash",
            "partition_source")


@dataclass(frozen=True)
class AgpResult:
    """One run × proposer × partition ("overall" for all rows) of the lane's evaluation."""

    run_id: str
    proposer: str
    partition: str
    rows: int
    reference_chars: int | None
    proposed: int | None
    accepted: int | None
    improved: int | None
    neutral: int | None
    worse: int | None
    cer_before: float | None
    cer_ungated: float | None
    cer_gated: float | None
    delta_cer: float | None
    delta_ci_low: float | None
    delta_ci_high: float | None
    policy_hash: str | None
    partition_source: str | None


def _values(group: dict, policy_hash: str | None, partition_source: str | None) -> tuple:
    ci = group.get("delta_ci95") or (None, None)
    return (group["rows"], group.get("reference_chars"), group.get("proposed"), group.get("accepted"),
            group.get("improved"), group.get("neutral"), group.get("worse"), group.get("cer_before"),
            group.get("cer_ungated"), group.get("cer_after"), group.get("delta_cer"), ci[0], ci[1], policy_hash,
            partition_source)


def record_agp_result(db: sqlite_utils.Database, run_id: str, proposer: str, summary: dict,
                      partition_source: str | None = None) -> int:
    """Store the lane's evaluation summary (agp/evaluate.py ``evaluate``: ``overall``,
    ``partitions``, ``policy_hash``) for ``run_id`` and ``proposer``, replacing an earlier
    one, in one transaction; returns the number of rows written."""
    groups = [(OVERALL, summary["overall"])] + [(p, g) for p, g in summary.get("partitions", {}).items()
                                                if g.get("rows")]
    marks = ",".join("?" * (3 + len(_COLUMNS)))
    with transaction(db):
        db.conn.execute("DELETE FROM agp_results WHERE run_id = ? AND proposer = ?", (run_id, proposer))
        for part, g in groups:
            db.conn.execute(
                f"INSERT INTO agp_results(run_id, proposer, partition, {', '.join(_COLUMNS)}) VALUES ({marks})",
                (run_id, proposer, part, *_values(g, summary.get("policy_hash"), partition_source)))
    return len(groups)


def agp_results(db: sqlite_utils.Database, run_ids: list[str] | None = None,
                partition: str | None = OVERALL) -> list[AgpResult]:
    """The recorded results (only ``partition``'s; None: every partition), ordered by run id,
    proposer and partition; only those of ``run_ids`` when given."""
    where, params = [], []
    if partition is not None:
        where.append("partition = ?")
        params.append(partition)
    if run_ids is not None:
        where.append(f"run_id IN ({','.join('?' * len(run_ids))})")
        params += list(run_ids)
    sql = (f"SELECT run_id, proposer, partition, {', '.join(_COLUMNS)} FROM agp_results"
           + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY run_id, proposer, partition")
    return [AgpResult(*row) for row in db.conn.execute(sql, params).fetchall()]
