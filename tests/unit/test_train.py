"""Trainer: every mode learns, the bundle is complete and schema-valid, resume is exact,
TTT with 0 steps is the non-TTT output, bad configs and mismatched data fail clearly,
`nko-ops evaluate` reproduces the predictions byte for byte."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import train_helpers as H
from cli.root import app
from models.config import ConfigError, load_config, parse_config
from models.data import DataError
from models.bundle import BUNDLE_FILES, PARTITIONS, PREDICTION_FIELDS
from models.decode import SUMMARY_KEYS, load_policy, partition
from models.files import sha256_file
from models.split import PARTS, make_split
from models.text import row_edits, toneless
from models.train import evaluate_run, train

torch.set_num_threads(1)
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> dict:
    cfg = H.build(tmp_path_factory.mktemp("trainer"))
    cfg["train"].update(epochs=12, batch_size=4, lr=1e-2)
    return cfg


def variant(base: dict, name: str, **changes) -> dict:
    cfg = copy.deepcopy(base)
    for key, value in changes.items():
        node = cfg
        *parents, leaf = key.split("__")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    cfg["run_id"] = name
    cfg["out_dir"] = str(Path(base["out_dir"]).parent / name)
    return cfg


_RUNS: dict[str, Path] = {}


def run(base: dict, name: str, **changes) -> Path:
    if name not in _RUNS:
        _RUNS[name] = train(parse_config(variant(base, name, **changes)), echo=False)
    return _RUNS[name]


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def epochs(out: Path) -> list[dict]:
    return [r for r in lines(out / "metrics.jsonl") if r["kind"] == "epoch"]


# ---------------------------------------------------------------- every mode


@pytest.mark.parametrize("mode", ["baseline", "trajectory", "tar", "ttt"])
def test_every_mode_learns_and_writes_a_valid_bundle(base, mode):
    out = run(base, mode, mode=mode)
    ep = epochs(out)
    assert len(ep) >= 8
    assert ep[-1]["train_loss"] < 0.5 * ep[0]["train_loss"]
    assert min(e["val_loss"] for e in ep) < ep[0]["val_loss"]
    check_bundle(out, mode)


def check_bundle(out: Path, mode: str) -> None:
    manifest = json.loads((out / "manifest.json").read_text())
    for name in BUNDLE_FILES + ("metrics.jsonl", "last.pt"):
        assert name in manifest["files"], name
    for name, entry in manifest["files"].items():
        assert entry == {"sha256": sha256_file(out / name), "size": (out / name).stat().st_size}, name
    assert not (out / "error.json").exists()

    results = json.loads((out / "results.json").read_text())
    for key in ("config", "snapshot_sha256", "split_sha256", "feature_recipe_hash", "best_epoch", "best_val_loss",
                "test_cer", "test_toneless_cer", "wall_time_s", "git_commit", "torch_version", "device",
                "ctc_infeasible", "padding_waste"):
        assert key in results, key
    assert results["mode"] == mode and results["status"] == "complete"
    assert results["torch_version"] == torch.__version__ and results["device"] == "cpu"
    split = json.loads((out / "split.json").read_text())
    assert results["split_sha256"] == split["sha256"]
    assert json.loads((out / "vocab.json").read_text())["symbols"][0] == "<blank>"
    best = torch.load(out / "best.pt", weights_only=False)
    assert best["epoch"] == results["best_epoch"] and best["val_loss"] == results["best_val_loss"]

    rows = lines(out / "test_predictions.jsonl")
    refs = lines(out / "test_references.jsonl")
    assert [r["feat_id"] for r in rows] == [r["feat_id"] for r in refs] == split["test"]
    policy = load_policy()
    for r in rows:
        assert tuple(r) == PREDICTION_FIELDS  # exactly the CONTRACTS §4 keys, in order
        assert r["split"] == "test" and r["script"] == "nko" and r["mode"] == mode
        assert (r["cer_edits"], r["reference_chars"]) == row_edits(r["reference_text"], r["asr_text"])
        assert tuple(r["trajectory_scalars"]) == SUMMARY_KEYS
        assert all(isinstance(v, (int, float)) for v in r["trajectory_scalars"].values())
        assert r["partition"] in PARTITIONS and r["partition"] == partition(r["trajectory_scalars"], policy)
    by_part = json.loads((out / "test_metrics_by_partition.json").read_text())
    assert set(by_part["partitions"]) == set(PARTITIONS)
    assert sum(p["rows"] for p in by_part["partitions"].values()) == by_part["overall"]["rows"] == len(rows)
    edits = sum(r["cer_edits"] for r in rows)
    chars = sum(r["reference_chars"] for r in rows)
    assert by_part["overall"]["cer"] == pytest.approx(edits / chars) == pytest.approx(results["test_cer"])
    tl = sum(row_edits(toneless(r["reference_text"]), toneless(r["asr_text"]))[0] for r in rows)
    assert by_part["overall"]["toneless_edits"] == tl
    kinds = {r["kind"] for r in lines(out / "metrics.jsonl")}
    assert kinds == {"status", "step", "epoch"}


def test_ttt_with_zero_steps_reproduces_the_trajectory_run(base):
    traj = lines(run(base, "trajectory", mode="trajectory") / "test_predictions.jsonl")
    zero = lines(run(base, "ttt0", mode="ttt", ttt__steps=0) / "test_predictions.jsonl")
    assert [r["mode"] for r in zero] == ["ttt"] * len(zero)
    for a, b in zip(traj, zero):
        assert {**a, "mode": "ttt"} == b
    results = json.loads((run(base, "ttt0", mode="ttt", ttt__steps=0) / "results.json").read_text())
    assert results["ttt"]["ttt_steps"] == 0


def test_ttt_run_adapts_at_test_time(base):
    out = run(base, "ttt-strong", mode="ttt", ttt__steps=2, ttt__lr=0.05, ttt__chunk_size=16)
    results = json.loads((out / "results.json").read_text())
    assert results["ttt"]["ttt_steps"] > 0
    report = evaluate_run(out)
    assert report["identical"]  # TTT decoding is deterministic too


def test_ttt_grid_chooses_lr_and_steps_on_val_and_records_what_changed(base):
    out = run(base, "ttt-grid", mode="ttt", ttt__chunk_size=16, ttt__grid_lr=[0.01, 0.5], ttt__grid_steps=[1, 2])
    results = json.loads((out / "results.json").read_text())
    t = results["ttt"]
    sel = t["selection"]
    assert sel["split"] == "val" and [(g["lr"], g["steps"]) for g in sel["grid"]] == [(0.01, 1), (0.01, 2),
                                                                                   (0.5, 1), (0.5, 2)]
    best = min(sel["grid"], key=lambda g: g["val_cer"])
    assert sel["chosen"] == {"lr": best["lr"], "steps": best["steps"]} == {"lr": t["lr"], "steps": t["steps"]}
    assert sel["helps_on_val"] == (best["val_cer"] < sel["no_ttt_val_cer"])
    assert results["config"]["ttt"]["grid_lr"] == [0.01, 0.5]  # the config stays as given
    # the changed-row counts agree with the trajectory model's own predictions (same seed, same weights)
    traj = {r["feat_id"]: r for r in lines(run(base, "trajectory", mode="trajectory") / "test_predictions.jsonl")}
    rows = lines(out / "test_predictions.jsonl")
    changed = [r for r in rows if r["asr_text"] != traj[r["feat_id"]]["asr_text"]]
    assert t["test_changed"] == len(changed)
    if changed:
        chars = sum(r["reference_chars"] for r in changed)
        assert t["test_changed_cer_after"] == pytest.approx(sum(r["cer_edits"] for r in changed) / chars)
        assert t["test_changed_cer_before"] == pytest.approx(
            sum(traj[r["feat_id"]]["cer_edits"] for r in changed) / chars)
    run_log = (out / "run.log").read_text()
    assert run_log.count("ttt grid on val:") == 4 and "ttt: chose lr" in run_log
    assert evaluate_run(out)["identical"]  # evaluate decodes with the chosen setting


# ---------------------------------------------------------------- resume


def test_resume_after_epoch_k_equals_uninterrupted(base):
    full = run(base, "baseline", mode="baseline")
    cfg = parse_config(variant(base, "resumed", mode="baseline"))
    train(cfg, stop_after_epoch=3, echo=False)
    out = Path(cfg.out_dir)
    assert not (out / "manifest.json").exists() and (out / "last.pt").exists()
    assert [e["epoch"] for e in epochs(out)] == [1, 2, 3]
    train(cfg, echo=False)
    assert (out / "manifest.json").exists()
    drop = ("time", "epoch_time_s", "frames_per_s")
    strip = lambda recs: [{k: v for k, v in r.items() if k not in drop} for r in recs]  # noqa: E731
    assert strip(epochs(out)) == strip(epochs(full))
    steps = lambda o: [r for r in lines(o / "metrics.jsonl") if r["kind"] == "step"]  # noqa: E731
    assert strip(steps(out)) == strip(steps(full))
    assert (out / "test_predictions.jsonl").read_bytes() == (full / "test_predictions.jsonl").read_bytes()
    a, b = torch.load(out / "best.pt", weights_only=False), torch.load(full / "best.pt", weights_only=False)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    r1, r2 = (json.loads((o / "results.json").read_text()) for o in (out, full))
    assert (r1["best_val_loss"], r1["best_epoch"], r1["test_cer"]) == (r2["best_val_loss"], r2["best_epoch"],
                                                                       r2["test_cer"])
    assert "resumed" in [r.get("status") for r in lines(out / "metrics.jsonl")]


@pytest.mark.slow
def test_killed_process_resumes_to_the_same_result(base, tmp_path):
    """A real SIGKILL part-way through training, then the same command again."""
    long = dict(mode="baseline", train__epochs=40, train__patience=40)  # long enough to be killed mid-run
    full = run(base, "long", **long)
    cfg = variant(base, "killed", **long)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "models.train_cli", "train", "--config", str(path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    metrics = Path(cfg["out_dir"]) / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline:
        if metrics.exists() and sum('"kind": "epoch"' in line for line in metrics.read_text().splitlines()) >= 2:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (Path(cfg["out_dir"]) / "manifest.json").exists()
    assert len(epochs(Path(cfg["out_dir"]))) < 40
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    out = Path(cfg["out_dir"])
    assert (out / "test_predictions.jsonl").read_bytes() == (full / "test_predictions.jsonl").read_bytes()
    assert [e["val_loss"] for e in epochs(out)] == [e["val_loss"] for e in epochs(full)]


def test_completed_run_is_left_alone(base):
    out = run(base, "baseline", mode="baseline")
    before = (out / "manifest.json").read_bytes()
    assert train(parse_config(variant(base, "baseline", mode="baseline")), echo=False) == out
    assert (out / "manifest.json").read_bytes() == before
    with pytest.raises(RuntimeError, match="differs in: seed"):
        train(parse_config(variant(base, "baseline", mode="baseline", seed=99)), echo=False)


# ---------------------------------------------------------------- evaluate


def test_evaluate_reproduces_predictions_byte_for_byte(base, tmp_path):
    out = run(base, "trajectory", mode="trajectory")
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", "--run", str(out), "--out", str(tmp_path / "again.jsonl")])
    assert res.exit_code == 0, res.output
    assert "identical" in res.output
    assert (tmp_path / "again.jsonl").read_bytes() == (out / "test_predictions.jsonl").read_bytes()
    # a TTT ablation of the same checkpoint, through the SUTA-style control
    res = runner.invoke(app, ["evaluate", "--run", str(out), "--ttt-steps", "2", "--ttt-method", "suta", "--json"])
    assert res.exit_code == 0, res.output
    report = json.loads(res.output)
    assert report["ttt"]["method"] == "suta" and report["ttt"]["ttt_steps"] > 0


def test_evaluate_decodes_the_val_split_for_partition_calibration(base, tmp_path):
    from models.split import Split

    out = run(base, "trajectory", mode="trajectory")
    before = (out / "test_predictions.jsonl").read_bytes()
    runner = CliRunner()
    res = runner.invoke(app, ["evaluate", "--run", str(out), "--split", "val", "--out", str(tmp_path / "new" / "val.jsonl")])
    assert res.exit_code == 0, res.output
    assert "val rows decoded" in res.output
    rows = lines(tmp_path / "new" / "val.jsonl")
    assert [r["feat_id"] for r in rows] == Split.load(out / "split.json").val
    assert {r["split"] for r in rows} == {"val"} and all(set(r) == set(PREDICTION_FIELDS) for r in rows)
    assert all((r["cer_edits"], r["reference_chars"]) == row_edits(r["reference_text"], r["asr_text"]) for r in rows)
    assert (out / "test_predictions.jsonl").read_bytes() == before  # the run stays untouched
    again = evaluate_run(out, tmp_path / "again.jsonl", split="val")
    assert (tmp_path / "again.jsonl").read_bytes() == (tmp_path / "new" / "val.jsonl").read_bytes()
    assert again["rows"] == len(rows) and again["split"] == "val"
    res = runner.invoke(app, ["evaluate", "--run", str(out), "--split", "val"])
    assert res.exit_code == 2 and "needs an output path" in res.output


def test_evaluate_detects_a_changed_prediction_file(base, tmp_path):
    import shutil

    src = run(base, "tar", mode="tar")
    copy_dir = tmp_path / "copy"
    shutil.copytree(src, copy_dir)
    path = copy_dir / "test_predictions.jsonl"
    rows = lines(path)
    rows[0]["asr_text"] += "ߊ"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    res = CliRunner().invoke(app, ["evaluate", "--run", str(copy_dir)])
    assert res.exit_code == 1
    assert "DIFFERENT" in res.output and "1 rows" in res.output


# ---------------------------------------------------------------- errors


def test_config_errors_name_the_field(base, tmp_path):
    bad = copy.deepcopy(base)
    del bad["run_id"]
    with pytest.raises(ConfigError, match="field 'run_id' is required"):
        parse_config(bad)
    bad = copy.deepcopy(base)
    bad["train"]["lrr"] = 0.1
    with pytest.raises(ConfigError, match="field 'train.lrr' is not a known setting"):
        parse_config(bad)
    bad = copy.deepcopy(base)
    bad["train"]["epochs"] = "ten"
    with pytest.raises(ConfigError, match="field 'train.epochs'"):
        parse_config(bad)
    bad = copy.deepcopy(base)
    bad["mode"] = "trajectroy"
    with pytest.raises(ConfigError, match="field 'mode'"):
        parse_config(bad)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(base))
    assert load_config(path, {"ttt.lr": 0.5, "seed": 3}).ttt.lr == 0.5
    res = CliRunner().invoke(app, ["train", "--config", str(path), "--script", "arabic"])
    assert res.exit_code == 2 and "field 'script'" in res.output
    res = CliRunner().invoke(app, ["train", "--config", str(tmp_path / "nope.json")])
    assert res.exit_code == 2 and "not found" in res.output


def test_split_snapshot_mismatch_fails_clearly_without_a_bundle(base, tmp_path):
    other = make_split(["bam_t_0000", "bam_t_0001", "bam_t_0002", "x"], seed=1, snapshot_sha256="0" * 64)
    other.save(tmp_path / "other-split.json")
    cfg = variant(base, "mismatch", split=str(tmp_path / "other-split.json"))
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["train", "--config", str(path)])
    assert res.exit_code == 1
    assert "split/snapshot mismatch" in res.output
    out = Path(cfg["out_dir"])
    err = json.loads((out / "error.json").read_text())
    assert err["stage"] == "data" and "split/snapshot mismatch" in err["message"]
    assert not (out / "manifest.json").exists() and not (out / "results.json").exists()
    assert "FAILED" in (out / "run.log").read_text()

    cfg = variant(base, "badsha", snapshot_sha256="f" * 64)
    with pytest.raises(DataError, match="snapshot_sha256 mismatch"):
        train(parse_config(cfg), echo=False)
    cfg = variant(base, "nofeat", features=str(tmp_path / "missing"))
    with pytest.raises(DataError, match="features"):
        train(parse_config(cfg), echo=False)
    assert not (Path(cfg["out_dir"]) / "manifest.json").exists()


def test_ctc_infeasible_utterances_are_counted_not_fatal(base):
    out = run(base, "stride3", model__conv_stride=3, model__conv_kernel=3, model__conv_padding=1,
              train__epochs=2)
    results = json.loads((out / "results.json").read_text())
    bad = results["ctc_infeasible"]
    assert bad["train"] > 0 and bad["train"] < results["utterances"]["train"]
    assert results["test_rows"] == results["utterances"]["test"]  # infeasible test rows are still scored
    assert "CTC-infeasible" in (out / "run.log").read_text()


def test_cli_flags_override_the_config(base, tmp_path):
    cfg = variant(base, "cli", train__epochs=2)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["train", "--config", str(path), "--use-ttt", "--ttt-steps", "0", "--seed", "5",
                                   "--ttt-chunk-size", "32", "--ttt-lr", "0.01", "--script", "latin"])
    assert res.exit_code == 0, res.output
    results = json.loads((Path(cfg["out_dir"]) / "results.json").read_text())
    c = results["config"]
    assert (c["mode"], c["seed"], c["script"], c["ttt"]["chunk_size"], c["ttt"]["lr"], c["ttt"]["steps"]) == (
        "ttt", 5, "latin", 32, 0.01, 0)
    rows = lines(Path(cfg["out_dir"]) / "test_predictions.jsonl")
    assert rows[0]["script"] == "latin" and all(ch < "\u07c0" for ch in rows[0]["reference_text"])


@pytest.mark.slow
def test_ddp_two_cpu_ranks_under_torchrun(base, tmp_path):
    cfg = variant(base, "ddp", mode="trajectory", train__epochs=3)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "models.train_cli", "train", "--config", str(path)]
    done = subprocess.run(cmd, cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = Path(cfg["out_dir"])
    assert (out / "manifest.json").exists()
    assert "world_size=2" in (out / "run.log").read_text()
    started = next(r for r in lines(out / "metrics.jsonl") if r.get("status") == "started")
    assert epochs(out)[-1]["step"] == 3 * started["steps_per_epoch"]
    check_bundle(out, "trajectory")


# ---------------------------------------------------------------- data integrity

OOV = {"nko": "x", "latin": "ç"}  # outside the N'Ko / Latin vocabularies, kept by the target normaliser


def test_out_of_vocabulary_test_rows_are_kept_in_both_scripts(base, tmp_path):
    from models.split import Split

    texts = {part: {"nko": f"ߓߊ {OOV['nko']} ߞߊ", "latin": f"ba {OOV['latin']} ka"} for part in PARTS}
    cfg = H.build(tmp_path, texts=texts)
    cfg["train"].update(base["train"], epochs=2)
    split = Split.load(Path(cfg["split"]))
    outs = {}
    for script in ("nko", "latin"):
        outs[script] = train(parse_config(variant(cfg, f"oov-{script}", script=script)), echo=False)
    ids = {s: [r["feat_id"] for r in lines(o / "test_predictions.jsonl")] for s, o in outs.items()}
    assert ids["nko"] == ids["latin"] == split.test
    for script, out in outs.items():
        ch = OOV[script]
        row = next(r for r in lines(out / "test_predictions.jsonl") if r["feat_id"] == split.test[0])
        assert ch in row["reference_text"] and ch not in row["asr_text"]  # scored as written: an unavoidable error
        assert (row["cer_edits"], row["reference_chars"]) == row_edits(row["reference_text"], row["asr_text"])
        results = json.loads((out / "results.json").read_text())
        label = f"{ch!r} U+{ord(ch):04X}"
        assert results["utterances"] == {"train": len(split.train) - 1, "val": len(split.val),
                                         "test": len(split.test)}
        assert results["test_rows"] == len(split.test)
        assert results["skipped"] == {"unknown_chars": [{"feat_id": split.train[0], "chars": [label]}], "empty": []}
        assert results["out_of_vocabulary"] == {p: [{"feat_id": getattr(split, p)[0], "chars": [label]}]
                                                for p in ("val", "test")}
        log = (out / "run.log").read_text()
        assert "WARNING train: 1 utterance(s) skipped" in log and f"{split.train[0]}: {label}" in log
        assert f"{split.test[0]}: {label}" in log


def test_empty_val_or_test_target_is_an_error_naming_the_row(tmp_path):
    from models.data import prepare
    from models.split import Split

    for part in ("val", "test"):
        cfg = H.build(tmp_path / part, texts={part: {"nko": "߹", "latin": "!"}})  # punctuation only
        fid = getattr(Split.load(Path(cfg["split"])), part)[0]
        for script in ("nko", "latin"):
            with pytest.raises(DataError, match=f"{part} utterance.*empty {script} target.*{fid}"):
                prepare(parse_config({**cfg, "script": script}), log=lambda m: None)
    cfg = H.build(tmp_path / "train", texts={"train": {"nko": "߹", "latin": "!"}})
    fid = Split.load(Path(cfg["split"])).train[0]
    logged = []
    data = prepare(parse_config(cfg), log=logged.append)
    assert data.skipped == {"unknown_chars": [], "empty": [fid]}
    assert any("empty nko target" in m and fid in m for m in logged)


def test_feature_store_of_another_snapshot_fails_naming_both_shas(base, tmp_path):
    from models.data import prepare
    from models.snapshot import load

    other = H.build(tmp_path / "other", seed=1)  # same feat_ids, other texts: another snapshot
    ours, theirs = (load(Path(c["snapshot"])).sha256 for c in (base, other))
    assert ours != theirs
    cfg = variant(base, "wrong-store", features=other["features"])
    with pytest.raises(DataError) as e:
        train(parse_config(cfg), echo=False)
    msg = str(e.value)
    assert ours in msg and theirs in msg and "'features'" in msg and "nko-ops features extract" in msg
    out = Path(cfg["out_dir"])
    assert json.loads((out / "error.json").read_text())["stage"] == "data"
    assert not (out / "results.json").exists()

    bare = H.build(tmp_path / "bare", source=False)
    with pytest.raises(DataError, match="records no source snapshot.*FeatureWriter must pass source"):
        prepare(parse_config(bare), log=lambda m: None)


def test_late_failure_leaves_no_complete_looking_bundle(base, tmp_path, monkeypatch):
    import models.train as train_mod
    from backend.runs import verify_bundle

    cfg = parse_config(variant(base, "late-fail", train__epochs=2))
    out = Path(cfg.out_dir)

    def broken_hash(path):
        raise OSError(f"disk went away while hashing {path.name}")

    monkeypatch.setattr(train_mod, "sha256_file", broken_hash)  # fails while writing manifest.json
    with pytest.raises(OSError, match="disk went away"):
        train(cfg, echo=False)
    monkeypatch.undo()
    assert (out / "error.json").exists() and not (out / "manifest.json").exists()
    assert all((out / a).exists() for a in BUNDLE_FILES)
    assert json.loads((out / "results.json").read_text())["status"] == "failed"
    problems = verify_bundle(out, allow_no_manifest=True).problems
    assert any(p.startswith("error.json present: the run failed (stage decode") for p in problems)
    assert "results.json: status 'failed', not 'complete'" in problems
    res = CliRunner().invoke(app, ["runs", "import", str(out), "--allow-no-manifest",
                                   "--db", str(tmp_path / "state.db")])
    assert res.exit_code == 2 and "error.json present" in res.output
    # a results.json that still says complete (as an older trainer left it) is refused too
    results = json.loads((out / "results.json").read_text())
    (out / "results.json").write_text(json.dumps({**results, "status": "complete"}))
    assert any(p.startswith("error.json present") for p in verify_bundle(out, allow_no_manifest=True).problems)

    assert train(cfg, echo=False) == out  # the same command finishes the run
    assert (out / "manifest.json").exists() and not (out / "error.json").exists()
    assert json.loads((out / "results.json").read_text())["status"] == "complete"
    assert verify_bundle(out).ok


def test_cli_tar_weight_flags_override_the_config(base, tmp_path):
    cfg = variant(base, "tar-cli", train__epochs=2)
    path = tmp_path / "run.json"
    path.write_text(json.dumps(cfg))
    res = CliRunner().invoke(app, ["train", "--config", str(path), "--mode", "tar", "--tar-weight", "0.25",
                                   "--tar-smooth-weight", "0.05"])
    assert res.exit_code == 0, res.output
    results = json.loads((Path(cfg["out_dir"]) / "results.json").read_text())
    assert results["config"]["tar"] == {"weight": 0.25, "smooth_weight": 0.05}
    assert (results["tar"]["weight"], results["tar"]["smooth_weight"]) == (0.25, 0.05)
    res = CliRunner().invoke(app, ["train", "--config", str(path), "--tar-weight", "-1"])
    assert res.exit_code == 2 and "field 'tar.weight'" in res.output
