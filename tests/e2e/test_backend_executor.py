"""The local executor with the real trainer (`nko-ops train --config` subprocesses) on the
trainer tests' tiny learnable corpus: sanity step, state.db records, reuse on rerun, and
resuming after the executor is killed mid-run."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from state import store
from backend.executor import ExecutorError
from backend.executor_local import sanity_specs
from backend.matrix_run import run_matrix
from backend.matrix import parse_matrix
from train_helpers import build

ROOT = Path(__file__).resolve().parents[2]


def make_matrix(tmp: Path, runs: list[dict], epochs: int = 4, name: str = "t", **extra) -> Path:
    cfg = build(tmp / "data", n=40) if not (tmp / "data" / "split.json").exists() else json.loads(
        (tmp / "data" / "cfg.json").read_text())
    (tmp / "data" / "cfg.json").write_text(json.dumps(cfg))
    train = dict(cfg["train"], epochs=epochs, patience=100)
    m = {"matrix_id": name, "snapshot": cfg["snapshot"], "split": cfg["split"], "features": cfg["features"],
         "out_root": str(tmp / f"runs-{name}"), "defaults": {"model": {"preset": "tiny"}, "train": train,
                                                            "ttt": cfg["ttt"], "device": "cpu"},
         "sanity": {"subset": {"train": 12, "val": 4, "test": 4}, "epochs": 1}, "runs": runs, **extra}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(m))
    return path


def test_sanity_step_covers_every_mode_and_script():
    m = parse_matrix({"matrix_id": "x", "snapshot": "s", "split": "p", "features": "f", "out_root": "o",
                      "defaults": {"model": {"preset": "tiny"}},
                      "runs": [{"run_id": "a", "script": "nko", "mode": "baseline"},
                               {"run_id": "b", "script": "nko", "mode": "baseline", "seed": 2},
                               {"run_id": "c", "script": "nko", "mode": "tar"},
                               {"run_id": "d", "script": "latin", "mode": "baseline"}]})
    assert [s.run_id for s in sanity_specs(m.runs)] == ["a", "c", "d"]


def test_matrix_runs_records_state_and_reuses_on_rerun(tmp_path):
    mpath = make_matrix(tmp_path, [{"run_id": "nko-base", "script": "nko", "mode": "baseline", "seed": 7},
                                   {"run_id": "latin-traj", "script": "latin", "mode": "trajectory", "seed": 7}],
                        agp_dumps=["nko-base"], reference_run="nko-base")
    dbp = tmp_path / "state.db"
    results = run_matrix(mpath, dbp, parallel=2, poll_s=0.2, log=lambda s: None)
    assert [(r.run_id, r.status, r.how) for r in results] == [("nko-base", "completed", "trained"),
                                                             ("latin-traj", "completed", "trained")]
    db = store.open_db(dbp)
    for rid in ("nko-base", "latin-traj"):
        row = store.get_run(db, rid)
        assert row["status"] == "completed" and row["executor"] == "local" and row["matrix_id"] == "t"
        assert row["heartbeat_at"] and row["epoch"] == 4 and row["test_cer"] is not None
        assert json.loads(row["flags"]) == {"sanity": "passed"}
        assert [e for e, _ in store.curve(db, rid, "val_loss")] == [1, 2, 3, 4]
        names = {r["name"] for r in db.query("SELECT name FROM artifacts WHERE run_id = ?", [rid])}
        assert {"results.json", "best.pt", "test_predictions.jsonl", "manifest.json"} <= names
        statuses = [r["message"] for r in db.query(
            "SELECT message FROM events WHERE run_id = ? AND kind = 'status' ORDER BY id", [rid])]
        assert statuses[:3] == ["new -> planned: in matrix t", "planned -> queued: trained",
                                statuses[2]] and statuses[2].startswith("queued -> running: trained by the local")
        assert statuses[-1].startswith("running -> completed")
        assert db.execute("SELECT count(*) FROM events WHERE run_id = ? AND kind = 'log'", [rid]).fetchone()[0] > 0
    sanity = {r["id"]: r["status"] for r in db.query("SELECT id, status FROM runs WHERE matrix_id = 't' AND sanity = 1")}
    assert sanity == {"_sanity/nko-base": "completed", "_sanity/latin-traj": "completed"}
    # the AGP lane's inputs: the matrix's agp_dumps runs that state.db records as completed
    from backend.agp_lane import lane_bundles
    from backend.matrix import load_matrix

    bundles = lane_bundles(load_matrix(mpath), dbp, log=lambda s: None)
    assert [(b.run_id, b.dir) for b in bundles] == [("nko-base", (tmp_path / "runs-t" / "nko-base").resolve())]
    n_events = db.execute("SELECT count(*) FROM events").fetchone()[0]

    again = run_matrix(mpath, dbp, poll_s=0.2, log=lambda s: None)
    assert [(r.status, r.how) for r in again] == [("completed", "reused")] * 2
    assert db.execute("SELECT count(*) FROM events WHERE id > ? AND kind = 'status'", [n_events]).fetchone()[0] == 0

    # a completed run whose config the matrix now changes is refused, not retrained
    raw = json.loads(mpath.read_text())
    raw["defaults"]["train"]["lr"] = 0.5
    mpath.write_text(json.dumps(raw))
    with pytest.raises(ExecutorError, match="completed with a different config"):
        run_matrix(mpath, dbp, poll_s=0.2, log=lambda s: None)


def test_failing_sanity_step_blocks_the_full_runs(tmp_path):
    # n_heads must divide d_model (32): the trainer fails when it builds the model
    mpath = make_matrix(tmp_path, [{"run_id": "bad", "script": "nko", "mode": "baseline",
                                    "model": {"preset": "tiny", "n_heads": 3}}])
    results = run_matrix(mpath, tmp_path / "state.db", poll_s=0.2, log=lambda s: None)
    assert [(r.status, r.how) for r in results] == [("blocked", "not started")]
    assert "sanity step failed" in results[0].error
    assert not (tmp_path / "runs-t" / "bad").exists()
    db = store.open_db(tmp_path / "state.db")
    row = store.get_run(db, "_sanity/bad")
    assert row["status"] == "failed" and "divisible" in row["error"]
    ev = next(iter(db.query("SELECT * FROM events WHERE kind = 'sanity'")))
    assert ev["level"] == "error" and "FAILED" in ev["message"]


def _wait(pred, timeout: float, what: str):
    end = time.time() + timeout
    while time.time() < end:
        value = pred()
        if value:
            return value
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except OSError:
        return False


@pytest.mark.slow  # ~25 s on an idle 2-core machine, 80 s+ on a loaded one (four trainer starts)
def test_killing_the_executor_mid_run_resumes_from_last_pt(tmp_path, monkeypatch):
    # one torch thread per trainer: bit-exact comparison needs the same reduction order in every
    # process (with two threads best_val_loss once differed in its 7th digit between two runs)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        monkeypatch.setenv(var, "1")
    runs = [{"run_id": "long", "script": "nko", "mode": "trajectory", "seed": 7}]
    mpath = make_matrix(tmp_path, runs, epochs=40)
    dbp = tmp_path / "state.db"
    ex = subprocess.Popen([sys.executable, "-m", "cli", "matrix", "run", str(mpath), "--db", str(dbp),
                           "--skip-sanity"], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        def progressed():
            if not dbp.exists():
                return None
            db = store.open_db(dbp)
            row = store.get_run(db, "long")
            db.close()
            return row if row and row["pid"] and (row["epoch"] or 0) >= 2 else None

        row = _wait(progressed, 240, "the run to pass epoch 2")
        trainer_pid = row["pid"]
        ex.send_signal(signal.SIGKILL)  # no chance to clean up
        ex.wait(30)
    finally:
        if ex.poll() is None:
            ex.kill()
    _wait(lambda: not _alive(trainer_pid), 30, "the orphaned trainer to be stopped")
    out = tmp_path / "runs-t" / "long"
    assert (out / "last.pt").exists() and not (out / "manifest.json").exists()
    db = store.open_db(dbp)
    assert store.get_run(db, "long")["status"] == "running"  # stale: its executor died
    assert json.loads(store.get_run(db, "long")["flags"]) == {"sanity": "skipped"}
    assert "sanity step skipped" in next(iter(db.query("SELECT message FROM events WHERE kind = 'sanity'")))["message"]

    (result,) = run_matrix(mpath, dbp, poll_s=0.2, skip_sanity=True, log=lambda s: None)
    assert (result.status, result.how) == ("completed", "resumed")
    msgs = [r["message"] for r in db.query("SELECT message FROM events WHERE run_id = 'long' AND kind = 'status' "
                                           "ORDER BY id")]
    assert any(m.startswith("running -> interrupted") for m in msgs)
    assert [e for e, _ in store.curve(db, "long", "val_loss")] == list(range(1, 41))
    status = [json.loads(r["data"])["status"] for r in db.query(
        "SELECT data FROM events WHERE run_id = 'long' AND kind = 'trainer-status' ORDER BY id")]
    assert "resumed" in status and status[-1] == "complete"

    # the same run uninterrupted ends with the same bundle content
    ref = make_matrix(tmp_path, runs, epochs=40, name="ref")
    (plain,) = run_matrix(ref, tmp_path / "ref.db", poll_s=0.2, skip_sanity=True, log=lambda s: None)
    a = json.loads((out / "results.json").read_text())
    b = json.loads((tmp_path / "runs-ref" / "long" / "results.json").read_text())
    for key in ("test_cer", "best_val_loss", "best_epoch", "epochs_run"):
        assert a[key] == b[key], key
    assert (out / "test_predictions.jsonl").read_bytes() == \
        (tmp_path / "runs-ref" / "long" / "test_predictions.jsonl").read_bytes()
