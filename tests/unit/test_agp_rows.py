import json
import unicodedata

import pytest

from agp.partition import PartitionError, load_partition_policy, parse_partition_policy, partition_counts
from agp.rows import write_rows
from models.bundle import RowError, read_predictions
from agp_helpers import row_dict, sample_rows, write_rows_file


def test_valid_rows_load_and_round_trip(tmp_path):
    dicts = sample_rows(12)
    rows = read_predictions(write_rows_file(tmp_path / "r.jsonl", dicts))
    assert [r.feat_id for r in rows] == [d["feat_id"] for d in dicts]
    write_rows(tmp_path / "again.jsonl", rows)
    again = read_predictions(tmp_path / "again.jsonl")
    assert again == rows


def test_texts_are_nfc_and_bidi_stripped(tmp_path):
    # nasal mark typed after the tone mark, plus a bidi mark: the same word after NFC + strip
    raw = "ߛߊ\u07eb\u07f2\u200f ߦߋ"
    d = row_dict("f1", "ߛߊ߲߫ ߦߋ", "ߛߊ߲߫ ߦߋ")
    d["asr_text"] = raw
    d["cer_edits"] = 0  # counted after NFC and bidi stripping (CONTRACTS §6): the same text
    (row,) = read_predictions(write_rows_file(tmp_path / "r.jsonl", [d]))
    assert row.asr_text == unicodedata.normalize("NFC", "ߛߊ\u07f2\u07eb ߦߋ")
    assert "\u200f" not in row.asr_text


@pytest.mark.parametrize("mutate,line,field", [
    (lambda d: d.pop("asr_text"), 2, "asr_text"),
    (lambda d: d.update(partition="wobbly"), 2, "partition"),
    (lambda d: d.update(cer_edits=-1), 2, "cer_edits"),
    (lambda d: d.update(cer_edits=True), 2, "cer_edits"),
    (lambda d: d.update(reference_chars=999), 2, "reference_chars"),
    (lambda d: d.update(cer_edits=d["cer_edits"] + 3), 2, "cer_edits"),
    (lambda d: d.update(trajectory_scalars={"novelty_max": float("nan")}), 2, "trajectory_scalars.novelty_max"),
    (lambda d: d.update(trajectory_scalars=[1, 2]), 2, "trajectory_scalars"),
    (lambda d: d.update(trajectory_scalars={"row_cer": 0.1}), 2, "trajectory_scalars.row_cer"),  # not a summary
    (lambda d: d.update(script="cyrillic"), 2, "script"),
    (lambda d: d.update(mode="magic"), 2, "mode"),
    (lambda d: d.update(audio_id=7), 2, "audio_id"),
    (lambda d: d.update(extra_field=1), 2, "extra_field"),
    (lambda d: d.update(feat_id=""), 2, "feat_id"),
    (lambda d: d.update(row_dict(d["feat_id"], " ", d["asr_text"])), 2, "reference_text"),
])
def test_errors_name_line_and_field(tmp_path, mutate, line, field):
    dicts = sample_rows(3)
    mutate(dicts[1])
    with pytest.raises(RowError) as e:
        read_predictions(write_rows_file(tmp_path / "r.jsonl", dicts))
    msg = str(e.value)
    assert f"r.jsonl:line {line}: field '{field}'" in msg, msg
    assert len(e.value.problems) == 1


def test_duplicate_feat_id_refused(tmp_path):
    dicts = sample_rows(3)
    dicts[2]["feat_id"] = dicts[0]["feat_id"]
    with pytest.raises(RowError, match=r"line 3: field 'feat_id': duplicate 'bam_test_0000' \(first on line 1\)"):
        read_predictions(write_rows_file(tmp_path / "r.jsonl", dicts))


def test_bad_json_and_script_filter(tmp_path):
    p = tmp_path / "r.jsonl"
    p.write_text(json.dumps(row_dict("a", "ߦߋ", "ߦߋ")) + "\n{not json\n", encoding="utf-8")
    with pytest.raises(RowError, match="line 2: not JSON"):
        read_predictions(p)
    write_rows_file(p, [row_dict("a", "i ye", "i ye", script="latin")])
    with pytest.raises(RowError, match="field 'script': this lane needs 'nko'"):
        read_predictions(p, script="nko")


def test_keep_model_partition_is_recorded(tmp_path):
    rows = read_predictions(write_rows_file(tmp_path / "r.jsonl", sample_rows(8)))
    policy = load_partition_policy(source="model")
    kept = policy.apply(rows)
    assert [r.partition for r in kept] == [r.partition for r in rows]
    assert all(r.model_partition == r.partition and r.partition_source == "model" for r in kept)


def scalars(**kw):
    base = {"novelty_mean": 0.1, "ctc_blank_fraction": 0.5, "ctc_nonblank_confidence_mean": 0.85,
            "uncertainty_mean": 0.2, "ctc_nonblank_confidence_min": 0.5}
    return {**base, **kw}


def test_repartition_by_thresholds_is_recorded(tmp_path):
    dicts = [
        row_dict("nov", "ߦߋ", "ߦߋ", "stable", scalars=scalars(novelty_mean=0.5)),
        row_dict("blank", "ߦߋ", "ߦߋ", "stable", scalars=scalars(ctc_blank_fraction=0.99)),
        row_dict("unc", "ߦߋ", "ߦߋ", "stable", scalars=scalars(ctc_nonblank_confidence_mean=0.6)),
        row_dict("stb", "ߦߋ", "ߦߋ", "uncertain", scalars=scalars(ctc_nonblank_confidence_mean=0.97,
                                                                   ctc_nonblank_confidence_min=0.7)),
        row_dict("bnd", "ߦߋ", "ߦߋ", "stable", scalars=scalars()),
    ]
    rows = read_predictions(write_rows_file(tmp_path / "r.jsonl", dicts))
    policy = load_partition_policy(source="policy")
    new = policy.apply(rows)
    assert [r.partition for r in new] == ["novelty", "novelty", "uncertain", "stable", "boundary"]
    assert [r.model_partition for r in new] == ["stable", "stable", "stable", "uncertain", "stable"]
    assert policy.identity == f"policy:agp-partition-1:{policy.sha256[:12]}"
    assert all(r.partition_source == policy.identity for r in new)
    assert partition_counts(new)["moved"] == {"stable->boundary": 1, "stable->novelty": 2, "stable->uncertain": 1,
                                              "uncertain->stable": 1}
    # re-applying keeps the run's partition, and the file round-trips
    write_rows(tmp_path / "p.jsonl", new)
    again = policy.apply(read_predictions(tmp_path / "p.jsonl"))
    assert again == new


def test_same_format_and_code_as_the_trainer(tmp_path):
    """The trainer's own configs/partition.toml reads as an AGP policy, gives the same
    partitions as models.decode.partition and the digest results.json records."""
    from models.decode import DEFAULT_POLICY, load_policy, partition, policy_sha256

    trainer = load_policy(DEFAULT_POLICY)
    ours = load_partition_policy(DEFAULT_POLICY, source="policy")
    assert ours.sha256 == policy_sha256(trainer)
    for s in (scalars(), scalars(novelty_mean=0.9), scalars(ctc_nonblank_confidence_mean=0.95,
                                                              ctc_nonblank_confidence_min=0.9)):
        assert ours.classify("x", s) == partition(s, trainer)


def test_repartition_needs_the_scalars(tmp_path):
    rows = read_predictions(write_rows_file(tmp_path / "r.jsonl", [row_dict("x", "ߦߋ", "ߦߋ", scalars={"novelty_mean": 0.1})]))
    with pytest.raises(PartitionError, match="x: trajectory_scalars lacks ctc_blank_fraction"):
        load_partition_policy(source="policy").apply(rows)


def test_partition_policy_errors_name_the_key():
    with pytest.raises(PartitionError, match="key 'source'"):
        parse_partition_policy({"source": "oracle"}, "p.toml")
    with pytest.raises(PartitionError, match=r"p.toml: \[stable\] wobble is not a summary key"):
        parse_partition_policy({"source": "policy", "name": "x", "order": ["stable"], "fallback": "boundary",
                                "stable": {"match": "all", "wobble": {"min": 1}}}, "p.toml")
    with pytest.raises(PartitionError, match="missing field 'fallback'"):
        parse_partition_policy({"source": "policy", "name": "x", "order": []}, "p.toml")
