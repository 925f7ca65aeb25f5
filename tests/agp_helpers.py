"""Shared builders for the AGP tests: prediction rows in the CONTRACTS §4 schema."""

from __future__ import annotations

import json
from pathlib import Path

from models.bundle import PredictionRow, parse_row
from models.text import row_edits

# a subset of the trainer's summary keys (models/decode.py SUMMARY_KEYS)
SCALARS = {"commitment_mean": 0.7, "uncertainty_mean": 0.3, "novelty_mean": 0.2, "stability_mean": 0.8,
           "ctc_confidence_mean": 0.85, "ctc_nonblank_confidence_mean": 0.85, "ctc_nonblank_confidence_min": 0.4,
           "ctc_blank_fraction": 0.7}

# (reference, asr) pairs written like real N'Ko ASR errors (from the sample corpus' sentences).
PAIRS = [
    ("ߓߌߝߊߟߏ ߕߎ߲ ߦߋ", "ߓߌߝߊߟߏ ߕߎ ߦߋ"),
    ("ߏ ߞߐ ߎ ߓߍ ߓߊߊߣߌ ߣߊ ߕߌߟߋߓߌ߲ ߝߍ", "ߏ ߞߐ ߎ ߓߍ ߓߊߣߌ ߣߊ ߕߌߟߋߓߌ߲ ߝߍ"),
    ("ߥߊ ߌߣߊߝߐ ߡߐߜ߭ߐ", "ߥߊ ߌߣߊߝߏ ߡߐߜ߭ߐ"),
    ("ߣߌ߲ ߗߍߢߊ߲ ߝߊ߲ ߘߐ ߦߋ ߛߐߙߐ", "ߣߌ߲ ߗߍߢߊ߲ ߝߊ߲ ߘߐ ߦߋ ߛߐߙߐ"),
    ("ߦߋ ߞߊ ߞߎߟߎ", "ߦߍ ߞߊ ߞߎߟߎ"),
    ("ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", "ߌ ߦߋ ߛߊ ߖߏߟߌ ߦߋ"),
    ("ߒ ߓߍ߬ ߕߊ߯ ߟߊ߫", "ߒ ߓߍ ߕߊ߯ ߟߊ"),
    ("ߞߊ߬ ߛߏ ߘߌߟߊ߲ ߦߋ", "ߞߊ߬ ߛߏ ߘߌߟߊߣ ߦߋ"),
]


def row_dict(feat_id: str, reference: str, asr: str, partition: str = "boundary", audio_id: str | None = None,
             scalars: dict | None = None, script: str = "nko", mode: str = "trajectory") -> dict:
    edits, chars = row_edits(reference, asr)
    return {"feat_id": feat_id, "audio_id": audio_id, "split": "test", "script": script, "mode": mode,
            "asr_text": asr, "reference_text": reference, "cer_edits": edits, "reference_chars": chars,
            "trajectory_scalars": dict(SCALARS if scalars is None else scalars), "partition": partition}


def make_row(feat_id: str, reference: str, asr: str, partition: str = "boundary", **kw) -> PredictionRow:
    row, problems = parse_row(row_dict(feat_id, reference, asr, partition, **kw), feat_id)
    assert row is not None, problems
    return row


def write_rows_file(path: Path, dicts: list[dict]) -> Path:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dicts), encoding="utf-8")
    return path


def sample_rows(n: int = 40) -> list[dict]:
    """n rows cycling PAIRS and partitions, two rows per audio_id."""
    parts = ["boundary", "uncertain", "stable", "novelty"]
    out = []
    for i in range(n):
        ref, asr = PAIRS[i % len(PAIRS)]
        out.append(row_dict(f"bam_test_{i:04d}", ref, asr, parts[i % 4], audio_id=f"aud_{i // 2:04d}"))
    return out


def text_only_policy(tmp_path: Path) -> Path:
    """The default gate policy with rule acoustic off, for lanes with no checkpoint to score
    proposals with (the text rules are what such tests exercise)."""
    import tomllib

    from agp.gate import DEFAULT_POLICY

    text = DEFAULT_POLICY.read_text(encoding="utf-8")
    text = text[:text.index("[acoustic]")]
    assert "acoustic" not in tomllib.loads(text)
    (tmp_path / "text_only.toml").write_text(text, encoding="utf-8")
    return tmp_path / "text_only.toml"
