import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from cli.root import app
from models.files import sha256_file
from models.snapshot import SnapshotError, describe, load
from models.split import Split, make_split

SAMPLE = Path(__file__).resolve().parents[2] / "data" / "sample"


def _write(path: Path, lines: list[str]) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "pairs.jsonl").write_text("".join(line + "\n" for line in lines), encoding="utf-8")
    return path


def _row(fid: str, nko: str = "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", latin: str = "i ye san joli ye") -> str:
    return json.dumps({"feat_id": fid, "nko": nko, "latin": latin}, ensure_ascii=False)


@pytest.fixture
def broken(tmp_path):
    return _write(tmp_path / "snap", [
        _row("a"),
        '{"feat_id": "b", "nko": "ߊ"',           # line 2: truncated JSON
        _row("c", nko=""),                        # line 3: empty nko
        _row("a"),                                # line 4: duplicate of line 1
        _row("d", nko="ߛߊ߲ san"),                  # line 5: Latin letters in the nko field
        "[1, 2]",                                 # line 6: not an object
        _row("e", latin="   "),                   # line 7: blank latin
    ])


def test_describe_reports_each_problem_with_its_line(broken):
    info = describe(broken)
    assert not info["ok"]
    assert info["rows"] == 4  # a, c, d, e (the duplicate and the two bad lines are not rows)
    assert any(line.startswith("line 2:") and "not JSON" in line for line in info["bad_lines"])
    assert any(line.startswith("line 6:") and "not a JSON object" in line for line in info["bad_lines"])
    assert info["duplicates"] == [{"line": 4, "feat_id": "a", "first_line": 1}]
    assert info["empty_texts"] == [{"line": 3, "feat_id": "c", "field": "nko"},
                                   {"line": 7, "feat_id": "e", "field": "latin"}]
    [invalid] = info["invalid_nko_rows"]
    assert (invalid["line"], invalid["feat_id"]) == (5, "d")
    assert invalid["offences"][0] == "U+0073 LATIN SMALL LETTER S at position 4 (latin)"


def test_strict_load_names_the_offending_lines(broken):
    with pytest.raises(SnapshotError) as e:
        load(broken)
    msg = str(e.value)
    assert "line 2" in msg and "line 4 (a): duplicate feat_id (first on line 1)" in msg
    assert "line 3 (c): field 'nko' is empty" in msg


def test_duplicate_only_snapshot_is_broken(tmp_path):
    snap = _write(tmp_path / "dup", [_row("x"), _row("y"), _row("x")])
    info = describe(snap)
    assert info["duplicates"] == [{"line": 3, "feat_id": "x", "first_line": 1}] and not info["ok"]


def test_clean_snapshot_loads_with_sha256(tmp_path):
    snap = _write(tmp_path / "ok", [_row("x"), _row("y")])
    loaded = load(snap)
    assert loaded.feat_ids == ["x", "y"]
    assert loaded.sha256 == sha256_file(snap / "pairs.jsonl")
    assert describe(snap)["ok"]


def test_cli_describe_exit_codes(broken, tmp_path):
    runner = CliRunner()
    bad = runner.invoke(app, ["snapshot", "describe", str(broken)])
    assert bad.exit_code != 0
    assert "bad: line 2:" in bad.output
    assert "duplicate feat_id: line 4 (a), first on line 1" in bad.output
    assert "empty text: line 3 (c): field 'nko'" in bad.output
    assert "empty text: line 7 (e): field 'latin'" in bad.output
    assert "invalid N'Ko: line 5 (d): U+0073" in bad.output
    missing = runner.invoke(app, ["snapshot", "describe", str(tmp_path / "nowhere")])
    assert missing.exit_code != 0
    good = runner.invoke(app, ["snapshot", "describe", str(SAMPLE), "--json"])
    assert good.exit_code == 0, good.output
    info = json.loads(good.output)
    assert info["ok"] and info["rows"] >= 1400


# --------------------------------------------------------------------------- split

N_PROGRAM = 290_596


@pytest.fixture(scope="module")
def program_ids():
    return [f"bam_train_{i:07d}" for i in range(N_PROGRAM)]


@pytest.fixture(scope="module")
def program_split(program_ids):
    return make_split(program_ids)


def test_split_sizes_match_the_program(program_split):
    assert program_split.seed == 42
    assert program_split.sizes() == {"train": 232_476, "val": 29_060, "test": 29_060}


def test_split_is_disjoint_and_covering(program_ids, program_split):
    train, val, test = map(set, (program_split.train, program_split.val, program_split.test))
    assert not (train & val) and not (train & test) and not (val & test)
    assert train | val | test == set(program_ids)


def test_split_is_deterministic_and_depends_on_the_seed(program_ids, program_split):
    again = make_split(list(reversed(program_ids)))  # input order must not matter
    assert again.test == program_split.test and again.sha256 == program_split.sha256
    other = make_split(program_ids, seed=7)
    assert other.sizes() == program_split.sizes()
    assert other.test != program_split.test and other.sha256 != program_split.sha256


def test_split_round_trips_and_refuses_tampering(tmp_path):
    split = make_split([f"id{i}" for i in range(1000)], seed=3, snapshot_sha256="abc")
    path = tmp_path / "split.json"
    split.save(path)
    loaded = Split.load(path)
    assert loaded == split and loaded.sha256 == split.sha256

    data = json.loads(path.read_text())
    data["test"][0], data["train"][0] = data["train"][0], data["test"][0]  # same ids, moved
    tampered = tmp_path / "tampered.json"
    tampered.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="does not match"):
        Split.load(tampered)

    del data["val"]
    (tmp_path / "partial.json").write_text(json.dumps(data))
    with pytest.raises(ValueError, match="'val'"):
        Split.load(tmp_path / "partial.json")


def test_split_rejects_duplicate_ids_and_bad_fractions():
    with pytest.raises(ValueError, match="unique"):
        make_split(["a", "b", "a"])
    with pytest.raises(ValueError, match="fractions"):
        make_split(["a", "b"], val_fraction=0.6, test_fraction=0.5)


def test_cli_split_make_on_the_sample(tmp_path):
    out = tmp_path / "new" / "folder" / "split.json"  # the folder is created
    result = CliRunner().invoke(app, ["split", "make", str(SAMPLE), "--out", str(out)])
    assert result.exit_code == 0, result.output
    split = Split.load(out)
    n = len(load(SAMPLE).rows)
    assert sum(split.sizes().values()) == n
    assert split.sizes()["test"] == split.sizes()["val"] == int(n * 0.1 + 0.5)
    assert split.snapshot_sha256 == sha256_file(SAMPLE / "pairs.jsonl")
    assert [p.name for p in out.parent.iterdir()] == ["split.json"]  # no temporary file left
