"""End to end on the emulated cloud: a one-run tiny matrix trains over SSH (real sshd, the
real trainer), syncs into the verified store, is auto-destroyed, and its cost is recorded;
the API key appears in no file. The recovery run (instance lost mid-run) is marked slow."""

from __future__ import annotations

import json
import os
import signal
import stat
import threading
import time
from pathlib import Path

import pytest

from train_helpers import build
from vast_helpers import tree_contains, write_user_configs

pytestmark = pytest.mark.sshd


def _matrix(tmp: Path, run_id: str, epochs: int) -> Path:
    cfg = build(tmp / "data", n=40)
    m = {"matrix_id": "vast-e2e", "snapshot": cfg["snapshot"], "split": cfg["split"], "features": cfg["features"],
         "out_root": str(tmp / "runs"),
         "defaults": {"model": {"preset": "tiny"}, "device": "cpu",
                      "train": {**cfg["train"], "epochs": epochs}, "ttt": cfg["ttt"]},
         "sanity": {"subset": {"train": 8, "val": 4, "test": 4}, "epochs": 1},
         "runs": [{"run_id": run_id, "script": "nko", "mode": "baseline", "seed": 7}]}
    path = tmp / "matrix.json"
    path.write_text(json.dumps(m, indent=1))
    return path


def _check_completed(env, run_id: str, out: Path) -> dict:
    from backend.runs import verify_bundle
    from models.bundle import BUNDLE_FILES

    row = env.db.execute("SELECT status, executor, instance_id, test_cer, heartbeat_at FROM runs WHERE id = ?",
                         [run_id]).fetchone()
    assert row[0] == "completed" and row[1] == "vast" and row[2] and row[3] is not None
    assert row[4]  # the remote runner's heartbeat reached state.db
    b = verify_bundle(out)
    assert b.ok, b.problems
    arts = {a["name"]: a for a in env.db.query("SELECT * FROM artifacts WHERE run_id = ?", [run_id])}
    for name in (*BUNDLE_FILES, "manifest.json", "metrics.jsonl", "last.pt"):
        a = arts[name]
        assert a["sync_state"] in ("verified", "mirrored"), (name, a["sync_state"])
        blob = env.fleet.cas.path(a["sha256"])
        assert not stat.S_IMODE(blob.stat().st_mode) & 0o222
        assert {loc["kind"] for loc in json.loads(a["locations"])} >= {"cas", "local", "instance"}
        assert (out / name).read_bytes() == blob.read_bytes()
    return arts


def test_matrix_on_emulated_cloud_end_to_end(vast_env, tmp_path):
    from backend.vast.cost import Ledger
    from backend.matrix_run import run_matrix

    from backend.vast.emulator import _processes_in

    run_id = "e2e-nko-baseline"
    matrix = _matrix(tmp_path, run_id, epochs=2)
    lines: list[str] = []
    key = vast_env.api_key.encode()
    in_flight: list = []

    def log(line: str) -> None:
        lines.append(line)
        if "checkpoint sync" in line and not in_flight:  # while it trains: the remote side holds no key
            in_flight.append(tree_contains(vast_env.remote_base, key))
            for pid, cmd in _processes_in(vast_env.remote_base):
                try:
                    env = Path(f"/proc/{pid}/environ").read_bytes()
                except OSError:
                    continue
                in_flight.append([cmd] if key in env or key in cmd.encode() else [])

    # sync at the first poll after the start: the tiny run can finish within the fixture's 3 s
    # sync interval on a quiet machine, and the in-flight check needs a sync while it trains
    settings = vast_env.settings.model_copy(update={"sync_every_s": 0.5})
    t0 = time.monotonic()
    results = run_matrix(matrix, vast_env.tmp / "state" / "state.db", executor="vast", skip_sanity=True, poll_s=0.5,
                              log=log, settings=settings, budget=vast_env.budget,
                              provider=vast_env.provider)
    assert [r.status for r in results] == ["completed"], "\n".join(lines[-20:]) + str(results)
    assert time.monotonic() - t0 < 120
    out = tmp_path / "runs" / run_id
    _check_completed(vast_env, run_id, out)

    # auto-destroyed, and nothing else left running on the account
    assert vast_env.provider.instances() == []
    iid = vast_env.db.execute("SELECT instance_id FROM runs WHERE id = ?", [run_id]).fetchone()[0]
    assert vast_env.cloud.gone[int(iid)] == "destroyed"
    assert vast_env.db.execute("SELECT destroyed_at FROM instances WHERE id = ?", [iid]).fetchone()[0]

    # cost recorded, never less than the cloud billed
    ledger = Ledger(vast_env.db, vast_env.budget)
    assert ledger.run_spend(run_id) > 0
    assert ledger.spent() >= vast_env.cloud.billed() - 1e-9 > 0
    assert vast_env.db.execute("SELECT count(*) FROM cost_samples WHERE run_id = ?", [run_id]).fetchone()[0] >= 2

    # live logs and metrics reached state.db while it trained
    assert vast_env.db.execute("SELECT count(*) FROM events WHERE run_id = ? AND kind = 'log'", [run_id]).fetchone()[0]
    assert vast_env.db.execute("SELECT count(*) FROM metrics WHERE run_id = ? AND kind = 'epoch'",
                               [run_id]).fetchone()[0]
    kinds = {k for (k,) in vast_env.db.execute("SELECT DISTINCT kind FROM events WHERE run_id = ?", [run_id])}
    assert {"remote-start", "sync", "instance-destroyed", "run-cost"} <= kinds

    # the API key is in no file: state dir, state.db (+WAL), run dirs, logs, the remote disks,
    # nor in the environment or command line of anything running on the instance
    assert in_flight and all(hit == [] for hit in in_flight), in_flight
    assert tree_contains(tmp_path, key) == []
    assert tree_contains(vast_env.settings.state_dir, key) == []

    # running the matrix again reuses the verified bundle and rents nothing
    before = len(vast_env.cloud.gone)
    again = run_matrix(matrix, vast_env.tmp / "state" / "state.db", executor="vast", skip_sanity=True, poll_s=0.5,
                            log=lines.append, settings=vast_env.settings, budget=vast_env.budget,
                            provider=vast_env.provider)
    assert [(r.status, r.how) for r in again] == [("completed", "reused")]
    assert len(vast_env.cloud.gone) == before and vast_env.provider.instances() == []


@pytest.mark.slow
def test_lost_instance_is_relaunched_and_resumes(vast_env, tmp_path):
    """The instance vanishes after a checkpoint was synced: the run relaunches on another
    offer with its last verified checkpoint, resumes, and finishes with the same bundle."""
    from backend.matrix_run import run_matrix

    run_id = "e2e-recover"
    matrix = _matrix(tmp_path, run_id, epochs=8)
    vast_env.settings.sync_every_s = 1.0
    with _HostDiesAtFirstCheckpoint(vast_env, run_id) as host:
        results = run_matrix(matrix, vast_env.tmp / "state" / "state.db", executor="vast", skip_sanity=False,
                             poll_s=0.5, log=host.log, settings=vast_env.settings, budget=vast_env.budget,
                             provider=vast_env.provider)
    vanished, lines = host.vanished, host.lines
    assert vanished, "\n".join(lines[-30:])
    assert [r.status for r in results] == ["completed"], "\n".join(lines[-30:]) + str(results)
    _check_completed(vast_env, run_id, tmp_path / "runs" / run_id)
    events = [m for (m,) in vast_env.db.execute("SELECT message FROM events WHERE run_id = ? AND kind IN "
                                                "('recovery', 'trainer-status')", [run_id])]
    assert any("lost" in m for m in events) and "resumed" in events
    assert vast_env.provider.instances() == []
    flags = json.loads(vast_env.db.execute("SELECT flags FROM runs WHERE id = ?", [run_id]).fetchone()[0])
    assert flags["recoveries"] == 1 and flags["sanity"] == "passed"
    assert tree_contains(tmp_path, vast_env.api_key.encode()) == []


class _PauseAtFirstCheckpoint(threading.Thread):
    """Freezes (SIGSTOP) the trainer of ``run_id`` as soon as its first last.pt is on the
    instance's disk, so the run is cut off part way whatever the machine's speed."""

    def __init__(self, env, run_id: str):
        super().__init__(daemon=True)
        self.env, self.run_id, self.paused, self.done = env, run_id, threading.Event(), threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for iid in list(self.env.cloud.instances):
                d = self.env.instance_dir(iid)
                if (d / "runs" / self.run_id / "last.pt").exists():
                    runner = json.loads((d / "ctl" / self.run_id / "runner.json").read_text())
                    os.kill(runner["trainer_pid"], signal.SIGSTOP)
                    self.paused.set()
                    return
            time.sleep(0.005)


class _HostDiesAtFirstCheckpoint:
    """The run's host vanishes once its first last.pt is verified locally. The trainer is
    frozen at that checkpoint (so a fast machine cannot finish the run inside one sync
    interval first); vanishing the instance kills it. Use ``log`` as the executor's log."""

    def __init__(self, env, run_id: str):
        self.env, self.run_id = env, run_id
        self.vanished: list[int] = []
        self.lines: list[str] = []
        self.pause = _PauseAtFirstCheckpoint(env, run_id)

    def __enter__(self) -> "_HostDiesAtFirstCheckpoint":
        self.pause.start()
        return self

    def __exit__(self, *exc) -> None:
        self.pause.done.set()

    def log(self, line: str) -> None:
        self.lines.append(line)
        if self.pause.paused.is_set() and not self.vanished and "checkpoint sync" in line and self.env.db.execute(
                "SELECT 1 FROM artifacts WHERE run_id = ? AND name = 'last.pt' AND sync_state = 'verified'",
                [self.run_id]).fetchone():
            iid = next(iter(self.env.cloud.instances))
            self.vanished.append(iid)
            self.env.cloud.vanish(iid)


@pytest.mark.slow
def test_rerun_after_a_failed_relaunch_resumes_from_the_store(vast_env, tmp_path):
    """The instance vanishes after a checkpoint was verified and no relaunch is allowed, so
    the run fails with no last.pt in its local directory. Running the matrix again resumes
    from the verified checkpoint in the store instead of training from scratch."""
    from backend.matrix_run import run_matrix

    run_id = "e2e-rerun"
    matrix = _matrix(tmp_path, run_id, epochs=8)
    vast_env.settings.sync_every_s = 1.0
    vast_env.settings.max_recoveries = 0
    db = vast_env.tmp / "state" / "state.db"
    kw = {"poll_s": 0.5, "settings": vast_env.settings, "budget": vast_env.budget, "provider": vast_env.provider}
    with _HostDiesAtFirstCheckpoint(vast_env, run_id) as host:
        first = run_matrix(matrix, db, executor="vast", skip_sanity=True, log=host.log, **kw)
    vanished, lines = host.vanished, host.lines
    assert vanished and [r.status for r in first] == ["failed"], "\n".join(lines[-30:]) + str(first)
    assert "giving up" in first[0].error and not (tmp_path / "runs" / run_id / "last.pt").exists()

    vast_env.settings.max_recoveries = 2
    again = run_matrix(matrix, db, executor="vast", skip_sanity=True, log=lines.append, **kw)
    assert [(r.status, r.how) for r in again] == [("completed", "resumed")], "\n".join(lines[-30:]) + str(again)
    _check_completed(vast_env, run_id, tmp_path / "runs" / run_id)
    [resumed] = [json.loads(d) for (d,) in vast_env.db.execute(
        "SELECT data FROM events WHERE run_id = ? AND kind = 'trainer-status' AND message = 'resumed'", [run_id])]
    assert resumed["epoch"] >= 1  # continued after the verified checkpoint's epoch
    starts = [m for (m,) in vast_env.db.execute("SELECT message FROM events WHERE run_id = ? AND kind = "
                                                "'remote-start' ORDER BY id", [run_id])]
    assert len(starts) == 2 and "(resuming)" in starts[1]
    assert vast_env.provider.instances() == []


@pytest.mark.slow
def test_cli_launch_detach_logs_and_reattach_with_an_odd_run_id(vast_env, tmp_path):
    """`vast launch --config --detach` with a run id full of shell syntax is refused (one run id
    pattern, issue 11); with an odd but legal one: `vast logs`, then `vast launch` again
    re-attaches, finishes, verifies and auto-destroys."""
    from typer.testing import CliRunner

    from cli.root import app
    from backend.vast import remote as rmt

    settings, budget = write_user_configs(vast_env, tmp_path, 'heartbeat_s = 0.5\nsync_every_s = 2.0\n'
                                                              '[remote_env]\nOMP_NUM_THREADS = "1"')
    common = ["--db", str(vast_env.tmp / "state" / "state.db"), "--settings", str(settings), "--budget", str(budget)]
    runner = CliRunner()
    cfg = build(tmp_path / "data", n=40)
    hostile = "it's a \"run\"; touch PWNED & $(x)"
    cfg.update(run_id=hostile, out_dir=str(tmp_path / "runs" / "hostile"))
    (tmp_path / "run.json").write_text(json.dumps(cfg, ensure_ascii=False))
    r = runner.invoke(app, ["vast", "launch", "--config", str(tmp_path / "run.json"), "--detach", *common])
    assert r.exit_code == 2 and "run_id" in r.output and vast_env.provider.instances() == [], r.output

    run_id = "odd.run+id_-1"
    cfg.update(run_id=run_id, out_dir=str(tmp_path / "runs" / run_id))
    cfg["train"]["epochs"] = 2
    (tmp_path / "run.json").write_text(json.dumps(cfg, ensure_ascii=False))
    r = runner.invoke(app, ["vast", "launch", "--config", str(tmp_path / "run.json"), "--detach", *common],
                      catch_exceptions=False)
    assert r.exit_code == 0 and "running" in r.stdout, r.stdout
    [row] = vast_env.provider.instances()
    # the backstop left behind: the runner's lease runs to the budget's runway ($50 cap: far off)
    lease = json.loads((vast_env.instance_dir(row.id) / "ctl" / "lease.json").read_text())
    assert lease["until"] > time.time() + 3600
    fleet = vast_env.fresh_fleet()
    st = fleet.stager(row)
    deadline = time.monotonic() + 120
    while rmt.status(st.remote, st.layout, run_id, st.python)["exit"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.5)
    r = runner.invoke(app, ["vast", "logs", run_id, *common], catch_exceptions=False)
    assert r.exit_code == 0 and "epoch" in r.stdout
    r = runner.invoke(app, ["vast", "launch", "--config", str(tmp_path / "run.json"), *common],
                      catch_exceptions=False)
    assert r.exit_code == 0 and "completed" in r.stdout, r.stdout
    assert vast_env.provider.instances() == []
    _check_completed(vast_env, run_id, tmp_path / "runs" / run_id)
    assert not list(tmp_path.rglob("PWNED")) and not Path("PWNED").exists()
    fleet.close()


def test_matrix_cli_dispatches_to_vast_and_needs_a_key(tmp_path, monkeypatch):
    """`nko-ops matrix run FILE --executor vast` reaches the Vast executor, which refuses
    cleanly (nothing rented, no traceback) when no API key is configured."""
    from typer.testing import CliRunner

    from cli.root import app

    matrix = _matrix(tmp_path, "dispatch-run", epochs=1)
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    r = CliRunner().invoke(app, ["matrix", "run", str(matrix), "--executor", "vast", "--db",
                                 str(tmp_path / "state.db")])
    assert r.exit_code == 2 and "no Vast API key" in r.output, r.output
    assert not (tmp_path / "runs" / "dispatch-run").exists()


def test_vast_executor_refuses_parallel_below_one(tmp_path, monkeypatch):
    """`--executor vast --parallel 0` would never launch anything and loop forever: refused
    up front, before any key or instance is needed."""
    from typer.testing import CliRunner

    from cli.root import app
    from backend.executor import ExecutorError
    from backend.matrix_run import run_matrix

    matrix = _matrix(tmp_path, "parallel-run", epochs=1)
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    with pytest.raises(ExecutorError, match=r"--parallel must be at least 1 \(got 0\)"):
        run_matrix(matrix, tmp_path / "state.db", executor="vast", parallel=0)
    r = CliRunner().invoke(app, ["matrix", "run", str(matrix), "--executor", "vast", "--parallel", "0", "--db",
                                 str(tmp_path / "state.db")])
    assert r.exit_code == 2 and "--parallel must be at least 1" in r.output, r.output
    assert not (tmp_path / "runs" / "parallel-run").exists()
