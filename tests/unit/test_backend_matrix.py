"""Run-matrix validation: schema, cross-run identity checks, clear errors, nothing written."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from typer.testing import CliRunner

from cli.root import app
from backend.matrix import MatrixError, load_matrix, parse_matrix, resolve
from backend_helpers import make_corpus, matrix_dict

runner = CliRunner()
SHA_A = "a" * 64
SHA_B = "b" * 64


def base(tmp: Path | str = "/nonexistent") -> dict:
    return {
        "matrix_id": "m", "snapshot": f"{tmp}/snap", "snapshot_sha256": SHA_A, "split": f"{tmp}/split.json",
        "split_sha256": SHA_B, "features": f"{tmp}/features", "recipe_hash": "r1", "out_root": f"{tmp}/runs",
        "reference_run": "r-nko-traj",
        "defaults": {"model": {"preset": "tiny"}, "train": {"epochs": 3}, "device": "cpu"},
        "runs": [{"run_id": "r-nko-base", "script": "nko", "mode": "baseline", "seed": 1},
                 {"run_id": "r-nko-traj", "script": "nko", "mode": "trajectory", "seed": 1, "train": {"lr": 0.01}},
                 {"run_id": "r-latin-ttt", "script": "latin", "mode": "ttt", "seed": 2, "optional": True}],
    }


def problems(raw) -> str:
    with pytest.raises(MatrixError) as e:
        parse_matrix(raw, "m.json")
    return str(e.value)


def test_valid_matrix_merges_defaults_into_trainer_configs():
    m = parse_matrix(base())
    cfg = m.run_config(m.run("r-nko-traj"))
    assert cfg["train"] == {"epochs": 3, "lr": 0.01} and cfg["model"] == {"preset": "tiny"}
    assert cfg["out_dir"].endswith("runs/r-nko-traj") and cfg["snapshot_sha256"] == SHA_A
    sanity = m.run_config(m.run("r-nko-traj"), sanity=True)
    assert sanity["train"]["epochs"] == 1 and sanity["subset"] == {"train": 64, "val": 16, "test": 16}
    assert "/_sanity/" in sanity["out_dir"]
    assert [r.run_id for r in m.selected()] == ["r-nko-base", "r-nko-traj"]
    assert len(m.selected(with_optional=True)) == 3


def test_repo_matrices_are_valid():
    root = Path(__file__).resolve().parents[2]
    for name in ("paper4.json", "demo.json"):
        m = load_matrix(root / "configs" / "matrix" / name)
        modes = {(r.script, r.mode) for r in m.runs if not r.optional}
        assert {("nko", "baseline"), ("latin", "baseline"), ("latin", "trajectory"), ("nko", "tar"),
                ("nko", "ttt"), ("nko", "trajectory")} <= modes
        assert m.reference_run and m.run(m.reference_run).mode == "trajectory"
        assert m.agp_dumps
    p4 = load_matrix(root / "configs" / "matrix" / "paper4.json")
    assert p4.run(p4.reference_run).import_from


def test_demo_runs_three_seeds_and_its_log_mel_ablation_stays_comparable():
    root = Path(__file__).resolve().parents[2]
    demo = load_matrix(root / "configs" / "matrix" / "demo.json")
    seeds: dict[tuple, set] = {}
    for r in demo.runs:
        if not r.optional:
            seeds.setdefault((r.script, r.mode), set()).add(r.seed)
    assert all(len(s) >= 3 for s in seeds.values()) and len(seeds) == 6
    assert demo.defaults.ttt["grid_lr"] and demo.defaults.ttt["grid_steps"]
    ablation = load_matrix(root / "configs" / "matrix" / "demo-logmel.json")
    assert ablation.split == demo.split and ablation.split_sha256 == demo.split_sha256
    assert ablation.defaults.train == demo.defaults.train and ablation.defaults.model == demo.defaults.model
    assert ablation.recipe_hash != demo.recipe_hash
    assert {(r.mode, r.seed) for r in ablation.runs} == {(m, s) for (sc, m), ss in seeds.items()
                                                         if sc == "nko" and m in ("baseline", "trajectory") for s in ss}


def test_duplicate_run_ids_are_named():
    raw = base()
    raw["runs"].append(dict(raw["runs"][0]))
    msg = problems(raw)
    assert "run 'r-nko-base' (runs[3]): field 'run_id' duplicates runs[0]" in msg


def test_unknown_field_names_run_and_field():
    raw = base()
    raw["runs"][1]["moed"] = "tar"
    assert "run 'r-nko-traj' (runs[1]): field 'moed' is not a known setting" in problems(raw)
    raw = base()
    raw["snapshots"] = "x"
    assert "matrix: field 'snapshots' is not a known setting" in problems(raw)


def test_trainer_typos_are_caught_through_the_trainer_schema():
    raw = base()
    raw["runs"][0]["train"] = {"epoch": 5}
    msg = problems(raw)
    assert "run 'r-nko-base' (runs[0])" in msg and "field 'train.epoch' is not a known setting" in msg


def test_mixed_snapshot_and_split_hashes_are_refused():
    raw = base()
    raw["runs"][2]["snapshot_sha256"] = "c" * 64
    msg = problems(raw)
    assert "run 'r-latin-ttt' (runs[2]): field 'snapshot_sha256'" in msg and "same snapshot" in msg
    raw = base()
    raw["runs"][0]["split_sha256"] = "d" * 64
    assert "run 'r-nko-base' (runs[0]): field 'split_sha256'" in problems(raw)


def test_reference_and_agp_dumps_must_name_runs():
    raw = base()
    raw["reference_run"] = "nope"
    raw["agp_dumps"] = ["r-nko-base", "ghost"]
    msg = problems(raw)
    assert "'reference_run' names 'nope'" in msg and "'agp_dumps[1]' names 'ghost'" in msg


def test_run_on_another_snapshot_file_is_refused_by_resolve(tmp_path):
    a = make_corpus(tmp_path / "a")
    b = make_corpus(tmp_path / "b", n=41)
    raw = matrix_dict(a, tmp_path / "runs", [
        {"run_id": "x", "script": "nko", "mode": "baseline"},
        {"run_id": "y", "script": "nko", "mode": "trajectory", "snapshot": b["snapshot"]}])
    m = parse_matrix(raw)
    ident = resolve(m)
    assert any("run 'y' (runs[1]): field 'snapshot'" in p and "same snapshot" in p for p in ident.problems)
    # and through the CLI: a clear error, exit 2, nothing written
    f = tmp_path / "m.json"
    f.write_text(json.dumps(raw))
    res = runner.invoke(app, ["matrix", "run", str(f), "--db", str(tmp_path / "state.db")])
    out = res.output + (res.stderr if res.stderr_bytes is not None else "")
    assert res.exit_code == 2, out
    assert "run 'y' (runs[1]): field 'snapshot'" in out and "Traceback" not in out
    assert not (tmp_path / "state.db").exists() and not (tmp_path / "runs").exists()


def test_pinned_hash_that_does_not_match_the_file(tmp_path):
    a = make_corpus(tmp_path)
    raw = matrix_dict(a, tmp_path / "runs", [{"run_id": "x", "script": "nko", "mode": "baseline"}])
    raw["split_sha256"] = "e" * 64
    ident = resolve(parse_matrix(raw))
    assert any("field 'split_sha256' pins eeeeeeeeeeeeeeee" in p for p in ident.problems)


# --------------------------------------------------------------------------- fuzz

def _mutations():
    """Strategies that each turn the valid matrix into an invalid one."""
    runs_idx = st.integers(0, 2)
    junk = st.one_of(st.dictionaries(st.text(max_size=3), st.integers(), max_size=2),
                     st.lists(st.integers(), max_size=2))
    key = st.text(min_size=1, max_size=8).filter(
        lambda k: k not in {"matrix_id", "description", "snapshot", "snapshot_sha256", "split", "split_sha256",
                            "features", "recipe_hash", "out_root", "reference_run", "defaults", "sanity", "forecast",
                            "agp_dumps", "runs", "run_id", "script", "mode", "seed", "optional", "note",
                            "import_from", "model", "train", "ttt", "tar", "device"})
    required = st.sampled_from(["matrix_id", "snapshot", "split", "features", "out_root", "runs"])
    run_required = st.sampled_from(["run_id", "script", "mode"])
    typed = st.sampled_from(["matrix_id", "snapshot", "split", "out_root", "features"])
    run_typed = st.sampled_from(["run_id", "script", "mode", "seed", "optional"])
    return st.one_of(
        st.tuples(st.just("drop"), required),
        st.tuples(st.just("drop_run_field"), runs_idx, run_required),
        st.tuples(st.just("unknown"), key, junk),
        st.tuples(st.just("unknown_run_field"), runs_idx, key, junk),
        st.tuples(st.just("wrong_type"), typed, junk),
        st.tuples(st.just("wrong_run_type"), runs_idx, run_typed, junk),
        st.tuples(st.just("duplicate"), runs_idx),
        st.tuples(st.just("mixed"), runs_idx, st.sampled_from(["snapshot_sha256", "split_sha256"]),
                  st.text("0123456789abcdef", min_size=64, max_size=64).filter(lambda s: s not in (SHA_A, SHA_B))),
        st.tuples(st.just("bad_mode"), runs_idx, st.text(max_size=6).filter(
            lambda s: s not in ("baseline", "trajectory", "tar", "ttt"))),
        st.tuples(st.just("truncate"), st.integers(1, 400)),
        st.tuples(st.just("bytes"), st.binary(max_size=60)),
        st.tuples(st.just("toplevel"), st.one_of(st.lists(st.integers(), max_size=3), st.integers(), st.text())),
    )


def _apply(raw: dict, mutation: tuple) -> bytes:
    kind, *args = mutation
    raw = copy.deepcopy(raw)
    if kind == "drop":
        raw.pop(args[0])
    elif kind == "drop_run_field":
        raw["runs"][args[0]].pop(args[1])
    elif kind == "unknown":
        raw[args[0]] = args[1]
    elif kind == "unknown_run_field":
        raw["runs"][args[0]][args[1]] = args[2]
    elif kind == "wrong_type":
        raw[args[0]] = args[1]
    elif kind == "wrong_run_type":
        raw["runs"][args[0]][args[1]] = args[2]
    elif kind == "duplicate":
        raw["runs"].append(copy.deepcopy(raw["runs"][args[0]]))
    elif kind == "mixed":
        raw["runs"][args[0]][args[1]] = args[2]
    elif kind == "bad_mode":
        raw["runs"][args[0]]["mode"] = args[1]
    elif kind == "truncate":
        text = json.dumps(raw).encode()
        return text[: min(args[0], len(text) - 1)]
    elif kind == "bytes":
        return args[0]
    elif kind == "toplevel":
        return json.dumps(args[0]).encode()
    return json.dumps(raw, ensure_ascii=False).encode("utf-8", errors="surrogatepass")


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(mutation=_mutations())
def test_fuzzed_matrix_files_fail_cleanly_and_write_nothing(tmp_path_factory, mutation):
    tmp = tmp_path_factory.mktemp("fuzz")
    f = tmp / "matrix.json"
    f.write_bytes(_apply(base(tmp), mutation))
    before = sorted(p.name for p in tmp.iterdir())
    res = runner.invoke(app, ["matrix", "run", str(f), "--db", str(tmp / "state.db")])
    out = res.output + (res.stderr if res.stderr_bytes is not None else "")
    assert res.exit_code == 2, (mutation, out)
    assert isinstance(res.exception, SystemExit), (mutation, res.exception)
    assert out.startswith("error: ") and str(f) in out or "matrix file" in out, out
    assert "Traceback" not in out
    assert sorted(p.name for p in tmp.iterdir()) == before  # no state.db, no out_root, nothing
