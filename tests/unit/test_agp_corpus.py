import json
import random
import unicodedata

import pytest
from typer.testing import CliRunner

from agp.corpus import PERTURBATIONS, CorpusError, build_corpus, perturb, prompt_messages, split_rows
from models.bundle import read_predictions
from agp_helpers import PAIRS, make_row, row_dict, sample_rows, write_rows_file
from cli.root import app
from models.text import NASAL_MARK, TONE_MARKS


def read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def rows_with_correct(n=60):
    dicts = sample_rows(n)
    dicts.append(row_dict("bam_test_right", "ߦߋ ߞߊ ߞߎߟߎ", "ߦߋ ߞߊ ߞߎߟߎ", audio_id="aud_right"))
    return dicts


def test_corpus_from_real_error_pairs_disjoint_by_feat_and_audio(tmp_path):
    rows = read_predictions(write_rows_file(tmp_path / "rows.jsonl", rows_with_correct()))
    m = build_corpus(rows, tmp_path / "corpus", seed=3)
    # sample_rows cycles 8 pairs, one of which (index 3) is already correct
    n_err = sum(r.asr_text != r.reference_text for r in rows)
    assert m["error_pairs"] == n_err and m["skipped_correct_rows"] == len(rows) - n_err
    splits = {k: read(tmp_path / "corpus" / f"{k}.jsonl") for k in ("train", "valid", "test")}
    assert sum(len(v) for v in splits.values()) == n_err
    assert all(len(v) > 0 for v in splits.values())
    by_id = {r.feat_id: r for r in rows}
    feats = {k: {e["feat_id"] for e in v} for k, v in splits.items()}
    audio = {k: {e["audio_id"] for e in v} for k, v in splits.items()}
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not feats[a] & feats[b] and not audio[a] & audio[b]
    for k, examples in splits.items():
        assert feats[k] == set(m["feat_ids"][k])
        for e in examples:
            row = by_id[e["feat_id"]]
            roles = [t["role"] for t in e["messages"]]
            assert roles == ["system", "user", "assistant"]
            user = e["messages"][1]["content"]
            assert user.startswith(f"ASR: {row.asr_text}\nPartition: {row.partition}\nTrajectory: ")
            assert "uncertainty_mean=0.30" in user and "ctc_confidence_mean=0.85" in user
            assert e["messages"][2]["content"] == row.reference_text
            assert e["source"] == "asr" and "perturbation" not in e
            assert row.asr_text != row.reference_text
    # deterministic
    m2 = build_corpus(rows, tmp_path / "again", seed=3)
    assert m2["files"] == m["files"]


def test_prompt_never_contains_the_reference():
    row = make_row("x", "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", "ߌ ߦߋ ߛߊ ߖߏߟߌ ߦߋ")
    text = json.dumps(prompt_messages(row), ensure_ascii=False)
    assert "ߛߊ߲" not in text


def test_synthetic_only_behind_the_flag_only_in_train_and_labelled(tmp_path):
    rows = read_predictions(write_rows_file(tmp_path / "rows.jsonl", rows_with_correct()))
    plain = build_corpus(rows, tmp_path / "plain", seed=1)
    assert plain["synthetic"] == {} and all(e["source"] == "asr" for k in ("train", "valid", "test")
                                            for e in read(tmp_path / "plain" / f"{k}.jsonl"))
    m = build_corpus(rows, tmp_path / "syn", seed=1, synthetic_per_row=3)
    train = read(tmp_path / "syn" / "train.jsonl")
    syn = [e for e in train if e["source"] == "synthetic"]
    assert len(syn) == m["counts"]["train"]["synthetic"] > 0
    assert all(e["perturbation"] in PERTURBATIONS and "(synthetic)" in e["messages"][1]["content"] for e in syn)
    train_refs = {r.reference_text for r in rows if r.feat_id in set(m["feat_ids"]["train"])}
    assert {e["messages"][2]["content"] for e in syn} <= train_refs  # only train references are perturbed
    for k in ("valid", "test"):
        assert all(e["source"] == "asr" for e in read(tmp_path / "syn" / f"{k}.jsonl"))


@pytest.mark.parametrize("kind", PERTURBATIONS)
def test_perturbations_are_nko_aware(kind):
    rng = random.Random(0)
    text = unicodedata.normalize("NFC", "ߒ ߓߍ߬ ߕߊ߯ ߛߊ߲ ߞߏ ߖ߭ߌ ߛߋ")
    for _ in range(30):
        out = perturb(text, kind, rng)
        assert out is not None and out != text and unicodedata.is_normalized("NFC", out)
        if kind == "tone_drop":
            assert sum(c in TONE_MARKS for c in out) == sum(c in TONE_MARKS for c in text) - 1
            assert "ߖ߭" in out  # the loan dot on a consonant is a letter, never dropped as tone
        elif kind == "tone_swap":
            assert len(out) == len(text) and "ߖ߭" in out
        elif kind == "nasal_drop":
            assert out.count(NASAL_MARK) == text.count(NASAL_MARK) - 1
        elif kind == "e_swap":
            assert sorted(out.replace("ߍ", "ߋ")) == sorted(text.replace("ߍ", "ߋ"))
        elif kind == "o_swap":
            assert sorted(out.replace("ߐ", "ߏ")) == sorted(text.replace("ߐ", "ߏ"))
        elif kind == "word_merge":
            assert len(out.split()) == len(text.split()) - 1
        elif kind == "word_split":
            words = out.split()
            assert len(words) == len(text.split()) + 1
            assert all(unicodedata.category(w[0]) != "Mn" for w in words)
    assert perturb("ߞߏ", "nasal_drop", rng) is None


def test_split_needs_three_groups_and_keeps_audio_together():
    rows = [make_row(f"f{i}", "ߦߋ", "ߦߍ", audio_id="same") for i in range(5)]
    with pytest.raises(CorpusError, match="at least 3"):
        split_rows(rows)
    rows += [make_row("g1", "ߦߋ", "ߦߍ", audio_id="a2"), make_row("g2", "ߦߋ", "ߦߍ")]
    s = split_rows(rows, seed=0)
    homes = {k for k, v in s.items() for r in v if r.audio_id == "same"}
    assert len(homes) == 1


def test_latin_rows_refused(tmp_path):
    rows = read_predictions(write_rows_file(tmp_path / "rows.jsonl",
                                     [row_dict(f"l{i}", "i ye", "i ya", script="latin") for i in range(3)]))
    with pytest.raises(CorpusError, match="N'Ko only"):
        build_corpus(rows, tmp_path / "c")


def test_cli_build_corpus(tmp_path):
    rows = write_rows_file(tmp_path / "rows.jsonl", rows_with_correct())
    res = CliRunner().invoke(app, ["agp", "build-corpus", "--rows", str(rows), "--out", str(tmp_path / "c"),
                                   "--synthetic", "1"])
    assert res.exit_code == 0, res.output
    assert "synthetic" in res.output
    manifest = json.loads((tmp_path / "c" / "corpus.json").read_text())
    assert manifest["synthetic_per_row"] == 1 and len(manifest["rows_sha256"]) == 64
    bad = tmp_path / "bad.jsonl"
    d = rows_with_correct()[:3]
    d[1].pop("partition")
    write_rows_file(bad, d)
    res = CliRunner().invoke(app, ["agp", "build-corpus", "--rows", str(bad), "--out", str(tmp_path / "c2")])
    assert res.exit_code == 2 and "bad.jsonl:line 2: field 'partition': missing" in res.output
    assert not (tmp_path / "c2").exists()


def test_every_row_gets_a_split_correct_ones_included(tmp_path):
    dicts = rows_with_correct() + [row_dict(f"bam_right_{i}", ref, ref, audio_id=f"aud_right_{i}")
                                   for i, (ref, _) in enumerate(PAIRS[:3])]
    rows = read_predictions(write_rows_file(tmp_path / "rows.jsonl", dicts))
    m = build_corpus(rows, tmp_path / "corpus", seed=3)
    full = {k: set(v) for k, v in m["split_feat_ids"].items()}
    assert set().union(*full.values()) == {r.feat_id for r in rows}  # every row, once
    by_id = {r.feat_id: r for r in rows}
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        assert not full[a] & full[b]
        assert not {by_id[f].audio_id for f in full[a]} & {by_id[f].audio_id for f in full[b]}
    for k, every in full.items():
        examples = set(m["feat_ids"][k])
        correct = every - examples
        assert examples <= every and all(by_id[f].asr_text == by_id[f].reference_text for f in correct)
        assert m["counts"][k]["correct"] == len(correct)
    # a correct row shares its recording's split (sample_rows: rows 2 and 3 are one audio_id)
    home = {f: k for k, v in full.items() for f in v}
    assert home["bam_test_0003"] == home["bam_test_0002"]
    assert any(by_id[f].asr_text == by_id[f].reference_text for f in full["test"])
    # the examples are those of the error pairs alone: correct rows change no training line
    errors_only = build_corpus([r for r in rows if r.asr_text != r.reference_text], tmp_path / "errors", seed=3)
    assert errors_only["files"] == m["files"] and errors_only["feat_ids"] == m["feat_ids"]


def test_corpus_records_the_partition_source(tmp_path):
    from dataclasses import replace

    rows = read_predictions(write_rows_file(tmp_path / "rows.jsonl", rows_with_correct()))
    assert build_corpus(rows, tmp_path / "plain")["partition_source"] == "model"
    ident = "policy:agp:0123456789ab"
    m = build_corpus([replace(r, partition_source=ident) for r in rows], tmp_path / "policy")
    assert m["partition_source"] == ident
    assert json.loads((tmp_path / "policy" / "corpus.json").read_text())["partition_source"] == ident
    mixed = [replace(r, partition_source=ident) for r in rows[:5]] + list(rows[5:])
    with pytest.raises(CorpusError, match=r"field 'partition_source'.*mix|mix.*field 'partition_source'"):
        build_corpus(mixed, tmp_path / "mixed")
    assert not (tmp_path / "mixed").exists()
