"""Issue 11: the data-loss and money-loss paths found under test, one regression test per
numbered item, on the emulator through the real SDK / CLI and a real sshd where they are
involved, plus the budget simulation (>= 1,000 randomised cases)."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from vast_helpers import write_remote

ROOT = Path(__file__).resolve().parents[2]
HELPER = ROOT / "backend" / "vast" / "remote_helper.py"


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def events(env, kind: str, iid=None) -> list[dict]:
    sql, args = "SELECT * FROM events WHERE kind = ?", [kind]
    if iid is not None:
        sql, args = sql + " AND instance_id = ?", args + [str(iid)]
    return list(env.db.query(sql + " ORDER BY id", args))


def start_runner(env, row, run_id: str, argv: list[str], extra_env: dict | None = None,
                 lease_grace: float | None = None) -> str:
    """Start the helper's runner (as start_trainer does) around ``argv`` on the instance;
    returns its ctl directory (local path: the instance's disk is on this machine)."""
    from backend.vast.ssh import quote

    fleet = env.fleet
    st = fleet.stager(row)
    ctl, run_dir = st.layout.ctl_dir(run_id), st.layout.run_dir(run_id)
    st.remote.makedirs(ctl)
    st.remote.makedirs(run_dir)
    fleet.mark_trainer(row.id, run_id)
    envs = " ".join(quote(f"{k}={v}") for k, v in (extra_env or {}).items())
    line = (f"cd {quote(st.layout.root)} && nohup setsid env {envs} {quote(sys.executable)} {quote(st.layout.helper)}"
            f" runner {quote(ctl)} 0.2" + (f" --lease-grace {lease_grace:g}" if lease_grace is not None else "")
            + " -- " + " ".join(quote(a) for a in argv) + f" > {quote(ctl + '/runner.out')} 2>&1 < /dev/null &")
    st.remote.run_line(line, timeout=60).check("start runner")
    deadline = time.monotonic() + 20
    while not Path(ctl, "runner.json").exists():
        assert time.monotonic() < deadline, "runner did not start"
        time.sleep(0.05)
    return ctl


# --------------------------------------------------------------------------- 1. hidden / temporary files


def test_1_hidden_temporary_and_dot_directory_files_are_synced_before_a_destroy(vast_env):
    row = vast_env.new_instance("run-h", "run-h")
    iid = row.id
    vast_env.fleet.mark_trainer(iid, "run-h")
    files = {"run-h/.hydra/config.yaml": b"lr: 0.001\n", "run-h/.notes.txt": b"remember\n",
             "run-h/sub/.cache/x.bin": os.urandom(3000), "run-h/preds.part": b"partial preds\n",
             "run-h/eval.tmp": b"tmp eval\n", "run-h/last.pt": os.urandom(5000),
             ".dotrun/weights.pt": b"a run whose id starts with a dot\n"}
    for rel, data in files.items():
        write_remote(vast_env, iid, rel, data)
    o = vast_env.fleet.destroy(iid)
    assert o.destroyed, str(o)
    for rel, data in files.items():  # every one of them is in the verified store
        assert vast_env.fleet.cas.has(sha(data), verify=True), rel
    assert vast_env.provider.instance(iid) is None


def test_1_run_ids_follow_one_pattern_wherever_they_enter(tmp_path):
    from models.config import ConfigError, parse_config
    from models.runid import run_id_problem

    for bad in (".hidden", "../x", "a/b", "", " a", "a b", "é", "a\n", "-x", "x" * 129):
        assert run_id_problem(bad), bad
    for good in ("demo-nko-baseline", "r1", "a.b_c+d-e", "x" * 128):
        assert run_id_problem(good) is None, good
    cfg = {"run_id": ".hidden", "script": "nko", "mode": "baseline", "snapshot": "s", "split": "s.json",
           "features": "f", "out_dir": "o"}
    with pytest.raises(ConfigError, match="run_id"):
        parse_config(cfg)
    from typer.testing import CliRunner

    from cli.root import app

    for verb in (["vast", "logs", "../etc"], ["vast", "sync", ".hidden"]):
        r = CliRunner().invoke(app, [*verb, "--db", str(tmp_path / "state.db")])
        assert r.exit_code == 2 and "run id" in r.output and "Traceback" not in r.output, r.output
        assert not (tmp_path / "state.db").exists()  # refused before anything was opened


# --------------------------------------------------------------------------- 2. trainer still writing

TRAINER = r"""
import os, signal, sys, time
out, n, stop = sys.argv[1], 0, []
if sys.argv[2] == "term-ok":
    signal.signal(signal.SIGTERM, lambda s, f: stop.append(1))
else:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a trainer that ignores SIGTERM
while not stop:
    n += 1
    with open(out + ".tmp", "wb") as f:
        f.write(b"step %d " % n * 500)
    os.replace(out + ".tmp", out)
    time.sleep(0.005)
with open(out + ".tmp", "wb") as f:
    f.write(b"final checkpoint after %d steps" % n)
os.replace(out + ".tmp", out)
"""


@pytest.mark.parametrize("behaviour", ["term-ok", "ignores-term"])
def test_2_the_trainer_is_stopped_and_its_exit_confirmed_before_the_final_sync(vast_env, tmp_path, behaviour):
    vast_env.settings.stop_wait_s = 1.0
    row = vast_env.new_instance("run-w", "run-w")
    iid = row.id
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    last = vast_env.instance_dir(iid) / "runs" / "run-w" / "last.pt"
    ctl = start_runner(vast_env, row, "run-w", [sys.executable, str(script), str(last), behaviour])
    deadline = time.monotonic() + 20
    while not last.exists():
        assert time.monotonic() < deadline
        time.sleep(0.02)
    o = vast_env.fleet.destroy(iid)  # writing every 5 ms until it is stopped
    assert o.destroyed, str(o)
    stopped = events(vast_env, "trainer-stopped", iid)
    assert stopped and stopped[0]["data"] and json.loads(stopped[0]["data"])["runs"]["run-w"]["exited"]
    rows = list(vast_env.db.query("SELECT sha256, sync_state FROM artifacts WHERE run_id = 'run-w' AND name = "
                                  "'last.pt'"))
    assert rows and rows[0]["sync_state"] == "verified"
    kept = vast_env.fleet.cas.path(rows[0]["sha256"]).read_bytes()
    if behaviour == "term-ok":  # the checkpoint it wrote on its way out is the one saved
        assert kept.startswith(b"final checkpoint after")
    else:  # killed after stop_wait_s: the last complete version it wrote is saved
        assert kept.startswith(b"step ")
    assert not Path(ctl).exists()  # the instance (and its disk) is gone


# --------------------------------------------------------------------------- 3. non-UTF-8 names


def test_3_a_non_utf8_file_name_refuses_the_destroy_naming_the_file(vast_env):
    row = vast_env.new_instance("run-u", "run-u")
    iid = row.id
    vast_env.fleet.mark_trainer(iid, "run-u")
    write_remote(vast_env, iid, "run-u/train.log", b"epoch 1\n")
    bad = os.fsencode(vast_env.instance_dir(iid) / "runs" / "run-u") + b"/preds\xff.jsonl"
    with open(bad, "wb") as f:
        f.write(b"rows\n")
    o = vast_env.fleet.destroy(iid)
    assert not o.destroyed and "preds\\xff.jsonl" in o.reason and "not UTF-8" in o.reason, o.reason
    assert vast_env.provider.instance(iid) is not None
    # kill-idle and the executor's retire go through the same refusal: no exception either
    assert vast_env.fleet.retire(iid, "test").destroyed is False
    os.rename(bad, bad.replace(b"\xff", b"_"))  # renamed on the instance: now it is saved and destroyed
    o = vast_env.fleet.destroy(iid)
    assert o.destroyed and vast_env.fleet.cas.has(sha(b"rows\n"))


# --------------------------------------------------------------------------- 4. the cap during a boot wait


def test_4_the_cap_is_enforced_on_its_own_timer_during_a_boot_wait(vast_env):
    from backend.executor import Stop, drive
    from backend.vast.executor import VastExecutor

    busy = vast_env.new_instance("run-x", "run-x")  # already billing
    vast_env.cloud.boot_s = 25.0  # the next instance takes 25 s to boot: the executor waits for it
    budget = {"poll_interval_s": 2.0}
    fleet = vast_env.fresh_fleet(**budget, cap_usd=50.0, warn_usd=0.0)
    rows, state = fleet.poll(enforce=False)
    fleet_rate = sum(r.rate for r in rows) + 0.4  # and the instance about to start (at most $0.4/h)
    cap = state.spent_usd + 3 * fleet_rate * 2.0 / 3600
    fleet = vast_env.fresh_fleet(**budget, cap_usd=cap, warn_usd=0.0)
    run = vast_env.vast_run(fleet, "run-boot")
    t0 = time.monotonic()
    vex = VastExecutor(fleet, run.ex, None, run.wheel, 0.2, vast_env.logs.append)
    results = drive(vex, [run.job], 1, 0.2, Stop(), vast_env.logs.append)
    took = time.monotonic() - t0
    assert took < 20, took  # not the 25 s boot: the guard stopped it
    assert results and results[0].status in ("failed", "blocked")
    assert "budget cap reached" in (results[0].error or ""), results[0].error
    # both destroyed (nothing on them to lose), or stopped where the destroy missed the deadline
    assert all(r.status == "stopped" for r in vast_env.provider.instances())
    billed = vast_env.cloud.billed()
    allowance = 2.0 / 3600 * (sum(r.rate for r in [busy]) + 0.4)
    assert billed <= cap + allowance, (billed, cap, allowance)
    assert events(vast_env, "budget-over")


# --------------------------------------------------------------------------- 5. strict budgets, the backstop


def test_5_budget_files_are_strict(tmp_path):
    from pydantic import ValidationError

    from backend.vast.config import BudgetSettings, VastConfigError, load_budget

    p = tmp_path / "budget.toml"
    with pytest.raises(VastConfigError, match="budget file not found"):
        load_budget(p)
    cases = {
        "": "field 'budget': required",
        "[budgett]\ncap_usd = 5": "field 'budgett': unknown field (known: budget)",
        "cap_usd = 5": "field 'cap_usd': unknown field (known: budget)",
        "[budget]\nwarn_usd = 1": "field 'budget.cap_usd': required",
        "[budget]\ncap_usd = inf": "field 'budget.cap_usd': must be a finite number, got inf",
        "[budget]\ncap_usd = nan": "must be a finite number",
        "[budget]\ncap_usd = -1": "must be positive",
        "[budget]\ncap_usd = 5\ncap = 6": "field 'budget.cap': unknown field (known: cap_usd, name, poll_interval_s, warn_usd)",
        "[budget]\ncap_usd = 5\n[extra]\nx = 1": "field 'extra': unknown field (known: budget)",
        "[budget]\ncap_usd = 5\npoll_interval_s = inf": "must be a finite number",
        "budget = 3": "field 'budget': must be a table",
    }
    for text, want in cases.items():
        p.write_text(text + "\n")
        with pytest.raises(VastConfigError) as e:
            load_budget(p)
        assert str(e.value).startswith(str(p)) and want in str(e.value), (text, str(e.value))
    p.write_text("[budget]\ncap_usd = 10\n")
    b = load_budget(p)
    assert (b.cap_usd, b.warn_usd) == (10, 8)
    with pytest.raises(ValidationError, match="finite"):  # built in code: pydantic's own error
        BudgetSettings(cap_usd=float("inf"))


def test_5_runway_is_when_the_budget_runs_out_at_the_fleet_rate():
    from backend.vast.cost import BudgetState
    from backend.vast.guard import MAX_LEASE_S, runway_until

    s = BudgetState(spent_usd=1.0, fleet_usd_per_h=2.0, cap_usd=3.0, warn_usd=2.0, poll_interval_s=360.0)
    assert runway_until(s, 100.0) == pytest.approx(100.0 + (3.0 - 1.0 - 0.2) / 2.0 * 3600)
    assert runway_until(BudgetState(5.0, 2.0, 3.0, 2.0, 60.0), 100.0) == 100.0
    assert runway_until(BudgetState(0.0, 0.0, 3.0, 2.0, 60.0), 100.0) == 100.0 + MAX_LEASE_S


def test_5_the_instance_stops_its_trainer_and_itself_when_its_lease_runs_out(vast_env, tmp_path):
    """The server-side backstop, with no executor at all: the runner reads the lease, stops
    the trainer once it has passed, and stops the instance with the instance's own key."""
    from backend.vast.guard import write_lease

    row = vast_env.new_instance("run-l", "run-l")
    iid = row.id
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    last = vast_env.instance_dir(iid) / "runs" / "run-l" / "last.pt"
    write_lease(vast_env.fleet, row, time.time() + 8)
    ctl = Path(start_runner(vast_env, row, "run-l", [sys.executable, str(script), str(last), "term-ok"],
                            {"CONTAINER_ID": iid, "CONTAINER_API_KEY": vast_env.cloud.container_key(iid),
                             "VAST_SERVER_URL": vast_env.emulator.url}, lease_grace=0))
    write_lease(vast_env.fleet, row, time.time() + 3)  # renewed (shorter: the budget's runway shrank)
    time.sleep(1.0)
    assert not (ctl / "exit.json").exists()  # still within its lease
    deadline = time.monotonic() + 20  # then nobody renews it
    while vast_env.cloud.instances[int(iid)]["actual_status"] != "stopped":
        assert time.monotonic() < deadline, "the instance did not stop itself"
        time.sleep(0.1)
    ex = json.loads((ctl / "exit.json").read_text())
    assert ex["reason"] == "lease-expired"
    assert last.read_bytes().startswith(b"final checkpoint")  # the trainer left through SIGTERM
    # its own key may stop it, nothing else: no destroy, no other instance
    import requests

    key = vast_env.cloud.container_key(iid)
    r = requests.delete(f"{vast_env.emulator.url}/api/v0/instances/{iid}/", headers={"Authorization": f"Bearer {key}"})
    assert r.status_code == 403 and int(iid) in vast_env.cloud.instances


def test_5_each_guard_tick_renews_the_leases_to_the_budgets_runway(vast_env):
    from state.store import db_path
    from backend.vast.guard import BudgetGuard, runway_until

    row = vast_env.new_instance("run-g", "run-g")
    vast_env.fleet.mark_trainer(row.id, "run-g")
    other = vast_env.new_instance("run-n", "run-n")  # no trainer on it: no lease
    guard = BudgetGuard(db_path(vast_env.db), vast_env.settings, vast_env.budget, vast_env.provider,
                        log=vast_env.logs.append)
    try:
        t0 = time.time()
        state = guard.tick()
        lease = json.loads((vast_env.instance_dir(row.id) / "ctl" / "lease.json").read_text())
        assert not state.over and not guard.over.is_set()
        assert abs(lease["until"] - runway_until(state, t0)) < 30
        assert not (vast_env.instance_dir(other.id) / "ctl" / "lease.json").exists()
    finally:
        guard.stop()


# --------------------------------------------------------------------------- 6. opening the state store


def _cli(*args: str):
    from typer.testing import CliRunner

    from cli.root import app

    return CliRunner().invoke(app, list(args))


def test_6_state_store_opening_failures_are_one_line_errors(tmp_path):
    from state.store import open_db

    corrupt = tmp_path / "corrupt.db"
    corrupt.write_bytes(b"not sqlite " * 500)
    newer = tmp_path / "newer.db"
    db = open_db(newer)
    db.conn.execute("PRAGMA user_version = 99")
    db.close()
    directory = tmp_path / "dir.db"
    directory.mkdir()
    rows = tmp_path / "rows.jsonl"
    rows.write_text("")
    for path, want in ((corrupt, "not a readable state store"), (newer, "schema version 99 is newer"),
                       (directory, "is a directory")):
        before = sorted(p.name for p in tmp_path.iterdir())
        for verb in (["runs", "list"], ["agp", "gate", "--rows", str(rows), "--proposals", str(rows),
                                        "--out", str(tmp_path / "d.jsonl")]):
            r = _cli(*verb, "--db", str(path))
            assert r.exit_code == 2, (verb, path, r.output)
            line = r.output.strip()
            assert "\n" not in line and str(path) in line and want in line and "Traceback" not in r.output, line
        assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing written
    r = _cli("agp", "gate", "--rows", str(tmp_path), "--proposals", str(rows), "--out", str(tmp_path / "d.jsonl"),
             "--no-db")
    assert r.exit_code == 2 and str(tmp_path) in r.output and "Traceback" not in r.output, r.output


def test_6_read_only_commands_browse_a_store_on_a_read_only_disk(tmp_path):
    from state.store import open_db

    mnt = tmp_path / "ro"
    mnt.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "none", str(mnt)], capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        db = open_db(mnt / "state.db")
        db.execute("INSERT INTO runs(id, status) VALUES ('backup-run', 'completed')")
        db.close()
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        r = _cli("runs", "list", "--db", str(mnt / "state.db"))
        assert r.exit_code == 0 and "backup-run" in r.output, r.output
        r = _cli("agp", "review", "--decision", "1", "--verdict", "agree", "--db", str(mnt / "state.db"))  # writes
        assert r.exit_code != 0 and "Traceback" not in r.output and "state.db" in r.output, r.output
        assert len(r.output.strip().splitlines()) == 1
    finally:
        subprocess.run(["umount", str(mnt)], capture_output=True)


# --------------------------------------------------------------------------- 7. decode errors


def test_7_decode_errors_name_the_file(tmp_path):
    from agp.lexicon import Lexicon

    bad = tmp_path / "rows.jsonl"
    bad.write_bytes(b'{"feat_id": "a"}\n' + b"\xff\xfe bad bytes\n")
    r = _cli("agp", "gate", "--rows", str(bad), "--proposals", str(bad), "--out", str(tmp_path / "d.jsonl"), "--no-db")
    assert r.exit_code == 2 and "rows.jsonl" in r.output and "line 2" in r.output and "UTF-8" in r.output, r.output
    lex = tmp_path / "lex.tsv"
    lex.write_bytes(b"word\t3\n\xff\t2\n")
    with pytest.raises(ValueError, match="lex.tsv: not valid UTF-8"):
        Lexicon.load(lex)
    assert not (tmp_path / "d.jsonl").exists()


def test_7_truncated_results_json_and_seed_bounds(tmp_path):
    from models.config import ConfigError, parse_config

    d = tmp_path / "run"
    d.mkdir()
    (d / "results.json").write_text('{"run_id": "r1", "status": "comp')
    r = _cli("runs", "import", str(d), "--db", str(tmp_path / "state.db"))
    assert r.exit_code == 2 and "results.json: not valid JSON, truncated or corrupt" in r.output, r.output
    assert "has no 'run_id'" not in r.output
    cfg = {"run_id": "r", "script": "nko", "mode": "baseline", "snapshot": "s", "split": "s.json",
           "features": "f", "out_dir": "o", "seed": 10 ** 30}
    with pytest.raises(ConfigError, match="seed"):
        parse_config(cfg)


# --------------------------------------------------------------------------- 8. emulator fidelity


def _vastai(env, *args: str) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("vastai")
    e = dict(os.environ, VAST_API_KEY=env.api_key, VASTAI_NO_UPDATE_CHECK="1", HOME=str(env.tmp / "home"))
    return subprocess.run([str(exe), "--url", env.emulator.url, *args], env=e, capture_output=True, text=True,
                          timeout=120)


def test_8_the_real_vastai_cli_ssh_url_and_bulk_endpoints(vast_env):
    r = _vastai(vast_env, "--raw", "create", "instances", "1000", "1002", "--image", "pytorch/pytorch", "--disk", "20",
                "--ssh", "--direct")
    assert r.returncode == 0, r.stderr
    ids = sorted(vast_env.cloud.instances)
    assert len(ids) == 2 and all(vast_env.cloud.instances[i]["image_runtype"] for i in ids)
    time.sleep(0.05)
    r = _vastai(vast_env, "ssh-url", str(ids[0]))
    assert r.stdout.strip() == f"ssh://root@127.0.0.1:{vast_env.cloud.ssh_port}", r.stdout + r.stderr
    r = _vastai(vast_env, "--raw", "destroy", "instances", "-y", *map(str, ids))
    assert r.returncode == 0 and vast_env.cloud.instances == {}, r.stdout + r.stderr


def test_8_malformed_requests_get_a_400_not_a_dropped_connection(vast_env):
    host, port = vast_env.emulator.server.server_address[:2]
    auth = f"Authorization: Bearer {vast_env.api_key}\r\n".encode()

    def req(method: str, path: str, body: bytes | None = None, length: str | None = None) -> int:
        head = f"{method} {path} HTTP/1.1\r\nHost: x\r\n".encode() + auth
        if body is not None or length is not None:
            head += f"Content-Length: {length if length is not None else len(body)}\r\n".encode()
        with socket.create_connection((host, port), timeout=10) as s:
            s.sendall(head + b"\r\n" + (body or b""))
            data = s.recv(65536)
        assert data, f"{method} {path}: connection dropped without an answer"
        return int(data.split(b" ", 2)[1])

    cases = [
        ("PUT", "/api/v0/asks/1000/", b"{bad", None),
        ("PUT", "/api/v0/asks/1000/", b"", "abc"),
        ("PUT", "/api/v0/asks/1000/", b"", "-4"),
        ("PUT", "/api/v0/asks/1000/", b'{"image": "x", "disk": "lots"}', None),
        ("PUT", "/api/v0/asks/1000/", b"[1, 2]", None),
        ("PUT", "/api/v0/asks/1000/", b"\xff\xfe", None),
        ("GET", "/api/v1/instances/?limit=abc", None, None),
        ("GET", "/api/v1/instances/?select_filters=%7Bx", None, None),
        ("GET", "/api/v1/instances/?after_token=zzz", None, None),
        ("POST", "/api/v0/bundles/", b'{"order": [[1, 2, 3]]}', None),
        ("POST", "/api/v0/bundles/", b'{"gpu_name": {"zz": 1}}', None),
        ("POST", "/api/v0/bundles/", b'{"limit": "x"}', None),
        ("DELETE", "/api/v0/instances/", b'{"instance_ids": "x"}', None),
        ("POST", "/api/v0/asks/bulk/", b'{"ids": [true]}', None),
        ("PUT", "/api/v0/instances/", b'{"ids": [1], "state": "exploded"}', None),
        ("POST", "/_emulator/faults", b'{"rate_limit": "many"}', None),
    ]
    for method, path, body, length in cases:
        status = req(method, path, body, length)
        assert 400 <= status < 500, (method, path, body, status)
    assert req("GET", "/api/v1/instances/") == 200  # and it still answers


# --------------------------------------------------------------------------- the budget simulation


def test_budget_simulation_never_bills_more_than_cap_plus_one_poll_of_the_fleet():
    """1,000 randomised fleets, boot delays, sync durations and poll intervals on a simulated
    clock (benchmarks/budget_sim.py): billed <= cap + one poll interval x fleet $/h, every time."""
    import random

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import budget_sim

    rng = random.Random(20261206)
    cases = [budget_sim.simulate(budget_sim.make_case(rng, rng.randrange(1 << 30))) for _ in range(1000)]
    bad = [(c.seed, c.billed, c.bound) for c in cases if c.billed > c.bound]
    assert not bad, bad[:5]
    assert sum(c.over for c in cases) > 300  # the cap is actually reached in a good share of them
    assert sum(c.kept for c in cases) > 0  # and the deadline (stop instead of destroy) is exercised


def test_1_a_temporary_file_gone_between_listing_and_pull_is_not_a_failed_sync(vast_env):
    from backend.vast.sync import Entry

    row = vast_env.new_instance("run-t", "run-t")
    p = write_remote(vast_env, row.id, "run-t/last.pt.tmp", b"half a checkpoint")
    e = Entry("last.pt.tmp", p.stat().st_size, sha(p.read_bytes()))
    p.unlink()  # renamed into place by the trainer after the listing
    st = vast_env.fleet.stager(row)
    rep = vast_env.fleet.syncer.sync_dir(st.remote, st.python, st.layout.helper, "run-t", st.layout.run_dir("run-t"),
                                         str(row.id), entries=[e])
    assert rep.ok and not rep.verified
    assert not list(vast_env.db.query("SELECT * FROM artifacts WHERE run_id = 'run-t'"))
