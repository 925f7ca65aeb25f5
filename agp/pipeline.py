"""The lane's steps glued together: rows -> partitions -> proposals -> gate -> state.db ->
evaluation. The CLI and ``nko-ops demo`` both go through here."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from agp.evaluate import evaluate, format_table
from agp.gate import Decision, Gate, load_gate_policy
from agp.lexicon import Lexicon
from agp.partition import PartitionPolicy, load_partition_policy, partition_counts
from agp.proposers import LexiconProposer, propose_all
from agp.rows import Row, RowError, load_rows, read_jsonl, write_json, write_jsonl, write_text

PROPOSAL_FIELDS = {"feat_id": str, "proposal": str}
DECISION_FIELDS = {"feat_id": str, "accepted": bool, "rules": list, "proposal": str, "partition": str,
                   "asr_text": str, "policy_hash": str, "witness": str}


def lane_rows(rows_path: Path | str, policy_path: Path | str | None = None,
              source: str | None = None) -> tuple[list[Row], PartitionPolicy]:
    """N'Ko prediction rows with their effective partition (kept or re-partitioned)."""
    policy = load_partition_policy(policy_path, source)
    return policy.apply(load_rows(rows_path, script="nko")), policy


def load_proposals(path: Path | str, rows: Sequence[Row]) -> list[dict]:
    """Proposal lines ``{"feat_id", "proposal"}`` (optional ``proposer``) for known rows,
    one per feat_id; problems name the line and field."""
    known = {r.feat_id for r in rows}
    items = read_jsonl(path, PROPOSAL_FIELDS)
    problems, seen = [], {}
    for p in items:
        where = f"{Path(path).name}:line {p['_line']}"
        if p["feat_id"] not in known:
            problems.append(f"{where}: field 'feat_id': {p['feat_id']!r} is not in the rows")
        elif p["feat_id"] in seen:
            problems.append(f"{where}: field 'feat_id': duplicate {p['feat_id']!r} (first on line {seen[p['feat_id']]})")
        else:
            seen[p["feat_id"]] = p["_line"]
        if "proposer" in p and not isinstance(p["proposer"], str):
            problems.append(f"{where}: field 'proposer': must be a string")
        if "acoustic" in p:
            a = p["acoustic"]
            d = a.get("delta") if isinstance(a, dict) else None
            if not isinstance(a, dict) or "delta" not in a or not (
                    d is None or (isinstance(d, (int, float)) and not isinstance(d, bool))):
                problems.append(f"{where}: field 'acoustic': must be an object with 'delta' (number or null)")
    if problems:
        raise RowError(str(path), problems)
    return items


def gate_all(gate: Gate, rows: Sequence[Row], proposals: Sequence[dict]) -> list[Decision]:
    by_id = {r.feat_id: r for r in rows}
    return [gate.decide(by_id[p["feat_id"]], p["proposal"], acoustic_delta(p)) for p in proposals]


def acoustic_delta(proposal: dict) -> float | None:
    a = proposal.get("acoustic")
    return a.get("delta") if isinstance(a, dict) else None


def score_proposals(proposals: list[dict], rows: Sequence[Row], run_dir: Path | str, device: str | None = None,
                    features: Path | str | None = None) -> list[dict]:
    """Each proposal with ``acoustic`` (models/score.py: delta = per-frame CTC log-likelihood of
    the proposal minus the ASR text's under the run's best.pt), in place and returned."""
    from models.score import Scorer

    scorer = Scorer.from_run(run_dir, device=device, features=features)
    by_id = {r.feat_id: r for r in rows}
    scores = scorer.score([p["feat_id"] for p in proposals], [by_id[p["feat_id"]].asr_text for p in proposals],
                          [p["proposal"] for p in proposals])
    for p, s in zip(proposals, scores):
        p["acoustic"] = s.as_dict(scorer.model_id)
    return proposals


def load_decisions(path: Path | str) -> list[dict]:
    return read_jsonl(path, DECISION_FIELDS)


def run_lexicon_lane(predictions_jsonl: Path | str, train_references: list[str], out_dir: Path | str,
                     db_path: Path | str, run_id: str | None = None, max_distance: int = 1,
                     gate_policy: Path | str | None = None, partition_policy: Path | str | None = None,
                     partition_source: str | None = None) -> dict:
    """Offline lane on one run's N'Ko predictions: lexicon (from ``train_references`` only)
    -> lexicon proposer -> gate -> decisions into ``db_path`` -> evaluation.

    Writes lexicon.tsv, proposals.jsonl, decisions.jsonl, agp_eval.json and agp_eval.txt
    under ``out_dir`` and returns the evaluation summary (plus run_id, files, partition
    counts and lexicon size)."""
    from agp.records import record_decisions
    from backend.store import open_db

    predictions_jsonl = Path(predictions_jsonl)
    out = Path(out_dir)
    run_id = run_id or predictions_jsonl.resolve().parent.name
    rows, ppolicy = lane_rows(predictions_jsonl, partition_policy, partition_source)
    lexicon = Lexicon.from_references(train_references)
    if not len(lexicon):
        raise ValueError("the training references gave an empty lexicon")
    proposals = propose_all(LexiconProposer(lexicon, max_distance=max_distance), rows)
    gate = Gate(load_gate_policy(gate_policy), lexicon, ppolicy.identity)
    decisions = gate_all(gate, rows, proposals)

    decision_dicts = [d.as_dict() for d in decisions]
    summary = evaluate(rows, decision_dicts, key=gate.key)
    db = open_db(db_path)
    try:  # recorded first, in one transaction; the files follow, each written atomically
        record_decisions(db, run_id, proposals, decisions, {r.feat_id: r.reference_text for r in rows})
    finally:
        db.close()
    lexicon.save(out / "lexicon.tsv")
    write_jsonl(out / "proposals.jsonl", proposals)
    write_jsonl(out / "decisions.jsonl", decision_dicts)
    summary.update({"run_id": run_id, "proposer": "lexicon", "lexicon_words": len(lexicon),
                    "partition_source": ppolicy.identity, "partition_counts": partition_counts(rows),
                    "files": {name: str(out / name) for name in
                              ("lexicon.tsv", "proposals.jsonl", "decisions.jsonl", "agp_eval.json", "agp_eval.txt")}})
    write_json(out / "agp_eval.json", summary)
    write_text(out / "agp_eval.txt", format_table(summary) + "\n")
    return summary


def train_references(snapshot: Path | str, split_path: Path | str) -> list[str]:
    """The N'Ko references of the split's *train* feat_ids: what a lexicon may be built from."""
    from models.snapshot import load
    from models.split import Split

    by_id = load(Path(snapshot)).by_id()
    train = Split.load(Path(split_path)).train
    missing = [f for f in train if f not in by_id]
    if missing:
        raise ValueError(f"{len(missing)} train feat_ids of {split_path} are not in {snapshot} (e.g. {missing[0]})")
    return [by_id[f]["nko"] for f in train]


def calibrate_on_val(run_dir: Path | str, out_dir: Path | str) -> tuple[Path, dict]:
    """Decode the run's validation set (val_predictions.jsonl) and calibrate the partition
    policy on it (partition.val.toml), both under ``out_dir``; returns the policy path and a
    short record of the calibration for the lane's summary."""
    from agp.calibrate import calibrate, write
    from models.train import evaluate_run

    out = Path(out_dir)
    val_rows = out / "val_predictions.jsonl"
    evaluate_run(run_dir, val_rows, split="val")
    c = calibrate(val_rows)
    policy_path = out / "partition.val.toml"
    identity = write(c, policy_path)
    return policy_path, {"policy": str(policy_path), "identity": identity, "val_rows": str(val_rows),
                         "val_cer": c.val_cer, "warnings": c.warnings,
                         "val_shares": {p: s.share for p, s in c.slices.items()}}


def run_demo_lane(matrix_path: Path | str, split_path: Path | str, snapshot: Path | str, out_dir: Path | str,
                  db_path: Path | str, calibrate: bool = True) -> dict:
    """The lexicon lane on every completed N'Ko run of a matrix (its ``agp_dumps`` when it
    names some), each into ``out_dir/<run_id>``; returns ``{run_id: summary}``.

    With ``calibrate`` each run's rows are re-partitioned by a policy calibrated on that run's
    validation rows (``calibrate_on_val``), so no threshold was fitted on the test rows the
    lane is scored on; without it the run's own partitions are kept."""
    from backend.matrix import load_matrix

    m = load_matrix(matrix_path)
    runs = [m.run(r) for r in m.agp_dumps] if m.agp_dumps else m.selected()
    refs = train_references(snapshot, split_path)
    out = {}
    for run in runs:
        preds = m.out_dir(run) / "test_predictions.jsonl"
        if run.script != "nko" or not preds.exists():
            continue
        lane_dir = Path(out_dir) / run.run_id
        policy, calibration = calibrate_on_val(m.out_dir(run), lane_dir) if calibrate else (None, None)
        out[run.run_id] = run_lexicon_lane(preds, refs, lane_dir, db_path, run_id=run.run_id,
                                           partition_policy=policy, partition_source="policy" if policy else None)
        if calibration:
            out[run.run_id]["partition_calibration"] = calibration
            write_json(lane_dir / "agp_eval.json", out[run.run_id])
    if not out:
        raise FileNotFoundError(f"{matrix_path}: no completed N'Ko run with test_predictions.jsonl under {m.out_root}")
    return out
