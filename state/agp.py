"""The AGP lane's rows in state.db: ``proposals`` (a correction as submitted), ``gate_decisions``
(the gate's verdict on it) and ``reviews`` (a person's agree / override on a decision).

This is the one writer of the three tables. ``add_review`` is used by both the CLI
(``nko-ops agp review``) and the console's Gate pane, with one rule for notes: a note is
stored stripped of surrounding whitespace, and an empty or blank note (or reviewer) is
stored as NULL, never as ``''``; an override without a non-blank note is refused.
"""

from __future__ import annotations

import json
from typing import Sequence

import sqlite_utils

from models.errors import NkoOpsError
from state.records import GateDecision, Proposal, Review
from state.store import transaction

VERDICTS = ("agree", "override")


class ReviewError(NkoOpsError, ValueError):
    """A review that cannot be stored (unknown verdict, override without a note, no such decision)."""


def record_decisions(db: sqlite_utils.Database, pairs: Sequence[tuple[Proposal, GateDecision]]) -> list[int]:
    """Insert each proposal and its decision, linked, in one transaction; returns the decision
    ids in order. A decision already stored for the same run, row and witness (the same policy
    and proposal) is not stored again: its id is returned, so a rerun keeps its reviews."""
    ids = []
    with transaction(db):
        conn = db.conn
        for p, d in pairs:
            if p.feat_id != d.feat_id:
                raise ValueError(f"proposal for {p.feat_id!r} paired with decision for {d.feat_id!r}")
            known = conn.execute("SELECT id FROM gate_decisions WHERE run_id IS ? AND feat_id = ? AND witness = ?",
                                 (d.run_id, d.feat_id, d.witness)).fetchone()
            if known:
                ids.append(known[0])
                continue
            cur = conn.execute("INSERT INTO proposals(feat_id, run_id, proposer, proposal) VALUES (?,?,?,?)",
                               (p.feat_id, p.run_id, p.proposer or "file", p.proposal))
            cur = conn.execute(
                "INSERT INTO gate_decisions(feat_id, run_id, proposal_id, partition, accepted, rules, edit_distance, "
                "policy_hash, witness, asr_text, proposal, reference_text, acoustic_delta, acoustic_margin, "
                "ref_edit_change) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (d.feat_id, d.run_id, cur.lastrowid, d.partition, int(d.accepted), json.dumps(list(d.rules)),
                 d.edit_distance, d.policy_hash, d.witness, d.asr_text, d.proposal, d.reference_text,
                 d.acoustic_delta, d.acoustic_margin, d.ref_edit_change))
            ids.append(cur.lastrowid)
    return ids


def decision(db: sqlite_utils.Database, decision_id: int) -> GateDecision | None:
    row = next(iter(db.query("SELECT * FROM gate_decisions WHERE id = ?", [decision_id])), None)
    return GateDecision.from_row(row) if row else None


def add_review(db: sqlite_utils.Database, decision_id: int, verdict: str, note: str | None = "",
               reviewer: str | None = "") -> int:
    """Store a person's verdict on a gate decision and return the review id: ``agree`` with
    it, or ``override`` it (a non-blank note saying why is required: that note is what tunes
    the policy later). Notes and reviewers are stored stripped; blank ones as NULL."""
    if verdict not in VERDICTS:
        raise ReviewError(f"verdict must be one of {', '.join(VERDICTS)}; got {verdict!r}")
    note = (note or "").strip() or None
    if verdict == "override" and note is None:
        raise ReviewError("note: an override needs a note saying why the gate was wrong")
    with transaction(db):
        if db.conn.execute("SELECT 1 FROM gate_decisions WHERE id = ?", (decision_id,)).fetchone() is None:
            raise ReviewError(f"decision_id: no gate decision with id {decision_id}")
        cur = db.conn.execute("INSERT INTO reviews(decision_id, verdict, note, reviewer) VALUES (?,?,?,?)",
                              (decision_id, verdict, note, (reviewer or "").strip() or None))
    return int(cur.lastrowid)


def reviews(db: sqlite_utils.Database, decision_id: int | None = None) -> list[Review]:
    """Reviews (of one decision, or all), oldest first."""
    where, args = ("WHERE decision_id = ?", [decision_id]) if decision_id is not None else ("", [])
    return [Review.from_row(r) for r in db.query(f"SELECT * FROM reviews {where} ORDER BY id", args)]
