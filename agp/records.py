"""The AGP lane's records in the state store (``state.store``): proposals, gate decisions
and human review verdicts (agree / override + note), and their export for policy tuning."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import sqlite_utils

from agp.gate import Decision, from_json_float
from agp.rows import write_jsonl
from state.store import transaction
from models.errors import NkoOpsError
from models.text import row_edits

VERDICTS = ("agree", "override")


class ReviewError(NkoOpsError, ValueError):
    pass


def record_decisions(db: sqlite_utils.Database, run_id: str | None, proposals: Sequence[dict],
                     decisions: Sequence[Decision], references: dict[str, str]) -> list[int]:
    """Insert each proposal (as submitted) and its decision, linked, in one transaction.
    ``proposals[i]`` (``feat_id``, ``proposal``, optional ``proposer``) produced ``decisions[i]``.
    The reference is stored beside the decision for reviewers; the gate never read it.
    A decision already recorded for the same run and row with the same witness (so the same
    policy and proposal) is not stored again: its id is returned, and reruns keep their reviews."""
    if len(proposals) != len(decisions):
        raise ValueError(f"{len(proposals)} proposals but {len(decisions)} decisions")
    ids = []
    with transaction(db):
        conn = db.conn
        for p, d in zip(proposals, decisions):
            if p["feat_id"] != d.feat_id:
                raise ValueError(f"proposal for {p['feat_id']!r} paired with decision for {d.feat_id!r}")
            known = conn.execute("SELECT id FROM gate_decisions WHERE run_id IS ? AND feat_id = ? AND witness = ?",
                                 (run_id, d.feat_id, d.witness)).fetchone()
            if known:
                ids.append(known[0])
                continue
            cur = conn.execute("INSERT INTO proposals(feat_id, run_id, proposer, proposal) VALUES (?,?,?,?)",
                               (p["feat_id"], run_id, p.get("proposer") or "file", p["proposal"]))
            ref = references.get(d.feat_id)
            change = row_edits(ref, d.proposal)[0] - row_edits(ref, d.asr_text)[0] if ref is not None else None
            cur = conn.execute(
                "INSERT INTO gate_decisions(feat_id, run_id, proposal_id, partition, accepted, rules, edit_distance, "
                "policy_hash, witness, asr_text, proposal, reference_text, acoustic_delta, acoustic_margin, "
                "ref_edit_change) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (d.feat_id, run_id, cur.lastrowid, d.partition, int(d.accepted), json.dumps(list(d.rules)),
                 d.edit_distance, d.policy_hash, d.witness, d.asr_text, d.proposal, ref,
                 from_json_float(d.acoustic_delta), from_json_float(d.acoustic_margin), change))
            ids.append(cur.lastrowid)
    return ids


def add_review(db: sqlite_utils.Database, decision_id: int, verdict: str, note: str = "",
               reviewer: str = "") -> int:
    """Store a reviewer's verdict on a gate decision: ``agree`` with it, or ``override`` it
    (a note saying why is required)."""
    if verdict not in VERDICTS:
        raise ReviewError(f"verdict must be one of {', '.join(VERDICTS)}; got {verdict!r}")
    if verdict == "override" and not note.strip():
        raise ReviewError("an override needs a note saying why the gate was wrong")
    with transaction(db):
        found = db.conn.execute("SELECT 1 FROM gate_decisions WHERE id = ?", (decision_id,)).fetchone()
        if not found:
            raise ReviewError(f"no gate decision with id {decision_id}")
        cur = db.conn.execute("INSERT INTO reviews(decision_id, verdict, note, reviewer) VALUES (?,?,?,?)",
                              (decision_id, verdict, note, reviewer))
    return cur.lastrowid


def pending_reviews(db: sqlite_utils.Database, run_id: str | None = None, limit: int = 20) -> list[dict]:
    """Decisions nobody has reviewed yet, accepted ones first (they change text), newest first."""
    where = "WHERE r.id IS NULL" + (" AND d.run_id = ?" if run_id else "")
    params: list = [run_id] if run_id else []
    return list(db.query(
        f"SELECT d.id, d.feat_id, d.run_id, d.partition, d.accepted, d.rules, d.edit_distance, d.asr_text, "
        f"d.proposal, d.acoustic_delta, d.acoustic_margin FROM gate_decisions d LEFT JOIN reviews r ON r.decision_id = d.id {where} "
        f"ORDER BY d.accepted DESC, d.id DESC LIMIT ?", params + [limit]))


def review_records(db: sqlite_utils.Database, run_id: str | None = None) -> list[dict]:
    """Every review joined with its decision and proposal, oldest first."""
    where = "WHERE d.run_id = ?" if run_id else ""
    out = []
    for r in db.query(
            f"SELECT r.id AS review_id, r.verdict, r.note, r.reviewer, r.created_at AS reviewed_at, "
            f"d.id AS decision_id, d.feat_id, d.run_id, d.partition, d.accepted, d.rules, d.edit_distance, "
            f"d.policy_hash, d.witness, d.asr_text, d.proposal, d.reference_text, p.proposer, "
            f"p.proposal AS submitted_proposal, d.created_at AS decided_at "
            f"FROM reviews r JOIN gate_decisions d ON d.id = r.decision_id "
            f"LEFT JOIN proposals p ON p.id = d.proposal_id {where} ORDER BY r.id",
            [run_id] if run_id else []):
        r = dict(r)
        r["accepted"] = bool(r["accepted"])
        r["rules"] = json.loads(r["rules"] or "[]")
        out.append(r)
    return out


def export_reviews(db: sqlite_utils.Database, out: Path | str, run_id: str | None = None) -> int:
    """Write every review (with its decision) as JSON lines; returns how many."""
    return write_jsonl(out, review_records(db, run_id))
