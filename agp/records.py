"""The AGP lane's records in the state store: proposals and gate decisions (written through
``state.agp``), the reviews still to do and the export of review verdicts for policy tuning.
Reviews themselves are stored by ``state.agp.add_review``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import sqlite_utils

from agp.gate import Decision, from_json_float
from agp.rows import write_jsonl
from models.text import row_edits
from state import agp as state_agp
from state.records import GateDecision, Proposal


def record_decisions(db: sqlite_utils.Database, run_id: str | None, proposals: Sequence[dict],
                     decisions: Sequence[Decision], references: dict[str, str]) -> list[int]:
    """Store each proposal (as submitted) and its decision, linked, in one transaction
    (``state.agp.record_decisions``). ``proposals[i]`` (``feat_id``, ``proposal``, optional
    ``proposer``) produced ``decisions[i]``. The reference is stored beside the decision for
    reviewers; the gate never read it. A decision already recorded for the same run and row
    with the same witness (so the same policy and proposal) is not stored again: its id is
    returned, and reruns keep their reviews."""
    if len(proposals) != len(decisions):
        raise ValueError(f"{len(proposals)} proposals but {len(decisions)} decisions")
    pairs = []
    for p, d in zip(proposals, decisions):
        ref = references.get(d.feat_id)
        change = row_edits(ref, d.proposal)[0] - row_edits(ref, d.asr_text)[0] if ref is not None else None
        pairs.append((Proposal(p["feat_id"], p["proposal"], run_id, p.get("proposer") or "file"),
                      GateDecision(d.feat_id, d.accepted, run_id, d.partition, tuple(d.rules), d.edit_distance,
                                   d.policy_hash, d.witness, d.asr_text, d.proposal, ref,
                                   from_json_float(d.acoustic_delta), from_json_float(d.acoustic_margin), change)))
    return state_agp.record_decisions(db, pairs)


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
