"""Acoustic evidence in the AGP gate: the scorer (models/score.py) against plain CTC, the
N-best proposer's search and LM (agp/nbest.py), margin calibration and the frontier
(agp/frontier.py), and the lane end to end on a real (tiny) trained run."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from typer.testing import CliRunner

import train_helpers
from agp.frontier import calibrate_margins, frontier
from agp.nbest import CharNgram, EOS, build_lm, prefix_beam_search, public_texts
from models.bundle import read_predictions
from agp_helpers import make_row
from cli.root import app
from models.config import parse_config
from models.score import Scorer
from models.train import evaluate_run, train


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("acoustic")
    cfg = train_helpers.build(root, n=60)
    cfg["train"]["epochs"] = 8
    out = train(parse_config(cfg), echo=False)
    evaluate_run(out, root / "val_rows.jsonl", split="val")
    return {"dir": out, "root": root, "cfg": cfg}


# --------------------------------------------------------------------------- scorer


@pytest.mark.slow  # trains a tiny run (module fixture)
def test_scores_are_ctc_log_likelihoods_per_frame_and_batch_independent(run):
    rows = read_predictions(run["dir"] / "test_predictions.jsonl")
    scorer = Scorer.from_run(run["dir"], device="cpu")
    ids = [r.feat_id for r in rows]
    proposals = [r.reference_text for r in rows]
    batched = scorer.score(ids, [r.asr_text for r in rows], proposals)
    one_by_one = Scorer.from_run(run["dir"], device="cpu", max_batch_frames=1)  # a batch per utterance
    single = one_by_one.score(ids, [r.asr_text for r in rows], proposals)
    for r, s, t in zip(rows, batched, single):
        assert s.delta is not None and s.frames > 0
        assert s.delta == pytest.approx((s.logp_proposal - s.logp_asr) / s.frames)
        assert s.logp_proposal == pytest.approx(t.logp_proposal, abs=1e-3)
        # the definition: minus CTC loss (sum over alignments) of the label sequence on the posteriors
        lp = torch.from_numpy(one_by_one.posteriors([r.feat_id])[0])
        labels = torch.tensor(scorer.vocab.encode(r.reference_text))
        nll = F.ctc_loss(lp[:, None], labels[None], torch.tensor([lp.shape[0]]), torch.tensor([len(labels)]),
                         reduction="sum")
        assert s.logp_proposal == pytest.approx(-float(nll), abs=1e-3)
    same = scorer.score(ids[:3], [r.asr_text for r in rows[:3]], [r.asr_text for r in rows[:3]])
    assert all(s.delta == 0.0 for s in same)


@pytest.mark.slow  # trains a tiny run (module fixture)
def test_the_audio_prefers_the_right_text_over_a_corrupted_one(run):
    """On rows the model has learned, the reference scores above the same text with letters
    swapped: the score carries acoustic signal."""
    from models.split import Split
    from models.snapshot import load

    snap = load(run["cfg"]["snapshot"]).by_id()
    train_ids = Split.load(run["cfg"]["split"]).train[:20]
    refs = [snap[f]["nko"] for f in train_ids]
    corrupted = [ref[::-1] if ref[::-1] != ref else ref + "ߊ" for ref in refs]
    scores = Scorer.from_run(run["dir"], device="cpu").score(train_ids, refs, corrupted)
    assert sum(s.delta < 0 for s in scores) >= 18


@pytest.mark.slow  # trains a tiny run (module fixture)
def test_unscoreable_texts_have_no_score_and_say_why(run):
    row = read_predictions(run["dir"] / "test_predictions.jsonl")[0]
    scorer = Scorer.from_run(run["dir"], device="cpu")
    latin, long = scorer.score([row.feat_id] * 2, [row.asr_text] * 2, ["abc", "ߊ" * 5000])
    assert latin.delta is None and "not in the nko vocabulary" in latin.reason
    assert long.delta is None and "do not fit" in long.reason
    with pytest.raises(ValueError, match="not in feature store"):
        scorer.score(["nope"], ["ߊ"], ["ߊ"])


# --------------------------------------------------------------------------- search and LM


def _exact_ctc_prob(lp: np.ndarray, text: str, symbols) -> float:
    labels = torch.tensor([symbols.index(ch) for ch in text], dtype=torch.long)
    if not len(labels):
        return float(lp[:, 0].sum())
    nll = F.ctc_loss(torch.from_numpy(lp)[:, None], labels[None], torch.tensor([lp.shape[0]]),
                     torch.tensor([len(labels)]), reduction="sum")
    return -float(nll)


def test_prefix_beam_search_without_lm_finds_the_exact_ctc_best():
    """With no LM and a beam wide enough, every hypothesis' score is its exact CTC log
    probability, and the best one is the most probable label sequence (brute force)."""
    rng = np.random.default_rng(3)
    symbols = ["<blank>", "ߊ", "ߓ", "ߌ"]  # no space: the search keeps spaces single and inside the text
    for _ in range(5):
        lp = torch.randn(6, 4, generator=torch.Generator().manual_seed(int(rng.integers(1000)))).log_softmax(-1).numpy()
        hyps = prefix_beam_search(lp, symbols, None, alpha=0.0, beta=0.0, beam=400, prune=-1e9, nbest=400)
        for text, score in hyps[:10]:
            assert score == pytest.approx(_exact_ctc_prob(lp, text, symbols), abs=1e-4)
        best = max((t for n in range(0, 7) for t in map("".join, itertools.product("ߊߓߌ", repeat=n))),
                   key=lambda t: _exact_ctc_prob(lp, t, symbols))
        assert hyps[0][0] == best


def test_lm_steers_the_search():
    symbols = ["<blank>", "ߊ", "ߋ"]
    lp = np.log(np.array([[0.05, 0.5, 0.45]] * 1 + [[0.9, 0.05, 0.05]], dtype=np.float32))
    assert prefix_beam_search(lp, symbols, None, alpha=0, beta=0)[0][0] == "ߊ"
    lm = build_lm(["ߋ"] * 50, symbols[1:], None, order=2)
    assert prefix_beam_search(lp, symbols, lm, alpha=1.0, beta=0)[0][0] == "ߋ"


def test_char_ngram_is_a_distribution():
    lm = CharNgram(["ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", "ߦߋ ߛߊ"], ["ߌ", "ߦ", "ߋ", "ߛ", "ߊ", "߲", "ߖ", "ߏ", "ߟ", " "], order=3)
    for history in ["", "ߦ", "ߌ ߦߋ", "ߟߟߟ"]:
        total = sum(math.exp(lm.logp(history, ch)) for ch in lm.symbols)
        assert total == pytest.approx(1.0)
    assert lm.logp("ߦ", "ߋ") > lm.logp("ߦ", "ߖ") and EOS in lm.symbols


def test_public_text_is_nllb_seed_only_and_its_absence_is_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="public Bambara text not found.*--lm-text"):
        public_texts(tmp_path, ["ߊ"])
    (tmp_path / "multitext-nllb-seed.nqo_Nkoo").write_text("ߌ ߦߋ߫ ߛߊ߲\nߊ߬ ߦߋ߫ ߣߊ߬ ߸\n", encoding="utf-8")
    (tmp_path / "multitext-nllb-seed.bam_Latn").write_text("I ye san joli ye.\n", encoding="utf-8")
    (tmp_path / "flores-200-dev.nqo_Nkoo.dev").write_text("ߞߏ ߓߍ߯ ߘߌ\n", encoding="utf-8")
    from models.vocab import Vocab

    lines, record = public_texts(tmp_path, Vocab.for_script("nko").symbols)
    assert lines == ["ߌ ߦߋ߫ ߛߊ߲", "ߊ߬ ߦߋ߫ ߣߊ߬", "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ"]  # punctuation dropped, Latin transliterated
    assert set(record["files"]) == {"multitext-nllb-seed.nqo_Nkoo", "multitext-nllb-seed.bam_Latn"}


# --------------------------------------------------------------------------- calibration and frontier


def _val(fid, ref, asr, part="boundary"):
    from dataclasses import replace

    return replace(make_row(fid, ref, asr, part), split="val")


def _dec(row, proposal, delta, rules=(), margin=0.0):
    return {"feat_id": row.feat_id, "proposal": proposal, "rules": list(rules), "accepted": not rules,
            "acoustic_delta": delta, "acoustic_margin": margin, "partition": row.partition}


def test_margin_maximises_validation_gain_without_a_worse_partition():
    good = [_val(f"g{i}", "ߌ ߦߋ ߛߊ߲", "ߌ ߦߋ ߛߊ") for i in range(4)]
    bad = _val("b", "ߌ ߦߋ ߛߊ", "ߌ ߦߋ ߛߊ")
    unc = [_val("u", "ߌ ߦߋ ߛߊ", "ߌ ߦߋ ߛߊ", "uncertain")]
    rows = good + [bad] + unc
    # boundary: deltas -0.01, -0.02, -0.05 (and -0.06) fix a row; -0.03 (bad) damages one
    decisions = [_dec(good[0], "ߌ ߦߋ ߛߊ߲", -0.01, ["acoustic"]), _dec(good[1], "ߌ ߦߋ ߛߊ߲", -0.02, ["acoustic"]),
                 _dec(bad, "ߌ ߦߋ ߛߊ߫", -0.03, ["acoustic"]), _dec(good[2], "ߌ ߦߋ ߛߊ߲", -0.05, ["acoustic"]),
                 _dec(unc[0], "ߌ ߦߋ ߛߊ߫", 0.5)]  # uncertain: only a damaging proposal
    b = calibrate_margins(rows, decisions)["boundary"]
    assert (b.accepted, b.gain_edits) == (2, 2) and 0.02 < b.margin < 0.03  # 3 - 1 ties 2: the stricter margin
    decisions.append(_dec(good[3], "ߌ ߦߋ ߛߊ߲", -0.06, ["acoustic"]))
    choices = calibrate_margins(rows, decisions)
    b = choices["boundary"]
    assert (b.accepted, b.gain_edits) == (5, 3) and b.margin > 0.06  # 4 fixes - 1 damage beats 2
    assert choices["uncertain"].margin == -math.inf and choices["uncertain"].gain_edits == 0  # never worse
    decisions[3]["rules"] = decisions[5]["rules"] = ["acoustic", "budget"]  # refused by a text rule at any margin
    b = calibrate_margins(rows, decisions)["boundary"]
    assert (b.accepted, b.gain_edits) == (2, 2)
    with pytest.raises(ValueError, match="validation rows only"):
        calibrate_margins([make_row("t", "ߊ", "ߊ")], [])


def test_frontier_replays_the_gate_at_every_margin():
    rows = [_val(f"g{i}", "ߌ ߦߋ ߛߊ߲", "ߌ ߦߋ ߛߊ") for i in range(4)]
    decisions = [_dec(r, "ߌ ߦߋ ߛߊ߲", -0.01 * i, ["acoustic"] if i > 1 else [], 0.015) for i, r in enumerate(rows)]
    f = frontier(rows, decisions)
    rates = [p["accept_rate"] for p in f["points"]]
    assert rates[0] == 0 and rates[-1] == 1 and rates == sorted(rates)
    assert f["gate"]["accepted"] == 2 and f["gate"]["delta_cer"] < 0


# --------------------------------------------------------------------------- end to end


@pytest.mark.slow  # trains a tiny run (module fixture)
def test_cli_lane_with_acoustic_evidence(run, tmp_path, monkeypatch):
    """nbest proposals scored with the run's best.pt, margins calibrated on its val rows,
    the test rows gated with them, evaluated (ungated, gated, CI) with the frontier drawn."""
    inv = lambda *a: CliRunner().invoke(app, ["agp", *map(str, a)])  # noqa: E731
    d, root = run["dir"], run["root"]
    val = root / "val_rows.jsonl"
    common = ["--run", d, "--snapshot", run["cfg"]["snapshot"], "--proposer", "nbest", "--lm-text", "none",
              "--partition-source", "policy"]
    res = inv("propose", "--rows", val, "--out", tmp_path / "val_props.jsonl", *common)
    assert res.exit_code == 0 and "scored with best.pt:" in res.output, res.output
    val_props = [json.loads(x) for x in (tmp_path / "val_props.jsonl").read_text().splitlines()]
    assert all(p["acoustic"]["normalisation"] == "per_frame" for p in val_props)
    res = inv("calibrate-gate", "--rows", val, "--proposals", tmp_path / "val_props.jsonl",
              "--out", tmp_path / "gate.val.toml", "--partition-source", "policy")
    assert res.exit_code == 0, res.output
    assert "[acoustic.margin]" in (tmp_path / "gate.val.toml").read_text()
    res = inv("calibrate-gate", "--rows", d / "test_predictions.jsonl", "--proposals", tmp_path / "val_props.jsonl",
              "--out", tmp_path / "never.toml", "--partition-source", "policy")
    assert res.exit_code == 2 and not (tmp_path / "never.toml").exists()  # not on test rows

    test = d / "test_predictions.jsonl"
    res = inv("propose", "--rows", test, "--out", tmp_path / "props.jsonl", *common)
    assert res.exit_code == 0, res.output
    res = inv("gate", "--rows", test, "--proposals", tmp_path / "props.jsonl", "--policy", tmp_path / "gate.val.toml",
              "--out", tmp_path / "dec.jsonl", "--no-db", "--partition-source", "policy")
    assert res.exit_code == 0, res.output
    decisions = [json.loads(x) for x in (tmp_path / "dec.jsonl").read_text().splitlines()]
    checked = [x for x in decisions if x["partition"] in ("boundary", "uncertain")]
    assert all("acoustic_margin" in x for x in checked)
    res = inv("eval", "--rows", test, "--decisions", tmp_path / "dec.jsonl", "--json", tmp_path / "eval.json",
              "--frontier", tmp_path / "frontier.png", "--partition-source", "policy")
    assert res.exit_code == 0, res.output
    assert "ungated" in res.output and "95% CI" in res.output
    s = json.loads((tmp_path / "eval.json").read_text())
    o = s["overall"]
    assert o["delta_ci95"][0] <= o["delta_cer"] <= o["delta_ci95"][1]
    assert (tmp_path / "frontier.png").stat().st_size > 1000 and s["frontier"]["points"]
    # raising a refused proposal's score after the gate does not verify
    refused = next((i for i, x in enumerate(decisions) if x["rules"] == ["acoustic"]), None)
    if refused is not None:
        tampered = [dict(x) for x in decisions]
        tampered[refused].update(acoustic_delta=10.0, accepted=True, rules=[])
        (tmp_path / "t.jsonl").write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in tampered))
        res = inv("eval", "--rows", test, "--decisions", tmp_path / "t.jsonl", "--partition-source", "policy")
        assert res.exit_code == 2 and "witness" in res.output

    # an unscored proposal file is refused on the acoustically checked partitions, by name
    for p in val_props:
        p.pop("acoustic")
    res = inv("score", "--rows", val, "--proposals", tmp_path / "val_props.jsonl", "--run", d,
              "--out", tmp_path / "rescored.jsonl", "--partition-source", "policy")
    assert res.exit_code == 0 and "0 without a score" in res.output, res.output


def test_tables_show_ungated_and_gated_per_proposer(tmp_path):
    from agp.evaluate import evaluate
    from agp.gate import Gate, load_gate_policy
    from backend.matrix import load_matrix
    from backend.tables import agp_tables

    rows = [make_row("a", "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", "ߌ ߦߋ ߛߊ ߖߏߟߌ ߦߋ", "boundary"),
            make_row("b", "ߌ ߦߋ ߛߊ߲", "ߌ ߦߋ ߛߊ߲", "stable")]
    gate = Gate(load_gate_policy().with_margins({"boundary": 0.02}), None, key=b"\x01" * 32)
    decisions = [gate.decide(rows[0], "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", -0.01).as_dict(),
                 gate.decide(rows[1], "ߌ ߦߋ ߛߊ", 0.3).as_dict()]
    summary = evaluate(rows, decisions)
    summary["gate_policy"] = gate.policy.as_dict()
    m = load_matrix("configs/matrix/demo.json")
    (tmp_path / "demo-nko-baseline").mkdir()
    (tmp_path / "demo-nko-baseline" / "agp_eval.json").write_text(json.dumps({"proposers": {"nbest": summary}}))
    md, csv = agp_tables(m, tmp_path)
    line = next(x for x in md.splitlines() if "| nbest | boundary |" in x)
    assert line.split(" | ")[4:8] == ["6.25", "0.00", "0.00", "-6.25"] and line.endswith("| 0.0200 |")
    assert "| nbest | stable | 1 | 0.00 | 12.50 | 0.00 | +0.00 |" in md  # frozen: ungated damage, gated = before
    assert csv.count("\n") == 4 and agp_tables(m, tmp_path / "none") == ("", "")


@pytest.mark.slow  # trains a tiny run (module fixture)
def test_http_proposals_get_the_acoustic_score_too(run, tmp_path):
    from test_agp_proposers import Service

    service = Service()
    try:
        res = CliRunner().invoke(app, ["agp", "propose", "--rows", str(run["dir"] / "test_predictions.jsonl"),
                                       "--out", str(tmp_path / "p.jsonl"), "--proposer", "http", "--url", service.url,
                                       "--retries", "0", "--run", str(run["dir"])])
    finally:
        service.close()
    assert res.exit_code == 0, res.output
    lines = [json.loads(x) for x in (tmp_path / "p.jsonl").read_text(encoding="utf-8").splitlines()]
    assert lines and all(p["proposer"] == "agp-http" and p["acoustic"]["delta"] is not None for p in lines)
    for p in lines:
        a = p["acoustic"]
        assert a["delta"] == pytest.approx((a["logp_proposal"] - a["logp_asr"]) / a["frames"])
