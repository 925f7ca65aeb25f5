import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from agp.evaluate import EvalError, evaluate, format_table
from agp.gate import Gate, load_gate_policy, load_witness_key
from agp.lexicon import Lexicon
from agp.pipeline import run_lexicon_lane
from agp.records import export_reviews, pending_reviews, record_decisions
from agp_helpers import PAIRS, make_row, row_dict, sample_rows, text_only_policy, write_rows_file
from cli.root import app
from state.agp import ReviewError, add_review
from state.store import open_db

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"

ROWS = [
    make_row("A", "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", "ߌ ߦߋ ߛߊ ߖߏߟߌ ߦߋ", "boundary"),
    make_row("B", "ߦߋ ߞߊ ߞߎߟߎ", "ߦߍ ߞߊ ߞߎߟߎ", "boundary"),
    make_row("C", "ߥߊ ߌߣߊߝߐ ߡߐߜ߭ߐ", "ߥߊ ߌߣߊߝߏ ߡߐߜ߭ߐ", "uncertain"),
    make_row("D", "ߓߌߝߊߟߏ ߕߎ߲ ߦߋ", "ߓߌߝߊߟߏ ߕߎ ߦߋ", "uncertain"),
    make_row("E", "ߣߌ߲ ߗߍߢߊ߲ ߝߊ߲ ߘߐ ߦߋ ߛߐߙߐ", "ߣߌ߲ ߗߍߢߊ߲ ߝߊ߲ ߘߐ ߦߋ ߛߐߙߐ", "stable"),
    make_row("F", "ߒ ߓߍ߬ ߕߊ߯ ߟߊ߫", "ߒ ߓߍ ߕߊ߯ ߟߊ", "novelty"),
]


def dec(row, proposal, accepted, rules=()):
    return {"feat_id": row.feat_id, "accepted": accepted, "rules": list(rules), "proposal": proposal,
            "partition": row.partition, "asr_text": row.asr_text, "policy_hash": "p" * 64, "witness": "w" * 64}


DECISIONS = [
    dec(ROWS[0], "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", True),     # 1 -> 0 edits: improved
    dec(ROWS[1], "ߦߍ ߞߊ ߞߎߟߏ", True),           # 1 -> 2: worse
    dec(ROWS[2], "ߥߊ ߌߣߊߝߍ ߡߐߜ߭ߐ", True),        # 1 -> 1: neutral
    dec(ROWS[3], "ߓߌߝߊߟߏ ߕߎ߲߫߫ ߦߋ", False, ["budget"]),  # rejected: stays 1
    dec(ROWS[4], ROWS[4].asr_text, False, ["no_op"]),  # abstained
]                                                   # F: no decision


def test_eval_arithmetic_on_hand_built_cases():
    assert [r.reference_chars for r in ROWS] == [16, 10, 14, 13, 24, 13]
    s = evaluate(ROWS, DECISIONS)
    o = s["overall"]
    assert (o["rows"], o["reference_chars"], o["edits_before"], o["edits_after"]) == (6, 90, 6, 6)
    assert o["cer_before"] == pytest.approx(6 / 90) and o["delta_cer"] == pytest.approx(0.0)
    assert (o["proposed"], o["accepted"], o["improved"], o["neutral"], o["worse"]) == (5, 3, 1, 1, 1)
    assert (o["rejected"], o["no_op"], o["not_proposed"]) == (1, 1, 1)
    assert o["rejected_by_rule"] == {"budget": 1}
    # toneless: F's two missing tone marks vanish, B's ߞߎߟߏ and C's ߍ do not
    assert (o["toneless_edits_before"], o["toneless_edits_after"]) == (4, 4)
    p = s["partitions"]
    assert (p["boundary"]["reference_chars"], p["boundary"]["edits_before"], p["boundary"]["edits_after"]) == (26, 2, 2)
    assert (p["boundary"]["improved"], p["boundary"]["worse"], p["boundary"]["neutral"]) == (1, 1, 0)
    assert p["boundary"]["cer_after"] == pytest.approx(2 / 26)
    assert (p["uncertain"]["neutral"], p["uncertain"]["rejected"], p["uncertain"]["accepted"]) == (1, 1, 1)
    assert (p["stable"]["no_op"], p["stable"]["cer_before"]) == (1, 0.0)
    assert (p["novelty"]["not_proposed"], p["novelty"]["edits_after"]) == (1, 2)
    table = format_table(s)
    assert "overall" in table and "0.0667" in table and "budget 1" in table


def test_only_accepted_edits_are_applied():
    flipped = [dict(d, accepted=False, rules=["frozen"]) if d["feat_id"] == "A" else d for d in DECISIONS]
    s = evaluate(ROWS, flipped)
    assert s["overall"]["edits_after"] == 7 and s["overall"]["improved"] == 0


@pytest.mark.parametrize("mutate,message", [
    (lambda ds: ds.append(dict(ds[0], feat_id="Z")), "field 'feat_id': 'Z' is not in the rows"),
    (lambda ds: ds.append(dict(ds[0])), "field 'feat_id': duplicate 'A'"),
    (lambda ds: ds[1].update(asr_text="ߦߋ"), "field 'asr_text': differs"),
    (lambda ds: ds[2].update(partition="boundary"), "field 'partition': 'boundary' but the row is 'uncertain'"),
    (lambda ds: ds[2].update(policy_hash="q" * 64), "2 different gate policies"),
])
def test_decisions_that_do_not_belong_are_refused(mutate, message):
    ds = [dict(d) for d in DECISIONS]
    mutate(ds)
    with pytest.raises(EvalError, match=message):
        evaluate(ROWS, ds)


def test_witness_checked_with_the_install_key():
    gate = Gate(load_gate_policy(), Lexicon.from_references([r.reference_text for r in ROWS]))
    ds = [gate.decide(ROWS[0], "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", 0.0).as_dict()]
    assert evaluate(ROWS, ds, key=load_witness_key())["overall"]["improved"] == 1
    ds[0]["proposal"] = "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ߫"  # tampered after the gate
    with pytest.raises(EvalError, match="field 'witness'"):
        evaluate(ROWS, ds, key=load_witness_key())


def test_decisions_and_reviews_in_state_db(tmp_path):
    db = open_db(tmp_path / "state.db")
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    gate = Gate(load_gate_policy(), None)
    proposals = [{"feat_id": r.feat_id, "proposal": r.reference_text, "proposer": "oracle-test"} for r in ROWS]
    decisions = [gate.decide(r, p["proposal"], 0.0) for r, p in zip(ROWS, proposals)]
    ids = record_decisions(db, "run1", proposals, decisions, {r.feat_id: r.reference_text for r in ROWS})
    assert len(ids) == 6 and db["gate_decisions"].count == 6 and db["proposals"].count == 6
    stored = db["gate_decisions"].get(ids[0])
    assert stored["feat_id"] == "A" and stored["accepted"] == 1 and json.loads(stored["rules"]) == []
    assert stored["policy_hash"] == gate.policy_hash and stored["witness"] == decisions[0].witness
    assert db["proposals"].get(stored["proposal_id"])["proposer"] == "oracle-test"
    again = record_decisions(db, "run1", proposals, decisions, {r.feat_id: r.reference_text for r in ROWS})
    assert again == ids and db["gate_decisions"].count == 6  # a rerun adds nothing
    other_run = record_decisions(db, "run2", proposals[:1], decisions[:1], {})
    assert other_run[0] not in ids and db["gate_decisions"].count == 7

    rid = add_review(db, ids[0], "agree", reviewer="ana")
    add_review(db, ids[5], "override", note="tone-only repair on a novelty row is fine", reviewer="ana")
    with pytest.raises(ReviewError, match="needs a note"):
        add_review(db, ids[1], "override")
    with pytest.raises(ReviewError, match="verdict must be one of agree, override"):
        add_review(db, ids[1], "maybe")
    with pytest.raises(ReviewError, match="no gate decision with id 999"):
        add_review(db, 999, "agree")
    assert db["reviews"].count == 2 and db["reviews"].get(rid)["verdict"] == "agree"
    assert {d["id"] for d in pending_reviews(db, "run1", limit=100)} == set(ids) - {ids[0], ids[5]}

    n = export_reviews(db, tmp_path / "reviews.jsonl")
    lines = [json.loads(line) for line in (tmp_path / "reviews.jsonl").read_text(encoding="utf-8").splitlines()]
    assert n == 2 and [r["verdict"] for r in lines] == ["agree", "override"]
    assert lines[1]["note"] == "tone-only repair on a novelty row is fine" and lines[1]["feat_id"] == "F"
    assert lines[0]["reference_text"] == ROWS[0].reference_text and lines[0]["proposer"] == "oracle-test"
    assert lines[1]["rules"] == ["quarantine"] and lines[1]["accepted"] is False


def test_cli_lane_end_to_end_matches_run_lexicon_lane(tmp_path):
    run = tmp_path / "run_nko_trajectory"
    run.mkdir()
    rows = write_rows_file(run / "test_predictions.jsonl", sample_rows(24))
    train_refs = [ref for ref, _ in PAIRS] + ["ߓߊߣߌ ߦߋ"]
    (tmp_path / "train_refs.txt").write_text("\n".join(train_refs) + "\n", encoding="utf-8")
    db = tmp_path / "state.db"
    inv = lambda *a: CliRunner().invoke(app, ["agp", *map(str, a)])  # noqa: E731

    res = inv("lexicon", "--text", tmp_path / "train_refs.txt", "--out", tmp_path / "lex.tsv")
    assert res.exit_code == 0, res.output
    res = inv("propose", "--rows", rows, "--lexicon", tmp_path / "lex.tsv", "--out", tmp_path / "props.jsonl")
    assert res.exit_code == 0, res.output
    # no run here to score the proposals with: under the default policy every change on a
    # boundary or uncertain row is refused by rule acoustic; the text rules are tested with
    # the acoustic rule off (tests/unit/test_agp_acoustic.py scores with a real checkpoint)
    res = inv("gate", "--rows", rows, "--proposals", tmp_path / "props.jsonl", "--lexicon", tmp_path / "lex.tsv",
              "--out", tmp_path / "unscored.jsonl", "--no-db")
    assert res.exit_code == 0, res.output
    unscored = [json.loads(x) for x in (tmp_path / "unscored.jsonl").read_text(encoding="utf-8").splitlines()]
    assert not any(d["accepted"] and d["partition"] in ("boundary", "uncertain") for d in unscored)
    assert any("acoustic" in d["rules"] for d in unscored)
    text_only = text_only_policy(tmp_path)
    res = inv("gate", "--rows", rows, "--proposals", tmp_path / "props.jsonl", "--lexicon", tmp_path / "lex.tsv",
              "--out", tmp_path / "dec.jsonl", "--db", db, "--policy", text_only)
    assert res.exit_code == 0, res.output
    decisions = [json.loads(x) for x in (tmp_path / "dec.jsonl").read_text(encoding="utf-8").splitlines()]
    assert len(decisions) == 24 and all(set(d) >= {"feat_id", "accepted", "rules", "edit_distance", "policy_hash",
                                                   "witness"} for d in decisions)
    res = inv("eval", "--rows", rows, "--decisions", tmp_path / "dec.jsonl", "--json", tmp_path / "eval.json")
    assert res.exit_code == 0, res.output
    assert "overall" in res.output and "CER before" in res.output
    cli_summary = json.loads((tmp_path / "eval.json").read_text())

    # a refused proposal edited into an accepted one: the witness covers the verdict
    tampered = [dict(d) for d in decisions]
    i = next(i for i, d in enumerate(tampered) if not d["accepted"] and d["rules"] != ["no_op"])
    tampered[i].update(accepted=True, rules=[])
    write_rows_file(tmp_path / "tampered.jsonl", tampered)
    res = inv("eval", "--rows", rows, "--decisions", tmp_path / "tampered.jsonl")
    assert res.exit_code == 2
    assert f"tampered.jsonl:line {i + 1}: field 'witness': does not verify" in res.output
    tampered[i].update(accepted=True, rules=["budget"])  # and a verdict that contradicts its rules
    write_rows_file(tmp_path / "tampered.jsonl", tampered)
    res = inv("eval", "--rows", rows, "--decisions", tmp_path / "tampered.jsonl", "--no-verify")
    assert res.exit_code == 2 and "field 'accepted': True with rules ['budget']" in res.output

    lane = run_lexicon_lane(rows, train_refs, tmp_path / "lane", tmp_path / "lane.db", gate_policy=text_only)
    assert lane["overall"] == cli_summary["overall"] and lane["run_id"] == "run_nko_trajectory"
    assert lane["overall"]["accepted"] > 0 and lane["overall"]["rejected"] > 0
    assert open_db(tmp_path / "lane.db")["gate_decisions"].count == 24
    assert json.loads((tmp_path / "lane" / "agp_eval.json").read_text())["overall"] == lane["overall"]
    assert open_db(db)["gate_decisions"].count == 24

    res = inv("review", "--db", db, "--pending", "--limit", "3")
    assert res.exit_code == 0 and res.output.count("proposal:") == 3
    first = open_db(db)["gate_decisions"].rows_where(order_by="id", limit=1).__next__()["id"]
    res = inv("review", "--db", db, "--decision", first, "--verdict", "override")
    assert res.exit_code == 2 and "needs a note" in res.output
    res = inv("review", "--db", db, "--decision", first, "--verdict", "agree", "--reviewer", "moussa")
    assert res.exit_code == 0, res.output
    res = inv("export-reviews", "--db", db, "--out", tmp_path / "rev.jsonl")
    assert res.exit_code == 0 and "1 reviews" in res.output
    assert json.loads((tmp_path / "rev.jsonl").read_text())["reviewer"] == "moussa"


def test_cli_gate_errors_name_line_and_field(tmp_path):
    rows = write_rows_file(tmp_path / "rows.jsonl", sample_rows(4))
    props = tmp_path / "props.jsonl"
    props.write_text('{"feat_id": "bam_test_0000", "proposal": "ߦߋ"}\n{"feat_id": "nope", "proposal": "ߦߋ"}\n'
                     '{"feat_id": "bam_test_0001", "proposal": 5}\n', encoding="utf-8")
    res = CliRunner().invoke(app, ["agp", "gate", "--rows", str(rows), "--proposals", str(props), "--out",
                                   str(tmp_path / "d.jsonl"), "--no-db"])
    assert res.exit_code == 2
    assert "props.jsonl:line 3: field 'proposal': wrong type int" in res.output
    props.write_text('{"feat_id": "nope", "proposal": "ߦߋ"}\n', encoding="utf-8")
    res = CliRunner().invoke(app, ["agp", "gate", "--rows", str(rows), "--proposals", str(props), "--out",
                                   str(tmp_path / "d.jsonl"), "--no-db"])
    assert res.exit_code == 2 and "props.jsonl:line 1: field 'feat_id': 'nope' is not in the rows" in res.output
    assert not (tmp_path / "d.jsonl").exists()


def test_lane_over_handed_bundles_uses_train_references_only(tmp_path):
    import random

    from agp.corpus import PERTURBATIONS, perturb
    from agp.pipeline import LaneBundle, run_bundles_lane, train_references
    from models.snapshot import load
    from models.split import make_split

    snap = load(SAMPLE)
    split = make_split(snap.feat_ids, seed=42, snapshot_sha256=snap.sha256)
    split.save(tmp_path / "split.json")
    by_id, rng = snap.by_id(), random.Random(0)
    preds = []
    for fid in split.test[:30]:
        ref = by_id[fid]["nko"]
        asr = perturb(ref, rng.choice(PERTURBATIONS), rng) or ref
        preds.append(row_dict(fid, ref, asr, ["boundary", "uncertain"][len(preds) % 2], audio_id=fid))
    run_dir = tmp_path / "runs" / "demo-nko-trajectory"
    run_dir.mkdir(parents=True)
    write_rows_file(run_dir / "test_predictions.jsonl", preds)
    out = run_bundles_lane([LaneBundle("demo-nko-trajectory", run_dir)], tmp_path / "split.json", SAMPLE,
                           tmp_path / "agp", tmp_path / "state.db", calibrate=False,  # no checkpoint to decode val with
                           gate_policy=text_only_policy(tmp_path), proposers=("lexicon",))
    assert list(out) == ["demo-nko-trajectory"]
    assert list(out["demo-nko-trajectory"]["proposers"]) == ["lexicon"]
    s = out["demo-nko-trajectory"]["proposers"]["lexicon"]
    assert s["overall"]["rows"] == 30 and s["run_id"] == "demo-nko-trajectory"
    lex = Lexicon.load(tmp_path / "agp" / "demo-nko-trajectory" / "lexicon" / "lexicon.tsv")
    refs = train_references(SAMPLE, tmp_path / "split.json")
    assert len(refs) == len(split.train) and lex.counts == Lexicon.from_references(refs).counts
    db = open_db(tmp_path / "state.db")
    assert db.execute("SELECT count(*), count(DISTINCT run_id) FROM gate_decisions").fetchone() == (30, 1)
    from state.agp_results import agp_results

    (res,) = agp_results(db)  # the lane's per-run result, recorded beside its decisions for the tables
    assert (res.run_id, res.proposer, res.partition, res.rows) == ("demo-nko-trajectory", "lexicon", "overall", 30)
    assert (res.cer_before, res.cer_gated, res.accepted) == (s["overall"]["cer_before"], s["overall"]["cer_after"],
                                                             s["overall"]["accepted"])
