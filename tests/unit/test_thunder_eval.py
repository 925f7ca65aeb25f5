"""The Thunder AGP eval's inputs: the held-out rows come from the corpus' full test split
(already-correct rows included), from the very rows file the corpus was built from, under the
partition policy it was built with. No model is served here (tests/e2e/test_thunder.py runs the
eval end to end)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agp.lexicon import Lexicon
from agp_helpers import PAIRS, row_dict, sample_rows, text_only_policy, write_rows_file
from backend.thunder.agp_eval import AgpEvalError, evaluate_adapter, heldout_rows, main, score
from thunder_helpers import REPO, build_corpus_like_the_cli


@pytest.fixture
def built(tmp_path):
    """rows.jsonl (error pairs + three already-correct recordings) and the corpus built from it."""
    dicts = sample_rows(40) + [row_dict(f"bam_right_{i}", ref, ref, "boundary", audio_id=f"aud_right_{i}")
                               for i, (ref, _) in enumerate(PAIRS[:3])]
    rows = write_rows_file(tmp_path / "rows.jsonl", dicts)
    manifest = build_corpus_like_the_cli(rows, tmp_path / "corpus", seed=42)
    return rows, tmp_path / "corpus", manifest


def _adapter(tmp_path: Path) -> Path:
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "adapters.safetensors").write_bytes(b"not read before the inputs are checked")
    return d


def test_heldout_rows_are_the_full_test_split_and_show_damage_to_correct_rows(built, tmp_path):
    rows_path, corpus, manifest = built
    test_rows, train_refs, policy, _ = heldout_rows(rows_path, corpus)
    assert [r.feat_id for r in test_rows] == manifest["split_feat_ids"]["test"]
    correct = [r for r in test_rows if r.asr_text == r.reference_text]
    assert correct and len(test_rows) == len(manifest["feat_ids"]["test"]) + len(correct)
    assert policy.identity == manifest["partition_source"] == "model"

    # an adapter that fixes every error pair and rewrites correct text into a known ASR error
    asr_of = {ref: asr for ref, asr in PAIRS}
    proposals = [{"feat_id": r.feat_id, "proposal": asr_of[r.reference_text] if r in correct else r.reference_text}
                 for r in test_rows]
    lexicon = Lexicon.from_references(train_refs)
    # no acoustic model here: the text rules alone (rule acoustic would refuse every unscored
    # change on boundary/uncertain rows and hide what this checks)
    text_only = str(text_only_policy(tmp_path))
    unscored, _, _ = score(test_rows, proposals, lexicon, policy.identity)
    assert unscored["overall"]["rejected_by_rule"].get("acoustic", 0) > 0
    summary, decisions, _ = score(test_rows, proposals, lexicon, policy.identity, text_only)
    damaged = summary["already_correct"]
    assert damaged["rows"] == len(correct) and damaged["worse"] >= 1 and damaged["cer_after"] > 0
    assert summary["overall"]["worse"] == damaged["worse"]
    # scored on the error pairs alone (what corpus.json's example ids hold) the harm is invisible
    errors = [r for r in test_rows if r not in correct]
    only_errors, _, _ = score(errors, [p for p in proposals if p["feat_id"] in {r.feat_id for r in errors}],
                              lexicon, policy.identity, text_only)
    assert only_errors["overall"]["worse"] == 0 and only_errors["already_correct"]["rows"] == 0


def test_eval_refuses_rows_that_are_not_the_corpus_rows(built, tmp_path):
    rows_path, corpus, manifest = built
    other = tmp_path / "other.jsonl"
    other.write_bytes(rows_path.read_bytes() + json.dumps(row_dict("bam_extra", "ߦߋ", "ߦߍ"), ensure_ascii=False)
                      .encode() + b"\n")
    with pytest.raises(AgpEvalError, match="differs from .*corpus.json field 'rows_sha256'"):
        heldout_rows(other, corpus)
    out = tmp_path / "eval-out"
    with pytest.raises(AgpEvalError, match="rows_sha256"):
        evaluate_adapter("/nonexistent/model", str(_adapter(tmp_path)), str(corpus), str(other), out)
    assert not out.exists()  # refused before anything was written

    # a corpus that did not record its rows cannot vouch for any rows file
    manifest = json.loads((corpus / "corpus.json").read_text())
    (corpus / "corpus.json").write_text(json.dumps({**manifest, "rows_sha256": ""}))
    with pytest.raises(AgpEvalError, match="field 'rows_sha256' is empty"):
        heldout_rows(rows_path, corpus)


def test_eval_refuses_another_partition_policy(built, tmp_path, capsys):
    rows_path, corpus, _ = built
    policy = tmp_path / "partition.toml"
    shipped = (REPO / "configs" / "agp" / "partition.toml").read_text()
    policy.write_text(re.sub(r'^source = "model"$', 'source = "policy"', shipped, count=1, flags=re.M))
    with pytest.raises(AgpEvalError, match=r"gives partition_source 'policy:.*field 'partition_source' is 'model'"):
        heldout_rows(rows_path, corpus, policy)
    with pytest.raises(AgpEvalError, match="partition_source 'policy:"):
        heldout_rows(rows_path, corpus, partition_source="policy")
    # what the monitor runs on rank 0's host: exit 1 and the reason on stderr
    out = tmp_path / "eval-out"
    rc = main(["--model", "/nonexistent/model", "--adapter", str(_adapter(tmp_path)), "--corpus", str(corpus),
               "--rows", str(rows_path), "--out", str(out), "--partition-policy", str(policy)])
    assert rc == 1 and "field 'partition_source' is 'model'" in capsys.readouterr().err
    assert not out.exists()


def test_eval_refuses_a_corpus_without_the_full_held_out_list(built):
    rows_path, corpus, manifest = built
    old = {k: v for k, v in manifest.items() if k != "split_feat_ids"}  # a corpus built before it was recorded
    (corpus / "corpus.json").write_text(json.dumps(old))
    with pytest.raises(AgpEvalError, match="field 'split_feat_ids.test' is missing or empty.*rebuild"):
        heldout_rows(rows_path, corpus)
