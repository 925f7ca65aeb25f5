"""models/bundle.py: the one typed description of a run's files (CONTRACTS §3–§4): its file
list and partitions are defined once, prediction rows round-trip byte for byte, and bad lines
are refused naming the file, line and field, for every reader that goes through it."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from agp_helpers import row_dict, sample_rows, write_rows_file
from backend_helpers import make_corpus, write_bundle
from backend.runs import verify_bundle
from models.bundle import (BUNDLE_FILES, PARTITIONS, PREDICTION_FIELDS, BundleError, PredictionRow, RowError,
                           jsonl_bytes, learning_curve, read_metrics, read_predictions)
from models.errors import NkoOpsError

ROOT = Path(__file__).resolve().parents[2]


def test_round_trip_is_byte_identical(tmp_path):
    dicts = sample_rows(9)
    path = tmp_path / "test_predictions.jsonl"
    path.write_bytes(jsonl_bytes(dicts))  # what the trainer writes
    rows = read_predictions(path)
    assert all(isinstance(r, PredictionRow) for r in rows)
    assert [tuple(r.as_dict()) for r in rows] == [PREDICTION_FIELDS] * 9  # the §4 keys, in order
    assert jsonl_bytes(r.as_dict() for r in rows) == path.read_bytes()
    # optional re-partition fields survive the trip and are dropped when absent
    d = row_dict("f1", "ߌ ߦߋ", "ߌ ߦߋ")
    d.update(model_partition="stable", partition_source="policy:abc")
    (row,) = read_predictions(write_rows_file(tmp_path / "p.jsonl", [d]))
    assert row.as_dict() == d


def test_bad_lines_name_the_file_line_and_field(tmp_path):
    dicts = sample_rows(4)
    dicts[2]["partition"] = "wobbly"
    text = "".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dicts)
    lines = text.splitlines(keepends=True)
    lines.insert(1, "{not json\n")  # line 2
    path = tmp_path / "test_predictions.jsonl"
    path.write_text("".join(lines), encoding="utf-8")
    with pytest.raises(RowError) as e:
        read_predictions(path)
    assert e.value.problems == [
        "test_predictions.jsonl:line 2: not JSON (Expecting property name enclosed in double quotes)",
        "test_predictions.jsonl:line 4: field 'partition': must be one of stable, boundary, uncertain, novelty; "
        "got 'wobbly'"]
    assert str(e.value).startswith(f"{path}: 2 invalid row(s)")
    assert isinstance(e.value, BundleError) and isinstance(e.value, NkoOpsError)  # one line, exit 2 at the root


def test_partitions_and_the_file_list_are_defined_once():
    assert PARTITIONS == ("stable", "boundary", "uncertain", "novelty")
    assert len(BUNDLE_FILES) == 9 and "manifest.json" not in BUNDLE_FILES
    literal = re.compile(r"""\(\s*["']stable["'],\s*["']boundary["'],\s*["']uncertain["'],\s*["']novelty["']\s*\)""")
    files = re.compile(r"""["']test_references\.jsonl["'],\s*["']test_metrics_by_partition\.json["']""")
    found = []
    for pkg in ("models", "backend", "agp", "console", "state", "benchmarks"):
        for path in sorted((ROOT / pkg).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if path.name != "bundle.py" and (literal.search(text) or files.search(text)):
                found.append(str(path.relative_to(ROOT)))
    assert found == []
    from agp import gate, partition
    from backend import tables
    from models import decode

    assert partition.PARTITIONS is gate.PARTITIONS is tables.PARTITIONS is decode.PARTITIONS is PARTITIONS


def test_metrics_reader_skips_a_partial_last_line_or_refuses_it(tmp_path):
    recs = [{"kind": "status", "status": "started", "epoch": 0},
            {"kind": "step", "epoch": 1, "step": 2, "train_loss": 3.0},
            {"kind": "epoch", "epoch": 1, "val_loss": 2.5}, {"kind": "epoch", "epoch": 2, "val_loss": 2.0}]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "epo', encoding="utf-8")  # killed mid-write
    assert read_metrics(path) == recs
    assert read_metrics(path, kind="epoch") == recs[2:] == learning_curve(tmp_path)
    with pytest.raises(BundleError, match=r"metrics.jsonl: line 5: not JSON"):
        read_metrics(path, strict=True)
    assert learning_curve(tmp_path / "nowhere") == []


def test_verification_reads_rows_through_the_bundle(tmp_path):
    corpus = make_corpus(tmp_path / "data", n=40)
    test = corpus["split_obj"].test
    refs = {f: "ߌ ߦߋ ߛߊ߲" for f in test}
    d = write_bundle(tmp_path / "run", corpus, "r1", "nko", "baseline", 1, refs, refs, manifest=False)
    b = verify_bundle(d, allow_no_manifest=True)
    assert b.ok, b.problems
    assert [r.feat_id for r in b.rows] == b.test_ids == list(test)
    lines = (d / "test_predictions.jsonl").read_text(encoding="utf-8").splitlines()
    row = json.loads(lines[1])
    row["cer_edits"] = 5  # the texts need 0 edits
    lines[1] = json.dumps(row, ensure_ascii=False)
    (d / "test_predictions.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    b = verify_bundle(d, allow_no_manifest=True)
    assert b.problems == ["test_predictions.jsonl:line 2: field 'cer_edits': is 5 but reference vs asr_text needs "
                          "0 edits"]
