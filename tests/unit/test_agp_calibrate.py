"""Partition calibration on validation rows (agp/calibrate.py): thresholds meet their CER
targets at the loosest setting, test rows are refused, and the written policy reads back
and re-partitions rows through the lane's own loader."""

from __future__ import annotations

import json
import random

import pytest
from typer.testing import CliRunner

from agp.calibrate import Targets, calibrate, write
from agp.partition import PartitionError, load_partition_policy
from models.bundle import read_predictions
from agp_helpers import row_dict, write_rows_file
from cli.root import app

REFERENCE = "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ ߞߊ ߞߎߟߎ ߓߌߝߊߟߏ"
LETTERS = [i for i, ch in enumerate(REFERENCE) if ch != " "]

BASE = """name = "t"
order = ["novelty", "uncertain", "stable"]
fallback = "boundary"

[novelty]
match = "any"
novelty_mean = { min = 0.9 }

[uncertain]
match = "any"
ctc_nonblank_confidence_mean = { max = 0.2 }

[stable]
match = "all"
ctc_nonblank_confidence_mean = { min = 0.99 }
"""


def with_errors(k: int) -> str:
    chars = list(REFERENCE)
    for i in LETTERS[:k]:
        chars[i] = "ߥ" if chars[i] != "ߥ" else "ߞ"
    return "".join(chars)


def val_rows(n: int = 200, informative: bool = True, seed: int = 0) -> list[dict]:
    """Rows whose errors fall as confidence rises (or, not ``informative``, at random)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        conf = rng.random()
        k = round((1 - conf) * 8) if informative else rng.randint(0, 8)
        scalars = {"ctc_nonblank_confidence_mean": round(conf, 6), "novelty_mean": round(rng.random(), 6)}
        d = row_dict(f"bam_val_{i:04d}", REFERENCE, with_errors(k), scalars=scalars)
        d["split"] = "val"
        out.append(d)
    return out


def cer(rows) -> float:
    return sum(r.cer_edits for r in rows) / sum(r.reference_chars for r in rows)


@pytest.fixture
def base(tmp_path):
    path = tmp_path / "base.toml"
    path.write_text(BASE)
    return path


def test_thresholds_meet_their_targets_at_the_loosest_setting(tmp_path, base):
    rows_path = write_rows_file(tmp_path / "val.jsonl", val_rows())
    c = calibrate(rows_path, base)
    rows = read_predictions(rows_path)
    val = cer(rows)
    assert c.val_cer == pytest.approx(val) and not c.warnings

    t = c.policy["stable"]["ctc_nonblank_confidence_mean"]["min"]
    stable = [r for r in rows if r.trajectory_scalars["ctc_nonblank_confidence_mean"] >= t]
    assert cer(stable) <= 0.5 * val and len(stable) >= 0.05 * len(rows)
    looser = max(v for r in rows if (v := r.trajectory_scalars["ctc_nonblank_confidence_mean"]) < t)
    assert cer([r for r in rows if r.trajectory_scalars["ctc_nonblank_confidence_mean"] >= looser]) > 0.5 * val

    u = c.policy["uncertain"]["ctc_nonblank_confidence_mean"]["max"]
    uncertain = [r for r in rows if r.trajectory_scalars["ctc_nonblank_confidence_mean"] <= u]
    assert cer(uncertain) >= 1.5 * val and len(uncertain) >= 0.05 * len(rows)
    looser = min(v for r in rows if (v := r.trajectory_scalars["ctc_nonblank_confidence_mean"]) > u)
    assert cer([r for r in rows if r.trajectory_scalars["ctc_nonblank_confidence_mean"] <= looser]) < 1.5 * val

    n = c.policy["novelty"]["novelty_mean"]["min"]
    assert sum(r.trajectory_scalars["novelty_mean"] >= n for r in rows) == 4  # the top 2% of 200 rows
    assert c.slices["novelty"].rows == 4 and sum(s.rows for s in c.slices.values()) == 200
    # the base thresholds put almost nothing in stable; the calibrated ones follow the CER
    assert c.base_slices["stable"].rows < c.slices["stable"].rows
    assert c.slices["stable"].cer < val < c.slices["uncertain"].cer


def test_a_key_that_cannot_reach_its_target_is_dropped_and_reported(tmp_path, base):
    """Confidence unrelated to errors: it must neither flag rows as uncertain nor let rows
    through as stable; the rule left without a condition takes no rows."""
    rows_path = write_rows_file(tmp_path / "val.jsonl", val_rows(informative=False))
    c = calibrate(rows_path, base, Targets(stable_cer_ratio=0.1, uncertain_cer_ratio=3.0))
    assert any(w.startswith("[stable] ctc_nonblank_confidence_mean min: no threshold reaches CER <=")
               for w in c.warnings)
    assert "[stable] no condition left: no row goes to stable" in c.warnings
    assert c.policy["order"] == ["novelty"] and "stable" not in c.policy and "uncertain" not in c.policy
    assert c.slices["stable"].rows == c.slices["uncertain"].rows == 0
    write(c, tmp_path / "cal.toml")
    assert load_partition_policy(tmp_path / "cal.toml").policy == c.policy


def test_test_rows_and_tiny_files_are_refused(tmp_path, base):
    rows = val_rows()
    rows[17]["split"] = "test"
    with pytest.raises(PartitionError, match=r"bam_val_0017 has split 'test'.*never on test rows"):
        calibrate(write_rows_file(tmp_path / "mixed.jsonl", rows), base)
    with pytest.raises(PartitionError, match="at least 50"):
        calibrate(write_rows_file(tmp_path / "few.jsonl", val_rows(20)), base)
    with pytest.raises(PartitionError, match="min_share"):
        calibrate(write_rows_file(tmp_path / "val.jsonl", val_rows()), base, Targets(min_share=0.7))


def test_written_policy_reads_back_and_repartitions_through_the_cli(tmp_path, base):
    rows_path = write_rows_file(tmp_path / "val.jsonl", val_rows())
    c = calibrate(rows_path, base)
    identity = write(c, tmp_path / "cal.toml")
    text = (tmp_path / "cal.toml").read_text()
    assert c.rows_sha256 in text and "validation CER" in text
    loaded = load_partition_policy(tmp_path / "cal.toml")
    assert loaded.source == "policy" and loaded.identity == identity and loaded.policy == c.policy

    test_rows = val_rows(60, seed=1)
    for d in test_rows:
        d["split"] = "test"
    write_rows_file(tmp_path / "test.jsonl", test_rows)
    runner = CliRunner()
    got = runner.invoke(app, ["agp", "partition", "--rows", str(tmp_path / "test.jsonl"), "--out",
                              str(tmp_path / "parted.jsonl"), "--partition-policy", str(tmp_path / "cal.toml")])
    assert got.exit_code == 0, got.output
    assert json.loads(got.output)["partition_source"] == identity
    parted = read_predictions(tmp_path / "parted.jsonl")
    assert {r.partition_source for r in parted} == {identity}
    assert [r.partition for r in parted] == [loaded.classify(r.feat_id, r.trajectory_scalars) for r in parted]


def test_cli_refuses_test_rows_and_writes_nothing(tmp_path, base):
    rows = val_rows()
    for d in rows:
        d["split"] = "test"
    write_rows_file(tmp_path / "test.jsonl", rows)
    got = CliRunner().invoke(app, ["agp", "calibrate-partition", "--rows", str(tmp_path / "test.jsonl"),
                                   "--base", str(base), "--out", str(tmp_path / "cal.toml")])
    assert got.exit_code == 2 and "never on test rows" in got.output
    assert not (tmp_path / "cal.toml").exists()

    write_rows_file(tmp_path / "val.jsonl", val_rows())
    got = CliRunner().invoke(app, ["agp", "calibrate-partition", "--rows", str(tmp_path / "val.jsonl"),
                                   "--base", str(base), "--out", str(tmp_path / "cal.toml")])
    assert got.exit_code == 0, got.output
    assert "calibrated policy on these rows" in got.output and (tmp_path / "cal.toml").exists()
