"""The lane's steps glued together: rows -> partitions -> proposals -> gate -> state.db ->
evaluation. The CLI and ``nko-ops demo`` both go through here."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from agp.evaluate import evaluate, format_table
from agp.gate import Decision, Gate, GatePolicy, load_gate_policy
from agp.lexicon import Lexicon
from agp.partition import PartitionPolicy, load_partition_policy, partition_counts
from agp.proposers import LexiconProposer, propose_all
from agp.rows import read_jsonl, write_jsonl
from models.files import atomic_write_json, atomic_write_text
from models.bundle import PREDICTIONS, PredictionRow, RowError, read_predictions

PROPOSAL_FIELDS = {"feat_id": str, "proposal": str}
DECISION_FIELDS = {"feat_id": str, "accepted": bool, "rules": list, "proposal": str, "partition": str,
                   "asr_text": str, "policy_hash": str, "witness": str}


def lane_rows(rows_path: Path | str, policy_path: Path | str | None = None,
              source: str | None = None) -> tuple[list[PredictionRow], PartitionPolicy]:
    """N'Ko prediction rows with their effective partition (kept or re-partitioned)."""
    policy = load_partition_policy(policy_path, source)
    return policy.apply(read_predictions(rows_path, script="nko")), policy


def load_proposals(path: Path | str, rows: Sequence[PredictionRow]) -> list[dict]:
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


def gate_all(gate: Gate, rows: Sequence[PredictionRow], proposals: Sequence[dict]) -> list[Decision]:
    by_id = {r.feat_id: r for r in rows}
    return [gate.decide(by_id[p["feat_id"]], p["proposal"], acoustic_delta(p)) for p in proposals]


def acoustic_delta(proposal: dict) -> float | None:
    a = proposal.get("acoustic")
    return a.get("delta") if isinstance(a, dict) else None


def score_proposals(proposals: list[dict], rows: Sequence[PredictionRow], run_dir: Path | str | None, device: str | None = None,
                    features: Path | str | None = None, scorer=None) -> list[dict]:
    """Each proposal with ``acoustic`` (models/score.py: delta = per-frame CTC log-likelihood of
    the proposal minus the ASR text's under the run's best.pt), in place and returned."""
    from models.score import Scorer

    scorer = scorer or Scorer.from_run(run_dir, device=device, features=features)
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
                     gate_policy: Path | str | GatePolicy | None = None, partition_policy: Path | str | None = None,
                     partition_source: str | None = None, run_dir: Path | str | None = None) -> dict:
    """Offline lane on one run's N'Ko predictions: lexicon (from ``train_references`` only)
    -> lexicon proposer -> acoustic score (with ``run_dir``) -> gate -> decisions into
    ``db_path`` -> evaluation. See ``run_lane`` for the files written."""
    lexicon = Lexicon.from_references(train_references)
    if not len(lexicon):
        raise ValueError("the training references gave an empty lexicon")
    return run_lane(predictions_jsonl, LexiconProposer(lexicon, max_distance=max_distance), lexicon, out_dir,
                    db_path, run_id, gate_policy, partition_policy, partition_source, run_dir)


def run_lane(predictions_jsonl: Path | str, proposer, lexicon: Lexicon, out_dir: Path | str, db_path: Path | str,
             run_id: str | None = None, gate_policy: Path | str | GatePolicy | None = None,
             partition_policy: Path | str | None = None, partition_source: str | None = None,
             run_dir: Path | str | None = None, scorer=None) -> dict:
    """rows -> ``proposer`` -> acoustic scores (``run_dir``'s best.pt, or ``scorer``; without
    either the proposals carry none and rule acoustic refuses them where it applies) -> gate
    -> decisions into ``db_path`` -> evaluation.

    Writes lexicon.tsv, proposals.jsonl, decisions.jsonl, agp_eval.json, agp_eval.txt and,
    when the decisions carry acoustic margins, frontier.png under ``out_dir``; returns the
    evaluation summary (plus run_id, proposer, files, partition counts, lexicon size)."""
    from agp.records import record_decisions
    from state.agp_results import record_agp_result
    from state.store import open_db

    predictions_jsonl = Path(predictions_jsonl)
    out = Path(out_dir)
    run_id = run_id or predictions_jsonl.resolve().parent.name
    rows, ppolicy = lane_rows(predictions_jsonl, partition_policy, partition_source)
    if hasattr(proposer, "prime"):
        proposer.prime(rows)
    proposals = propose_all(proposer, rows)
    if scorer is not None or run_dir is not None:
        score_proposals(proposals, rows, run_dir, scorer=scorer)
    policy = gate_policy if isinstance(gate_policy, GatePolicy) else load_gate_policy(gate_policy)
    gate = Gate(policy, lexicon, ppolicy.identity)
    decisions = gate_all(gate, rows, proposals)

    decision_dicts = [d.as_dict() for d in decisions]
    summary = evaluate(rows, decision_dicts, key=gate.key)
    db = open_db(db_path)
    try:  # recorded first, in one transaction; the files follow, each written atomically
        record_decisions(db, run_id, proposals, decisions, {r.feat_id: r.reference_text for r in rows})
        record_agp_result(db, run_id, proposer.name, summary, ppolicy.identity)
    finally:
        db.close()
    lexicon.save(out / "lexicon.tsv")
    write_jsonl(out / "proposals.jsonl", proposals)
    write_jsonl(out / "decisions.jsonl", decision_dicts)
    names = ["lexicon.tsv", "proposals.jsonl", "decisions.jsonl", "agp_eval.json", "agp_eval.txt"]
    if "frontier" in summary:
        from agp.frontier import plot_frontier

        plot_frontier(summary, out / "frontier.png", f"{run_id} · {proposer.name}: acoustic margin frontier (test)")
        names.append("frontier.png")
    summary.update({"run_id": run_id, "proposer": proposer.name, "lexicon_words": len(lexicon),
                    "partition_source": ppolicy.identity, "partition_counts": partition_counts(rows),
                    "gate_policy": policy.as_dict(), "scored": sum(acoustic_delta(p) is not None for p in proposals),
                    "files": {name: str(out / name) for name in names}})
    if hasattr(proposer, "settings"):
        summary["proposer_settings"] = proposer.settings()
    atomic_write_json(out / "agp_eval.json", summary, sort_keys=True)
    atomic_write_text(out / "agp_eval.txt", format_table(summary) + "\n")
    return summary


def calibrate_gate(val_rows: Sequence[PredictionRow], proposals: Sequence[dict], lexicon: Lexicon | None,
                   base: GatePolicy, partition_source: str) -> tuple[GatePolicy, dict]:
    """Acoustic margins from *validation* rows and their scored proposals: gate them under
    ``base``, then per checked partition the margin with the largest validation CER gain that
    leaves the partition no worse (agp/frontier.py). Returns the policy and a report."""
    from agp.frontier import calibrate_margins

    if not base.acoustic_checked:
        raise ValueError(f"gate policy {base.path or '(given)'} has no [acoustic] table to calibrate")
    gate = Gate(base, lexicon, partition_source)
    decisions = [d.as_dict() for d in gate_all(gate, val_rows, proposals)]
    choices = calibrate_margins(val_rows, decisions, base.acoustic_checked)
    policy = base.with_margins({p: c.margin for p, c in choices.items()})
    val_gated = evaluate(val_rows, [d.as_dict() for d in gate_all(Gate(policy, lexicon, partition_source, key=gate.key),
                                                                    val_rows, proposals)])
    return policy, {"val_rows": len(val_rows), "margins": {p: c.as_dict() for p, c in choices.items()},
                    "val_overall": {k: val_gated["overall"][k] for k in ("cer_before", "cer_ungated", "cer_after",
                                                                            "accepted", "improved", "neutral", "worse")}}


def margin_comments(report: dict) -> list[str]:
    """One comment line per calibrated partition: its margin and what it did on the val rows."""
    out = []
    for p, c in report["margins"].items():
        m = c["margin"] if isinstance(c["margin"], str) else f"{c['margin']:.6f}"
        out.append(f"{p}: margin {m}: accepts {c['accepted']} of {c['candidates']} scored proposals that pass the "
                   f"text rules; val gain {c['gain_edits']} edits of {c['reference_chars']} chars "
                   f"(ΔCER {c['delta_cer'] * 100:+.2f} pp)")
    v = report["val_overall"]
    out.append(f"val rows overall: CER {v['cer_before']:.4f} before, {v['cer_ungated']:.4f} ungated, "
               f"{v['cer_after']:.4f} gated ({v['improved']} improved / {v['neutral']} neutral / {v['worse']} worse)")
    return out


def render_gate_policy(policy: GatePolicy, comments: Sequence[str] = ()) -> str:
    """A gate policy as configs/agp/gate.toml reads it (infinite margins as TOML inf)."""
    from agp.calibrate import _toml_value

    d = policy.as_dict()
    lines = [*(f"# {c}" for c in comments), f"version = {d['version']}",
             f"allowed_punctuation = {_toml_value(d['allowed_punctuation'])}",
             *(f"{k} = {_toml_value(d[k])}" for k in ("frozen", "quarantine", "lexicon_checked")),
             "", "[length_ratio]", f"min = {d['length_ratio']['min']!r}", f"max = {d['length_ratio']['max']!r}"]
    for part, b in d["budget"].items():
        lines += ["", f"[budget.{part}]", f"relative = {b['relative']!r}", f"floor = {b['floor']}"]
    if "acoustic" in d:
        lines += ["", "[acoustic]", f"checked = {_toml_value(d['acoustic']['checked'])}", "", "[acoustic.margin]"]
        lines += [f"{part} = {m if isinstance(m, str) else repr(float(m))}" for part, m in d["acoustic"]["margin"].items()]
    return "\n".join(lines) + "\n"


def write_gate_policy(policy: GatePolicy, path: Path | str, comments: Sequence[str] = ()) -> Path:
    """Write (atomically) after checking it reads back as the same policy."""
    import tomllib

    from agp.gate import parse_gate_policy

    text = render_gate_policy(policy, comments)
    back = parse_gate_policy(tomllib.loads(text), str(path))
    if back.as_dict() != policy.as_dict():
        raise ValueError(f"{path}: the written gate policy does not read back as computed")
    atomic_write_text(path, text)
    return Path(path)


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


def make_lm(train_refs: Sequence[str], symbols: Sequence[str], lm_text: Path | str | None | bool = True,
            log=print):
    """The N-best proposer's LM. ``lm_text``: a bambara-text directory, ``True`` for the default
    one (agp.nbest.default_text_dir; if it is absent the LM falls back to the training
    references, said in ``log`` and in the LM's record), or None/False for references only."""
    from agp.nbest import build_lm, default_text_dir

    if lm_text is True:
        text_dir = default_text_dir()
        if not text_dir.is_dir():
            log(f"public Bambara text not found at {text_dir}: the N-best LM uses the training references only "
                "(set NKO_OPS_BAMBARA_TEXT to its directory)")
            lm = build_lm(train_refs, symbols, None)
            lm.record["public_missing"] = str(text_dir)
            return lm
        return build_lm(train_refs, symbols, text_dir)
    return build_lm(train_refs, symbols, Path(lm_text) if lm_text else None)


@dataclass(frozen=True)
class LaneBundle:
    """A completed run's bundle handed to the lane by the backend (which finds it in state.db
    and the matrix): its id, its directory and the feature store its best.pt scores against
    (None: the one its results.json names)."""

    run_id: str
    dir: Path
    features: Path | str | None = None


def run_bundles_lane(bundles: Sequence[LaneBundle], split_path: Path | str, snapshot: Path | str,
                     out_dir: Path | str, db_path: Path | str, calibrate: bool = True,
                     gate_policy: Path | str | None = None, proposers: Sequence[str] = ("lexicon", "nbest"),
                     lm_text: Path | str | None | bool = True, log=print) -> dict:
    """The lane on each of ``bundles`` (completed N'Ko runs), each proposer into
    ``out_dir/<run_id>/<proposer>``; returns ``{run_id: {"run_id", "proposers": {name:
    summary}, "partition_calibration"}}``.

    With ``calibrate``, everything the gate uses is set on the run's *validation* rows, never
    on the test rows it is scored on: the partition policy (``calibrate_on_val``), then, per
    proposer, the acoustic margins (``calibrate_gate``: the proposer runs on the val rows,
    its proposals are scored with the run's best.pt, and the margins that maximise the val
    CER gain with no val partition worse are written to ``gate.val.toml``). Without it the
    run's own partitions and the gate policy's margins are kept. Runs without a best.pt
    (imported rows) get no acoustic scores and no N-best proposer."""
    refs = train_references(snapshot, split_path)
    shared = {"refs": refs, "lexicon": Lexicon.from_references(refs), "base": load_gate_policy(gate_policy),
              "lm": None, "lm_text": lm_text, "log": log}
    out = {}
    for bundle in bundles:
        lane_dir = Path(out_dir) / bundle.run_id
        policy, calibration = calibrate_on_val(bundle.dir, lane_dir) if calibrate else (None, None)
        summaries = _lane_proposers(bundle, lane_dir, db_path, policy, calibrate, proposers, shared)
        out[bundle.run_id] = {"run_id": bundle.run_id, "proposers": summaries, "partition_calibration": calibration}
        atomic_write_json(lane_dir / "agp_eval.json", out[bundle.run_id], sort_keys=True)
    return out


def _lane_proposers(bundle: LaneBundle, lane_dir: Path, db_path: Path | str, policy: Path | None, calibrate: bool,
                    proposers: Sequence[str], shared: dict) -> dict:
    """Each proposer on one run's test rows (gate margins calibrated on its val rows when asked)."""
    from models.score import Scorer

    source = "policy" if policy else None
    scorer = Scorer.from_run(bundle.dir, features=bundle.features) if (bundle.dir / "best.pt").exists() else None
    lexicon, base = shared["lexicon"], shared["base"]
    summaries = {}
    for name in proposers:
        if name == "lexicon":
            proposer = LexiconProposer(lexicon)
        elif name == "nbest":
            if scorer is None:
                continue
            from agp.nbest import NbestProposer

            shared["lm"] = shared["lm"] or make_lm(shared["refs"], scorer.vocab.symbols, shared["lm_text"],
                                                   shared["log"])
            proposer = NbestProposer(scorer, shared["lm"])
        else:
            raise ValueError(f"unknown proposer {name!r} (lexicon, nbest)")
        gpolicy, gate_cal = base, None
        if calibrate and scorer is not None and base.acoustic_checked:
            gpolicy, gate_cal = _calibrated_gate(bundle.run_id, name, proposer, scorer, lane_dir, policy, source,
                                                 lexicon, base)
        summary = run_lane(bundle.dir / PREDICTIONS, proposer, lexicon, lane_dir / name, db_path, bundle.run_id,
                           gpolicy, policy, source, scorer=scorer)
        if gate_cal:
            summary["gate_calibration"] = gate_cal
            atomic_write_json(lane_dir / name / "agp_eval.json", summary, sort_keys=True)
        summaries[name] = summary
    return summaries


def _calibrated_gate(run_id: str, name: str, proposer, scorer, lane_dir: Path, policy: Path | None,
                     source: str | None, lexicon: Lexicon, base: GatePolicy) -> tuple[GatePolicy, dict]:
    """The gate policy with acoustic margins calibrated on the run's val rows (gate.val.toml)."""
    val_rows, ppolicy = lane_rows(lane_dir / "val_predictions.jsonl", policy, source)
    if hasattr(proposer, "prime"):
        proposer.prime(val_rows)
    vprops = score_proposals(propose_all(proposer, val_rows), val_rows, None, scorer=scorer)
    gpolicy, gate_cal = calibrate_gate(val_rows, vprops, lexicon, base, ppolicy.identity)
    gate_cal["policy"] = str(write_gate_policy(
        gpolicy, lane_dir / name / "gate.val.toml",
        [f"AGP gate policy for {run_id} / proposer {name}: acoustic margins calibrated on "
         f"{len(val_rows)} validation rows ({lane_dir / 'val_predictions.jsonl'}), never test rows.",
         f"base: {base.path}"] + margin_comments(gate_cal)))
    return gpolicy, gate_cal
