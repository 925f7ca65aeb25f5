"""Thunder Train with real parts: a 2-rank MLX ring on 127.0.0.1 (``mlx.launch --backend ring``)
training a tiny llama-style model built here (HF_HUB_OFFLINE=1, no hub), metrics tailed into a
real WAL state.db, the watchdog stopping a rank that stops reporting, the AGP eval through a
real ``mlx_lm.server``, and the preflight over local hosts and a real sshd."""

from __future__ import annotations

import getpass
import json
import os
import signal
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from typer.testing import CliRunner

from state.store import open_db
from backend.thunder.config import SAFE_SHAPE, ConfigError, config_json, load_config, parse_config
from backend.thunder.launch import LaunchError, hostfile, latest_checkpoint, launch
from backend.thunder.monitor import Monitor, classify_failure
from backend.thunder.preflight import CODE, run_preflight
from state.adapters import add_metric_lines, get_adapter_run, log_event, series, set_status
from thunder_helpers import REPO, build_fixture, local_cluster

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_fixture(tmp_path_factory.mktemp("thunder_fx"))


def _alive(pid: int) -> bool:
    """True while ``pid`` runs (a zombie waiting to be reaped counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


# --------------------------------------------------------------------------- config


def test_defaults_are_the_safe_shape_and_config_names_bad_fields(tmp_path):
    cfg = load_config()  # the shipped configs/thunder/cluster.toml
    assert cfg.train.shape() == SAFE_SHAPE == {"batch_size": 1, "num_layers": 4, "lora_rank": 8,
                                               "learning_rate": 1e-6, "max_seq_length": 256}
    base = {"python": "/p", "workdir": "/w", "model": "/m", "data": "/d", "run_root": "/r",
            "hosts": [{"name": "a", "ssh": "a", "ip": "10.0.0.1"}, {"name": "b", "ssh": "b", "ip": "10.0.0.2"}]}
    assert parse_config(base).train.shape() == SAFE_SHAPE
    with pytest.raises(ConfigError, match=r"field 'hosts\.1\.ip'.*numeric IP"):
        parse_config({**base, "hosts": [base["hosts"][0], {"name": "b", "ssh": "b", "ip": "mac-b.local"}]})
    with pytest.raises(ConfigError, match=r"field 'model'.*absolute"):
        parse_config({**base, "model": "models/gemma"})
    with pytest.raises(ConfigError, match=r"field 'train\.batchsize'"):
        parse_config({**base, "train": {"batchsize": 2}})
    with pytest.raises(ConfigError, match=r"field 'hosts'"):
        parse_config({**base, "hosts": base["hosts"][:1]})


def test_agp_eval_gets_the_asr_run_for_acoustic_scores():
    """[eval] acoustic_run (the rows' ASR run on the hosts) reaches agp_eval as --acoustic-run,
    so the adapter's proposals are scored like every other proposer's."""
    from backend.thunder.monitor import agp_eval_args

    base = {"python": "/p", "workdir": "/w", "model": "/m", "data": "/d", "run_root": "/r",
            "hosts": [{"name": "a", "ssh": "a", "ip": "10.0.0.1"}, {"name": "b", "ssh": "b", "ip": "10.0.0.2"}],
            "eval": {"rows": "/runs/asr/test_predictions.jsonl"}}
    args = agp_eval_args(parse_config(base), "/r/x/adapters", "/r/x/agp_eval")
    assert "--acoustic-run" not in args and args[args.index("--rows") + 1] == "/runs/asr/test_predictions.jsonl"
    scored = parse_config({**base, "eval": {**base["eval"], "acoustic_run": "/runs/asr"}})
    args = agp_eval_args(scored, "/r/x/adapters", "/r/x/agp_eval")
    assert args[args.index("--acoustic-run") + 1] == "/runs/asr"
    with pytest.raises(ConfigError, match=r"field 'eval\.acoustic_run'.*absolute"):
        parse_config({**base, "eval": {**base["eval"], "acoustic_run": "work/demo/runs/x"}})


def test_hostfile_is_mlx_format_with_numeric_ips(tmp_path):
    from mlx._distributed_utils.common import Hostfile

    base = {"python": "/p", "workdir": "/w", "model": "/m", "data": "/d", "run_root": "/r",
            "hosts": [{"name": "a", "ssh": "mac-a", "ip": "169.254.1.1"},
                      {"name": "b", "kind": "local", "ip": "169.254.1.2"}]}
    hf = hostfile(parse_config(base))
    (tmp_path / "h.json").write_text(json.dumps(hf))
    parsed = Hostfile.from_file(tmp_path / "h.json")  # mlx.launch's own parser
    assert parsed.backend == "ring"
    assert [(h.ssh_hostname, h.ips) for h in parsed.hosts] == [("mac-a", ["169.254.1.1"]), ("127.0.0.1", ["169.254.1.2"])]
    assert "HF_HUB_OFFLINE=1" in parsed.envs


def test_metal_timeout_is_classified_with_the_safe_shape(fx, tmp_path):
    cfg = local_cluster(fx, tmp_path / "runs", tmp_path / "local", train={"batch_size": 2, "num_layers": 8})
    stderr = ("Iter 40: Train loss 2.113\nlibc++abi: terminating due to uncaught exception of type "
              "std::runtime_error: [METAL] Command buffer execution failed: Caused GPU Timeout Error "
              "(00000002:kIOGPUCommandBufferCallbackErrorTimeout)\n")
    kind, msg = classify_failure(stderr, {}, -6, cfg)
    assert kind == "metal_timeout"
    assert "batch 1, 4 LoRA layers, rank 8" in msg and "max seq 256" in msg and "batch 2, 8 LoRA layers" in msg
    assert classify_failure("Traceback...\nValueError: boom\n", {1: "ValueError: boom"}, 1, cfg) == \
        ("rank_error", "rank 1: ValueError: boom")
    assert classify_failure("killed\n", {}, 137, cfg)[0] == "launcher_exit"


def test_resume_picks_the_newest_checkpoint_across_attempts():
    listing = {"attempts": {"0": {"start_iteration": 0, "adapter_dir": "/r/x/adapters"},
                            "1": {"start_iteration": 200, "adapter_dir": "/r/x/adapters-resume1"}},
               "files": {"adapters/0000100_adapters.safetensors": {"path": "/r/x/adapters/0000100_adapters.safetensors"},
                         "adapters/0000200_adapters.safetensors": {"path": "/r/x/adapters/0000200_adapters.safetensors"},
                         "adapters-resume1/0000050_adapters.safetensors":
                             {"path": "/r/x/adapters-resume1/0000050_adapters.safetensors"},
                         "adapters/adapters.safetensors": {"path": "/r/x/adapters/adapters.safetensors"}}}
    assert latest_checkpoint(listing) == ("/r/x/adapters-resume1/0000050_adapters.safetensors", 250)
    assert latest_checkpoint({"attempts": {}, "files": {}}) is None


# --------------------------------------------------------------------------- preflight (local hosts)


def test_preflight_passes_on_a_good_cluster(fx, tmp_path):
    r = run_preflight(local_cluster(fx, tmp_path / "runs", tmp_path / "local"), reach_timeout=3)
    assert r.ok, r.table()
    assert {c.check for c in r.checks} >= {"ssh", "python", "code", "mlx", "mlx-lm", "listen", "reach", "model",
                                            "data", "eval rows"}
    assert [c.host for c in r.find("reach")] == ["b->a", "a->b"]
    assert "PASS" in r.table() and r.table().endswith("preflight PASSED")


def test_preflight_version_mismatch(fx, tmp_path):
    # host b's python sees another mlx-lm distribution first on its path
    shim = tmp_path / "shim"
    (shim / "mlx_lm-0.0.1.dist-info").mkdir(parents=True)
    (shim / "mlx_lm-0.0.1.dist-info" / "METADATA").write_text("Metadata-Version: 2.1\nName: mlx-lm\nVersion: 0.0.1\n")
    py = tmp_path / "python-b"
    py.write_text(f"#!/bin/sh\nPYTHONPATH={shim} exec {sys.executable} \"$@\"\n")
    py.chmod(0o755)
    hosts = [{"name": "a", "kind": "local", "ip": "127.0.0.1"},
             {"name": "b", "kind": "local", "ip": "127.0.0.1", "python": str(py)}]
    r = run_preflight(local_cluster(fx, tmp_path / "runs", tmp_path / "local", hosts=hosts), reach_timeout=3)
    assert not r.ok
    (row,) = r.find("mlx-lm")
    assert row.status == "FAIL" and "versions differ" in row.detail and "b 0.0.1" in row.detail
    assert r.find("mlx")[0].ok  # mlx itself is the same
    assert r.find("python")[0].status == "FAIL"  # and the launch would need one --python
    assert "FAIL    mlx-lm" in r.table()


def test_preflight_missing_model(fx, tmp_path):
    cfg = local_cluster(fx, tmp_path / "runs", tmp_path / "local", model=str(tmp_path / "no-such-model"))
    r = run_preflight(cfg, reach_timeout=3)
    (row,) = r.find("model")
    assert row.status == "FAIL" and "missing on a, b" in row.detail
    assert r.find("data")[0].ok and not r.ok


def test_preflight_unreachable_peer(fx, tmp_path):
    hosts = [{"name": "a", "kind": "local", "ip": "127.0.0.1"},
             {"name": "b", "kind": "local", "ip": "192.0.2.1"}]  # TEST-NET-1: not this machine, not routable
    r = run_preflight(local_cluster(fx, tmp_path / "runs", tmp_path / "local", hosts=hosts), reach_timeout=2)
    assert not r.ok
    (to_b,) = r.find("reach", "a->b")
    assert to_b.status == "FAIL" and "a cannot reach 192.0.2.1" in to_b.detail
    assert r.find("listen", "b")[0].status == "FAIL"  # b cannot listen on an address it does not own
    assert r.find("reach", "b->a")[0].ok


def test_preflight_compares_the_eval_code_too(fx, tmp_path):
    # host b's python sees another checkout: the same code plus stale bytecode (ignored), then
    # with one models/ file changed (what rank 0's AGP eval imports)
    import shutil

    copy = tmp_path / "checkout"
    for rel, _ in CODE:
        shutil.copytree(REPO / rel, copy / rel, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "agp" / "__pycache__").mkdir()
    (copy / "agp" / "__pycache__" / "corpus.cpython-312.pyc").write_bytes(b"other bytecode")
    py = tmp_path / "python-b"
    py.write_text(f'#!/bin/sh\nfor a in "$@"; do shift; if [ "$a" = "{REPO}" ]; then set -- "$@" "{copy}"; '
                  f'else set -- "$@" "$a"; fi; done\nexec {sys.executable} "$@"\n')
    py.chmod(0o755)
    hosts = [{"name": "a", "kind": "local", "ip": "127.0.0.1"},
             {"name": "b", "kind": "local", "ip": "127.0.0.1", "python": str(py)}]
    cfg = local_cluster(fx, tmp_path / "runs", tmp_path / "local", hosts=hosts)
    (row,) = run_preflight(cfg, reach_timeout=2).find("code")
    assert row.ok, row.detail
    assert "backend/thunder, agp, models, configs/agp identical" in row.detail

    with open(copy / "models" / "text.py", "a") as f:
        f.write("\n# edited on host b only\n")
    (copy / "configs" / "agp" / "gate.toml").write_text("version = 1\n")
    r = run_preflight(cfg, reach_timeout=2)
    (row,) = r.find("code")
    assert row.status == "FAIL" and not r.ok
    assert "code differs between hosts" in row.detail
    assert "configs/agp/gate.toml: a " in row.detail and "models/text.py: a " in row.detail

    shutil.rmtree(copy / "agp")
    (row,) = run_preflight(cfg, reach_timeout=2).find("code")
    assert row.status == "FAIL" and row.host == "b" and f"{REPO}/agp missing" in row.detail


def test_preflight_passes_nothing_it_could_not_run(fx, tmp_path):
    """Neither host answers over ssh: every check that needed them is SKIP or FAIL, none PASS."""
    import shutil

    from backend.localssh import free_port

    if not shutil.which("ssh"):
        pytest.skip("no ssh client")
    closed = free_port()  # nothing listens there
    hosts = [{"name": "a", "ssh": "127.0.0.1", "ip": "127.0.0.1"}, {"name": "b", "ssh": "127.0.0.1", "ip": "127.0.0.2"}]
    cfg = local_cluster(fx, tmp_path / "runs", tmp_path / "local", hosts=hosts,
                        ssh_options=["-p", str(closed), "-o", "BatchMode=yes", "-o", "ConnectTimeout=3"])
    r = run_preflight(cfg, reach_timeout=2)
    assert not r.ok
    assert [c for c in r.checks if c.ok] == [], r.table()
    assert "PASS" not in r.table()
    assert {c.status for c in r.find("ssh")} == {"FAIL"}
    (py,) = r.find("python")
    assert py.status == "SKIP" and "not run on a, b" in py.detail


# --------------------------------------------------------------------------- preflight over a real sshd


@pytest.fixture(scope="module")
def sshd(tmp_path_factory):
    """An ssh_config whose aliases thunder-a/thunder-b reach a real sshd on 127.0.0.1 and
    thunder-dead a port nobody listens on."""
    from vast_helpers import _start_sshd, free_port

    d = tmp_path_factory.mktemp("thunder-sshd")
    server = _start_sshd(d / "sshd")
    common = (f"  HostName 127.0.0.1\n  User {getpass.getuser()}\n  IdentityFile {server.client_key}\n"
              "  IdentitiesOnly yes\n  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n")
    (d / "ssh_config").write_text(f"Host thunder-a thunder-b\n  Port {server.port}\n{common}"
                                  f"Host thunder-dead\n  Port {free_port()}\n{common}")
    yield d / "ssh_config"
    server.stop()


@pytest.mark.sshd
def test_preflight_over_ssh(fx, tmp_path, sshd):
    hosts = [{"name": "a", "ssh": "thunder-a", "ip": "127.0.0.1"}, {"name": "b", "ssh": "thunder-b", "ip": "127.0.0.2"}]
    cfg = local_cluster(fx, tmp_path / "runs", tmp_path / "local", hosts=hosts, ssh_options=["-F", str(sshd)])
    r = run_preflight(cfg, reach_timeout=3)
    assert r.ok, r.table()
    assert "over ssh as thunder-a" in r.find("ssh", "a")[0].detail
    assert r.find("reach", "a->b")[0].detail == "a reaches 127.0.0.2:%d" % (cfg.starting_port + 1)

    hosts[1] = {"name": "b", "ssh": "thunder-dead", "ip": "127.0.0.2"}
    cfg = local_cluster(fx, tmp_path / "runs", tmp_path / "local", hosts=hosts, ssh_options=["-F", str(sshd)])
    r = run_preflight(cfg, reach_timeout=3)
    (row,) = r.find("ssh", "b")
    assert row.status == "FAIL" and "Connection refused" in row.detail
    assert r.find("reach", "a->b")[0].status == "SKIP" and r.find("model")[0].status == "SKIP"
    assert not r.ok


# --------------------------------------------------------------------------- the ring


def test_two_rank_ring_trains_records_and_evaluates(fx, tmp_path):
    cfg = local_cluster(fx, tmp_path / "runs", tmp_path / "local")
    db = open_db(tmp_path / "state.db")
    t0 = time.monotonic()
    started = launch(cfg, db, run_id="ring-1")
    status = Monitor(cfg, db, "ring-1", proc=started.proc).watch(max_s=300)
    elapsed = time.monotonic() - t0
    row = get_adapter_run(db, "ring-1")
    assert status == "completed", (row["error"], (started.local_dir / "launch.err.log").read_text()[-3000:])
    assert row["world_size"] == 2 and row["iteration"] == 6 and row["error"] is None

    # the hostfile mlx.launch used: both ranks on 127.0.0.1, numeric IPs
    hf = json.loads((started.local_dir / "hostfile.json").read_text())
    assert hf["backend"] == "ring" and [h["ips"] for h in hf["hosts"]] == [["127.0.0.1"], ["127.0.0.1"]]

    # metrics from both ranks, at the reporting iterations, from the callback's JSON lines
    for rank in (0, 1):
        assert [it for it, _ in series(db, "ring-1", "train_loss", rank)] == [2, 4, 6]
        assert len(series(db, "ring-1", "val_loss", rank)) >= 2
        names = {r["name"] for r in db.query("SELECT DISTINCT name FROM adapter_metrics WHERE adapter_run_id = ? "
                                             "AND rank = ?", ["ring-1", rank])}
        assert names >= {"train_loss", "learning_rate", "iterations_per_second", "tokens_per_second",
                         "peak_memory", "val_loss"}
    assert series(db, "ring-1", "learning_rate", 0)[0][1] == pytest.approx(1e-3)

    # rank 0 saved the adapter (and checkpoints); rank 1 saved no weights
    run_dir = Path(row["run_dir"])
    assert row["adapter_path"] == str(run_dir / "adapters")
    assert (run_dir / "adapters" / "adapters.safetensors").exists()
    assert (run_dir / "adapters" / "0000003_adapters.safetensors").exists()
    assert not list((run_dir / "rank1-scratch").glob("*.safetensors"))
    adapter_cfg = json.loads((run_dir / "adapters" / "adapter_config.json").read_text())
    assert adapter_cfg["lora_parameters"]["rank"] == 4 and adapter_cfg["num_layers"] == 2
    assert adapter_cfg["batch_size"] == 2  # 1 per rank x 2 ranks

    # artifacts hashed from the files themselves
    import hashlib

    arts = {a["name"]: a for a in db.query("SELECT * FROM artifacts WHERE owner_kind = 'adapter_run' AND run_id = ?",
                                           ["ring-1"])}
    assert {"adapters/adapters.safetensors", "adapters/adapter_config.json",
            "adapters/0000003_adapters.safetensors", "adapters/0000006_adapters.safetensors",
            "agp_eval/agp_eval.json"} <= set(arts)
    for a in arts.values():
        assert a["sha256"] == hashlib.sha256(Path(a["path"]).read_bytes()).hexdigest()

    # the AGP eval ran with the new adapter on the held-out split and is attached to the run
    ev = json.loads(row["agp_eval"])
    manifest = json.loads((fx["corpus"] / "corpus.json").read_text())
    test_ids = manifest["split_feat_ids"]["test"]  # error pairs and rows the ASR already got right
    n_correct = len(test_ids) - len(manifest["feat_ids"]["test"])
    assert n_correct >= 1
    assert ev["status"] == "completed" and ev["split"] == "test"
    assert ev["overall"]["rows"] == len(test_ids) and ev["overall"]["proposed"] == len(test_ids)
    assert ev["already_correct"]["rows"] == n_correct and ev["partition_source"] == manifest["partition_source"]
    assert ev["rows_sha256"] == manifest["rows_sha256"]
    assert ev["adapter_sha256"] == arts["adapters/adapters.safetensors"]["sha256"]
    proposals = [json.loads(x) for x in (run_dir / "agp_eval" / "proposals.jsonl").read_text().splitlines()]
    assert sorted(p["feat_id"] for p in proposals) == sorted(test_ids)

    events = [e["message"] for e in db.query("SELECT message FROM events WHERE adapter_run_id = ? ORDER BY id",
                                             ["ring-1"])]
    assert any("-> running" in m for m in events) and any("-> completed" in m for m in events)
    assert any(m.startswith("AGP eval on the held-out split") for m in events)

    # the CLI reads the same state
    from cli.root import app

    out = CliRunner().invoke(app, ["thunder", "status", "ring-1", "--db", str(tmp_path / "state.db")])
    assert out.exit_code == 0, out.output
    assert "ring-1: completed" in out.output and "rank 1: " in out.output and "AGP eval (held-out)" in out.output
    with pytest.raises(LaunchError, match="already exists"):
        launch(cfg, db, run_id="ring-1")
    print(f"\n2-rank ring, 6 iterations + AGP eval: {elapsed:.1f}s")


def _wait_for_reports(mon: Monitor, n: int, timeout: float = 120) -> None:
    db = mon.db
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        assert mon.poll() is None, get_adapter_run(db, mon.run_id)["error"]
        counts = dict(db.execute("SELECT rank, COUNT(*) FROM adapter_metrics WHERE adapter_run_id = ? AND "
                                 "name = 'train_loss' GROUP BY rank", [mon.run_id]).fetchall())
        if all(counts.get(r, 0) >= n for r in (0, 1)):
            return
        time.sleep(0.3)
    raise AssertionError("no train reports from both ranks")


def test_watchdog_stops_a_rank_that_stops_reporting(fx, tmp_path):
    window = 8.0
    cfg = local_cluster(fx, tmp_path / "runs", tmp_path / "local",
                        train={"iters": 100000, "steps_per_report": 1, "steps_per_eval": 100000, "save_every": 4},
                        watchdog={"window_s": window, "startup_window_s": 180, "poll_s": 0.5, "stop_grace_s": 2})
    db = open_db(tmp_path / "state.db")
    started = launch(cfg, db, run_id="hang-1")
    mon = Monitor(cfg, db, "hang-1", proc=started.proc)
    pids: dict[int, int] = {}
    try:
        _wait_for_reports(mon, 5)
        run_dir = Path(get_adapter_run(db, "hang-1")["run_dir"])
        pids = {r: int((run_dir / f"rank{r}.pid").read_text()) for r in (0, 1)}
        os.kill(pids[1], signal.SIGSTOP)  # rank 1 stalls; rank 0 then waits in the ring's all_sum
        stalled = time.monotonic()
        # a monitor that re-attaches (the launching shell went away) knows the ranks already
        # reported, so window_s applies, not the 180 s startup window
        mon = Monitor(cfg, db, "hang-1", proc=started.proc)
        assert mon.reporting == {0, 1}
        status = mon.watch(max_s=window + 60)
        detected = time.monotonic() - stalled
    finally:
        for pid in pids.values():  # never leave a stopped rank behind, whatever failed
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
    row = get_adapter_run(db, "hang-1")
    assert status == "hung" and row["status"] == "hung" and row["error_kind"] == "hung"
    assert "rank(s) 0" in row["error"] or "rank(s) 1" in row["error"]
    assert "1 (" in row["error"]  # the stalled rank is named
    assert window <= detected <= window + 20, detected
    time.sleep(0.5)
    assert not _alive(pids[0]) and not _alive(pids[1])
    assert started.proc.poll() is not None  # the launcher is gone too
    # what was saved before the hang is recorded, ready for a resume
    names = [a["name"] for a in db.query("SELECT name FROM artifacts WHERE run_id = 'hang-1'")]
    assert "adapters/0000004_adapters.safetensors" in names
    print(f"\nwatchdog: hang detected {detected:.1f}s after rank 1 stalled (window {window:g}s)")


# --------------------------------------------------------------------------- re-attaching


def _stamp(ago: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(time.time() - ago, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@pytest.fixture
def recorded_run(tmp_path):
    """A run recorded as running in state.db (as a launch left it), its launcher a live
    process the monitor will not touch, and a helper writing what an earlier monitor
    ingested: metrics lines (in the rank files and the store) and rank events."""
    import subprocess

    cfg = parse_config({"python": sys.executable, "workdir": str(REPO), "model": "/nonexistent/model",
                        "data": "/nonexistent/corpus", "run_root": str(tmp_path / "runs"),
                        "local_root": str(tmp_path / "local"),
                        "hosts": [{"name": "a", "kind": "local", "ip": "127.0.0.1"},
                                  {"name": "b", "kind": "local", "ip": "127.0.0.1"}],
                        "watchdog": {"window_s": 600, "startup_window_s": 1800, "stop_grace_s": 1},
                        "eval": {"enabled": False}}, "test")
    db = open_db(tmp_path / "state.db")
    run_dir = tmp_path / "runs" / "att-1"
    run_dir.mkdir(parents=True)
    (tmp_path / "local" / "att-1").mkdir(parents=True)
    launcher = subprocess.Popen(["sleep", "300"])

    def launched(attempt: int, ago: float) -> None:
        set_status(db, "att-1", "running", f"attempt {attempt}", run_dir=str(run_dir),
                   local_dir=str(tmp_path / "local" / "att-1"), attempt=attempt, world_size=2, iteration=0,
                   config=config_json(cfg), launcher_pid=launcher.pid, heartbeat_at=None)
        db.execute("UPDATE events SET ts = ? WHERE id = (SELECT max(id) FROM events)", [_stamp(ago)])
        db.conn.commit()

    def event(attempt: int, rank: int, kind: str, ago: float) -> None:
        log_event(db, "att-1", f"rank {rank}: {kind}", kind="rank", data={"kind": kind, "rank": rank, "attempt": attempt})
        db.execute("UPDATE events SET ts = ? WHERE id = (SELECT max(id) FROM events)", [_stamp(ago)])
        db.conn.commit()

    def ingested(attempt: int, ago: float, iteration: int) -> None:
        lines = [{"kind": "train", "rank": r, "attempt": attempt, "time": time.time() - ago, "iteration": iteration,
                  "train_loss": 2.0} for r in (0, 1)]
        offsets = {}
        for line in lines:
            path = run_dir / f"metrics.rank{line['rank']}.jsonl"
            with open(path, "a") as f:
                f.write(json.dumps(line) + "\n")
            offsets[str(line["rank"])] = path.stat().st_size
        add_metric_lines(db, "att-1", lines, offsets=offsets, iteration=iteration, heartbeat_at=_stamp(ago))

    yield SimpleNamespace(cfg=cfg, db=db, launched=launched, ingested=ingested, event=event,
                          path=str(tmp_path / "state.db"))
    launcher.kill()
    launcher.wait()


def test_monitor_reattached_to_a_run_hung_since_counts_from_its_last_report(recorded_run, monkeypatch):
    from cli.root import app
    from backend.thunder import monitor

    run = recorded_run
    run.launched(0, ago=3000)
    run.ingested(0, ago=900, iteration=40)  # both ranks reported, then nothing for 15 minutes
    # the wall clock stops here, so a slow machine still reads the ages as 900 s, not 901 s
    frozen = time.time()
    monkeypatch.setattr(monitor, "time", SimpleNamespace(time=lambda: frozen, monotonic=time.monotonic,
                                                         sleep=time.sleep))
    # nothing follows the run: `thunder status` says so from the store alone
    out = CliRunner().invoke(app, ["thunder", "status", "att-1", "--db", run.path])
    assert out.exit_code == 0, out.output
    assert "att-1: running" in out.output
    assert "STALE: no report recorded from rank(s) 0 (900s, window 600s), 1 (900s, window 600s)" in out.output
    listing = CliRunner().invoke(app, ["thunder", "status", "--db", run.path])
    assert "[STALE: past the watchdog window]" in listing.output
    as_json = json.loads(CliRunner().invoke(app, ["thunder", "status", "att-1", "--db", run.path, "--json"]).output)
    assert [x["rank"] for x in as_json["stale"]] == [0, 1]

    mon = Monitor(run.cfg, run.db, "att-1")
    assert mon.reporting == {0, 1}
    assert mon.poll() == "hung"  # at once, not 30 minutes (startup window) after re-attaching
    row = get_adapter_run(run.db, "att-1")
    assert row["status"] == "hung" and row["error_kind"] == "hung"
    assert "rank(s) 0 (900s, window 600s), 1 (900s, window 600s)" in row["error"]
    out = CliRunner().invoke(app, ["thunder", "status", "att-1", "--db", run.path])
    assert "att-1: hung" in out.output and "STALE" not in out.output


def test_monitor_reattached_to_a_resumed_run_ignores_the_earlier_attempt(recorded_run):
    from cli.root import app

    run = recorded_run
    run.launched(0, ago=3000)
    run.ingested(0, ago=2000, iteration=40)
    run.event(0, 0, "done", ago=1990)
    run.launched(1, ago=100)  # resumed from a checkpoint; its ranks are still loading
    run.event(1, 1, "start", ago=20)
    mon = Monitor(run.cfg, run.db, "att-1")
    assert mon.reporting == set() and mon.done == set()  # attempt 0's reports and done do not count
    age = {r: mon.clock() - seen for r, seen in mon.last_seen.items()}
    assert 95 <= age[0] <= 110 and 15 <= age[1] <= 30  # from the launch; rank 1 from its start line
    assert mon.poll() is None  # the startup window applies
    out = CliRunner().invoke(app, ["thunder", "status", "att-1", "--db", run.path])
    assert "att-1: running" in out.output and "STALE" not in out.output


def test_cli_launch_refuses_a_failed_preflight_and_reports_a_rank_error(fx, tmp_path):
    from cli.root import app

    cfg = local_cluster(fx, tmp_path / "runs", tmp_path / "local", data=str(tmp_path / "no-corpus"))
    path = tmp_path / "cluster.toml"
    path.write_text(_toml(cfg.model_dump()))
    db = str(tmp_path / "state.db")
    runner = CliRunner()
    out = runner.invoke(app, ["thunder", "launch", "--config", str(path), "--db", db, "--run-id", "bad-1"])
    assert out.exit_code == 1 and "not launching: preflight failed" in out.output, out.output
    assert "missing on a, b" in out.output
    assert get_adapter_run(open_db(db), "bad-1") is None

    # forced past the preflight, the ranks fail and say why; the monitor classifies it
    out = runner.invoke(app, ["thunder", "launch", "--config", str(path), "--db", db, "--run-id", "bad-1",
                              "--skip-preflight"])
    assert out.exit_code == 1, out.output
    row = get_adapter_run(open_db(db), "bad-1")
    assert row["status"] == "failed" and row["error_kind"] == "rank_error"
    assert "data directory not found" in row["error"] and "bad-1: failed (rank_error)" in out.output


@pytest.mark.slow
def test_resume_after_a_hang_continues_from_the_checkpoint(fx, tmp_path):
    cfg = local_cluster(fx, tmp_path / "runs", tmp_path / "local",
                        train={"iters": 100000, "steps_per_report": 1, "steps_per_eval": 100000, "save_every": 4},
                        watchdog={"window_s": 8, "startup_window_s": 180, "poll_s": 0.5, "stop_grace_s": 2},
                        eval={"enabled": False})
    db = open_db(tmp_path / "state.db")
    started = launch(cfg, db, run_id="res-1")
    mon = Monitor(cfg, db, "res-1", proc=started.proc)
    _wait_for_reports(mon, 5)
    run_dir = Path(get_adapter_run(db, "res-1")["run_dir"])
    os.kill(int((run_dir / "rank1.pid").read_text()), signal.SIGSTOP)
    assert mon.watch(max_s=80) == "hung"
    ckpts = sorted(run_dir.glob("adapters/*_adapters.safetensors"))
    last = int(ckpts[-1].name.split("_")[0])

    cfg2 = cfg.model_copy(update={"train": cfg.train.model_copy(update={"iters": last + 4, "steps_per_eval": 2})})
    again = launch(cfg2, db, resume="res-1")
    assert again.attempt == 1 and again.start_iteration == last
    acfg = json.loads((run_dir / "attempt1.json").read_text())
    assert acfg["resume_adapter_file"] == str(ckpts[-1]) and acfg["iters"] == 4
    assert Monitor(cfg2, db, "res-1", proc=again.proc).watch(max_s=200) == "completed"
    row = get_adapter_run(db, "res-1")
    assert row["attempt"] == 1 and row["iteration"] == last + 4
    assert row["adapter_path"] == str(run_dir / "adapters-resume1")
    assert (run_dir / "adapters-resume1" / "adapters.safetensors").exists()
    its = [it for it, _ in series(db, "res-1", "train_loss", 0)]
    assert its == sorted(set(its)) and its[-1] == last + 4 and last + 1 in its
    assert json.loads(row["agp_eval"])["status"] == "skipped"


@pytest.mark.slow
def test_cli_launch_detached_then_stop(fx, tmp_path):
    from cli.root import app

    cfg = local_cluster(fx, tmp_path / "runs", tmp_path / "local",
                        train={"iters": 100000, "steps_per_report": 1, "steps_per_eval": 100000, "save_every": 50})
    path = tmp_path / "cluster.toml"
    path.write_text(_toml(cfg.model_dump()))
    db = str(tmp_path / "state.db")
    runner = CliRunner()
    out = runner.invoke(app, ["thunder", "preflight", "--config", str(path)])
    assert out.exit_code == 0 and "preflight PASSED" in out.output, out.output
    out = runner.invoke(app, ["thunder", "launch", "--config", str(path), "--db", db, "--run-id", "cli-1",
                              "--detach", "--skip-preflight"])
    assert out.exit_code == 0, out.output
    conn = open_db(db)
    _wait_for_reports(Monitor(cfg, conn, "cli-1"), 3)
    run_dir = Path(get_adapter_run(conn, "cli-1")["run_dir"])
    pids = [int((run_dir / f"rank{r}.pid").read_text()) for r in (0, 1)]
    out = runner.invoke(app, ["thunder", "stop", "cli-1", "--db", db])
    assert out.exit_code == 0, out.output
    assert "ranks 0 stopped, 1 stopped" in out.output or "killed" in out.output or "gone" in out.output
    time.sleep(1)
    assert not any(_alive(p) for p in pids)
    assert get_adapter_run(conn, "cli-1")["status"] == "cancelled"
    out = runner.invoke(app, ["thunder", "status", "--db", db])
    assert "cli-1" in out.output and "cancelled" in out.output


def _toml(d: dict, prefix: str = "") -> str:
    """Just enough TOML for a cluster config dump (tables, arrays of tables, scalars, lists)."""
    scalars, tables, arrays = [], [], []
    for k, v in d.items():
        if v is None:
            continue
        if isinstance(v, dict):
            tables.append((k, v))
        elif isinstance(v, list) and v and isinstance(v[0], dict):
            arrays.append((k, v))
        else:
            scalars.append(f"{k} = {json.dumps(v)}")
    out = "\n".join(scalars) + "\n"
    for k, items in arrays:
        for item in items:
            out += f"\n[[{prefix}{k}]]\n" + "\n".join(f"{a} = {json.dumps(b)}" for a, b in item.items() if b is not None) + "\n"
    for k, v in tables:
        out += f"\n[{prefix}{k}]\n" + _toml(v, f"{prefix}{k}.")
    return out
