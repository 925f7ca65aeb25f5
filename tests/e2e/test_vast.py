"""Vast lane: the emulator through the real SDK and CLI, SSH with a real sshd, sync with its
faults (each asserting that nothing is lost), cost and budget, idle and kill-idle."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
import subprocess
import time
from pathlib import Path

import pytest

from vast_helpers import write_remote, write_user_configs

pytestmark = pytest.mark.sshd
REPO = Path(__file__).resolve().parents[2]


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def artifact(env, run_id, name):
    return next(iter(env.db.query("SELECT * FROM artifacts WHERE run_id = ? AND name = ?", [run_id, name])), None)


# --------------------------------------------------------------------------- emulator + SDK


def test_emulator_speaks_the_sdk(vast_env):
    from backend.provider import ProviderError
    from backend.vast.provider import VastProvider

    p = vast_env.provider
    offers = p.offers("gpu_name=RTX_4090 reliability>0.98 inet_down>500 disk_space>=100", "dph_total", None, 60)
    assert [o.gpu_name for o in offers] == ["RTX 4090"] and offers[0].reliability > 0.98
    assert offers[0].dph_total > offers[0].raw["dph_base"]  # live price includes the disk
    cheap = p.offers("num_gpus=1", "dph_total", None, 60)
    assert [o.dph_total for o in cheap] == sorted(o.dph_total for o in cheap)
    assert all(o.num_gpus == 1 for o in cheap)

    vast_env.cloud.page_size = 2  # force several pages
    ids = [p.create(o.id, "img", 20, label=f"lbl {i}") for i, o in enumerate(cheap[:5])]
    rows = p.instances()
    assert [r.id for r in rows] == sorted(ids, key=int) and len(rows) == 5
    row = p.instance(ids[0])
    assert row.label == "lbl 0" and row.ssh_port == vast_env.cloud.ssh_port
    for field in ("status", "cur_state", "intended_status", "usd_per_h", "storage_cost", "start_date",
                  "gpu_util", "ssh_host", "status_msg"):  # every field the SDK's rows carry, read
        assert getattr(row, field) is not None, field
    p.label(ids[0], "renamed")
    assert p.instance(ids[0]).label == "renamed"
    p.stop(ids[1])
    assert p.instance(ids[1]).status == "stopped"
    assert p.destroy(ids[2]) and p.instance(ids[2]) is None
    assert p.user()["username"] == "emulated" and "api_key" not in p.user()
    with pytest.raises(ProviderError) as e:
        VastProvider("wrong-key", vast_env.emulator.url, attempts=1).instances()
    assert e.value.status == 401 and "wrong-key" not in str(e.value)


def test_vastai_cli_shows_instances(vast_env, tmp_path):
    iid = vast_env.provider.create(1000, "img", 20, label="cli check")
    home = tmp_path / "home"
    env = {**os.environ, "HOME": str(home), "XDG_CONFIG_HOME": str(home / "cfg"), "XDG_CACHE_HOME": str(home / "c"),
           "XDG_STATE_HOME": str(home / "s"), "XDG_DATA_HOME": str(home / "d"), "VASTAI_NO_UPDATE_CHECK": "1",
           "VAST_API_KEY": vast_env.api_key}
    out = subprocess.run([str(REPO / ".venv/bin/vastai"), "--url", vast_env.emulator.url, "--raw", "show",
                          "instances"], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = json.loads(out.stdout)
    assert [str(r["id"]) for r in rows] == [iid] and rows[0]["label"] == "cli check"
    assert rows[0]["actual_status"] == "running"


def test_provider_rides_out_429_and_5xx(vast_env):
    c, p = vast_env.cloud, vast_env.provider
    c.faults.rate_limit, c.faults.retry_after = 2, 0.05
    c.faults.server_errors = 2
    assert p.instances() == []
    c.faults.server_errors = 2  # calls fail twice before reaching the cloud: retried, one instance
    iid = p.create(1000, "img", 20, label="only-once")
    assert [r.id for r in p.instances()] == [iid]
    c.faults.create_reply_lost = 1  # rented, but the answer is lost: adopted, not rented twice
    again = p.create(1001, "img", 20, label="reply-lost")
    assert [r.id for r in p.instances()] == [iid, again] and p.instance(again).label == "reply-lost"
    before = len(c.requests)
    c.faults.slow_s = 0.2
    t0 = time.monotonic()
    assert p.instance(iid).id == iid and time.monotonic() - t0 >= 0.2
    c.faults.slow_s = 0
    assert len(c.requests) > before


# --------------------------------------------------------------------------- SSH


def test_tofu_then_strict_and_changed_key_refused(own_sshd, tmp_path):
    from backend.vast.ssh import HostKeyChanged, KnownHosts, Remote, SSHTarget

    kh = KnownHosts(tmp_path / "kh" / "known_hosts")
    t = SSHTarget("127.0.0.1", own_sshd.port, key=str(own_sshd.client_key))
    with Remote(t, kh) as r:
        assert r.run(["echo", "hi"]).out == "hi\n"
    recorded = kh.path.read_text()
    assert f"[127.0.0.1]:{own_sshd.port}" in recorded
    with Remote(t, kh) as r:  # same key: accepted silently
        assert r.run(["true"]).rc == 0
    own_sshd.stop()
    own_sshd.start(new_host_key=True)
    with pytest.raises(HostKeyChanged) as e:
        Remote(t, kh).connect()
    msg = str(e.value)
    assert "HOST KEY HAS CHANGED" in msg and "SHA256:" in msg and str(kh.path) in msg
    assert kh.path.read_text() == recorded  # nothing rewritten


def test_quoting_run_id_cannot_inject(vast_env, tmp_path):
    from backend.vast import remote as rmt

    row = vast_env.new_instance()
    st = vast_env.fleet.stager(row)
    evil = "it's a \"run\"; touch PWNED $(touch PWNED2) `touch PWNED3` & x"
    d = st.layout.run_dir(evil)
    st.remote.run(["mkdir", "-p", d]).check("mkdir")
    st.remote.run(["sh", "-c", 'printf "%s" "$1" > "$2"/note.txt', "sh", "payload; rm -rf /", d]).check("write")
    on_disk = vast_env.instance_dir(row.id) / "runs" / evil
    assert (on_disk / "note.txt").read_text() == "payload; rm -rf /"
    # start a runner under that id: the trainer fails (no config data), but nothing is injected
    cfg = {"run_id": evil, "out_dir": d}
    rmt.start_trainer(st.remote, st.layout, evil, cfg, st.python, str(REPO), {}, 0.2)
    deadline = time.monotonic() + 60
    while rmt.status(st.remote, st.layout, evil, st.python)["exit"] is None:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert rmt.status(st.remote, st.layout, evil, st.python)["exit"]["rc"] != 0
    for root in (vast_env.remote_base, Path.cwd(), Path.home(), tmp_path, Path("/")):
        for name in ("PWNED", "PWNED2", "PWNED3"):
            assert not (root / name).exists()
    rep = vast_env.fleet.sync_instance(row, [evil])[0]
    assert rep.ok and [e.name for e in rep.verified] == ["note.txt"]


# --------------------------------------------------------------------------- sync and its faults


def _lost(env, row) -> list[str]:
    """Files on the instance without a verified local copy (what a destroy would lose)."""
    return env.fleet.unsynced(row)


def test_sync_pulls_into_read_only_cas(vast_env):
    row = vast_env.new_instance()
    data = os.urandom(300_000)
    write_remote(vast_env, row.id, "run-x/best.pt", data)
    write_remote(vast_env, row.id, "run-x/sub/train.log", b"line 1\nline 2\n")
    rep = vast_env.fleet.sync_instance(row)[0]
    assert rep.ok and {e.name for e in rep.pulled} == {"best.pt", "sub/train.log"}
    blob = vast_env.fleet.cas.path(sha(data))
    assert blob.read_bytes() == data
    assert not stat.S_IMODE(blob.stat().st_mode) & 0o222  # read-only
    a = artifact(vast_env, "run-x", "best.pt")
    assert a["sync_state"] == "verified" and a["sha256"] == sha(data)
    locs = json.loads(a["locations"])
    assert {l["kind"] for l in locs} == {"instance", "cas"}
    # an existing hash is never overwritten
    inode = blob.stat().st_ino
    rep2 = vast_env.fleet.sync_instance(row)[0]
    assert rep2.ok and not rep2.pulled and blob.stat().st_ino == inode
    assert _lost(vast_env, row) == []


def test_ssh_drop_mid_transfer_resumes(vast_env):
    row = vast_env.new_instance()
    data = os.urandom(6 * 1024 * 1024)
    write_remote(vast_env, row.id, "run-x/last.pt", data)
    syncer = vast_env.fleet.syncer
    remote = vast_env.fleet.remote(row)
    seen = {"bytes": 0, "dropped": False}

    def read(f, n):
        if seen["bytes"] >= 2 * 1024 * 1024 and not seen["dropped"]:
            seen["dropped"] = True
            remote.drop()
        b = f.read(n)
        seen["bytes"] += len(b)
        return b

    syncer.read_block = read
    rep = vast_env.fleet.sync_instance(row)[0]
    assert seen["dropped"] and rep.ok
    assert rep.bytes == len(data)  # resumed, not restarted: every byte crossed once
    assert any("reconnecting to resume" in line for line in vast_env.logs)
    assert vast_env.fleet.cas.path(sha(data)).read_bytes() == data
    assert _lost(vast_env, row) == []


def test_truncated_or_changed_remote_file(vast_env):
    row = vast_env.new_instance()
    first = os.urandom(3 * 1024 * 1024)
    p = write_remote(vast_env, row.id, "run-x/last.pt", first)
    syncer = vast_env.fleet.syncer
    calls = {"n": 0}

    def read(f, n):
        calls["n"] += 1
        if calls["n"] == 1:  # the trainer replaces the file while we copy it: half as long
            p.write_bytes(first[: len(first) // 2])
        return f.read(n)

    syncer.read_block = read
    rep = vast_env.fleet.sync_instance(row)[0]
    assert rep.ok, str(rep)
    assert not vast_env.fleet.cas.has(sha(first))  # the vanished content never entered the store
    assert artifact(vast_env, "run-x", "last.pt")["sha256"] == sha(first[: len(first) // 2])
    assert _lost(vast_env, row) == []

    # same size, different bytes
    changed = os.urandom(len(first) // 2)
    calls["n"] = 0

    def read2(f, n):
        calls["n"] += 1
        if calls["n"] == 1:
            p.write_bytes(changed)
        return f.read(n)

    syncer.read_block = read2
    write_remote(vast_env, row.id, "run-x/last.pt", os.urandom(len(changed)))
    rep = vast_env.fleet.sync_instance(row)[0]
    assert rep.ok and artifact(vast_env, "run-x", "last.pt")["sha256"] == sha(changed)
    assert _lost(vast_env, row) == []
    assert not list(vast_env.fleet.cas.tmp.glob("*.part"))


def test_sha_mismatch_is_never_stored_and_blocks_destroy(vast_env):
    row = vast_env.new_instance()
    data = os.urandom(200_000)
    write_remote(vast_env, row.id, "run-x/best.pt", data)
    syncer = vast_env.fleet.syncer

    def corrupt(f, n):
        b = bytearray(f.read(n))
        if b:
            b[0] ^= 0xFF
        return bytes(b)

    syncer.read_block = corrupt
    rep = vast_env.fleet.sync_instance(row)[0]
    assert not rep.ok and "hash to" in rep.failed[0][1]
    assert not vast_env.fleet.cas.has(sha(data)) and not list(vast_env.fleet.cas.root.rglob("*.part"))
    assert artifact(vast_env, "run-x", "best.pt")["sync_state"] == "remote-only"
    o = vast_env.fleet.destroy(row.id)
    assert not o.destroyed and o.would_lose == ["run-x/best.pt"] and "best.pt" in str(o)
    assert vast_env.provider.instance(row.id) is not None  # still there, file intact
    syncer.read_block = lambda f, n: f.read(n)
    o = vast_env.fleet.destroy(row.id)
    assert o.destroyed and vast_env.fleet.cas.path(sha(data)).read_bytes() == data


def test_local_disk_full_loses_nothing(vast_env):
    row = vast_env.new_instance()
    data = os.urandom(3 * 1024 * 1024)
    write_remote(vast_env, row.id, "run-x/last.pt", data)
    syncer = vast_env.fleet.syncer
    written = {"n": 0}

    def full_disk(f, b):  # a tiny quota: the second block no longer fits
        written["n"] += len(b)
        if written["n"] > 1024 * 1024:
            raise OSError(errno.ENOSPC, "No space left on device")
        f.write(b)

    syncer.write_block = full_disk
    o = vast_env.fleet.destroy(row.id)
    assert not o.destroyed and o.would_lose == ["run-x/last.pt"] and "No space left" in o.reason
    assert not list(vast_env.fleet.cas.root.rglob("*.part"))  # partial file removed
    assert artifact(vast_env, "run-x", "last.pt")["sync_state"] == "remote-only"
    assert vast_env.provider.instance(row.id).status == "running"
    vast_env.fleet.cas.reserve_bytes = 1 << 62  # the free-space guard refuses before writing
    rep = vast_env.fleet.sync_instance(row)[0]
    assert not rep.ok and "not enough space" in rep.failed[0][1]
    vast_env.fleet.cas.reserve_bytes = 0
    syncer.write_block = lambda f, b: f.write(b)
    assert vast_env.fleet.destroy(row.id).destroyed
    assert vast_env.fleet.cas.path(sha(data)).read_bytes() == data


def test_destroy_failure_and_5xx(vast_env):
    row = vast_env.new_instance()
    data = b"x" * 1000
    write_remote(vast_env, row.id, "run-x/results.json", data)
    vast_env.cloud.faults.destroy_fail = 100
    o = vast_env.fleet.destroy(row.id)
    assert not o.destroyed and "refused the destroy" in o.reason
    assert vast_env.provider.instance(row.id) is not None
    ev = list(vast_env.db.query("SELECT * FROM events WHERE kind = 'destroy-failed'"))
    assert ev and ev[0]["level"] == "error"
    assert artifact(vast_env, "run-x", "results.json")["sync_state"] == "verified"
    vast_env.cloud.faults.destroy_fail = 0
    vast_env.cloud.faults.server_errors = 2
    vast_env.cloud.faults.rate_limit, vast_env.cloud.faults.retry_after = 1, 0.05
    assert vast_env.fleet.destroy(row.id).destroyed
    assert vast_env.provider.instance(row.id) is None
    assert not vast_env.instance_dir(row.id).exists()
    assert vast_env.fleet.cas.path(sha(data)).read_bytes() == data


def test_vanished_instance_keeps_verified_artifacts(vast_env):
    row = vast_env.new_instance()
    data = os.urandom(50_000)
    write_remote(vast_env, row.id, "run-x/last.pt", data)
    assert vast_env.fleet.sync_instance(row)[0].ok
    vast_env.fleet.poll()
    vast_env.cloud.vanish(int(row.id))
    rows, _ = vast_env.fleet.poll()
    assert rows == []
    inst = next(iter(vast_env.db.query("SELECT * FROM instances WHERE id = ?", [str(row.id)])))
    assert inst["destroyed_at"] and json.loads(inst["data"])["gone"] == "vanished"
    assert list(vast_env.db.query("SELECT * FROM events WHERE kind = 'instance-lost'"))
    a = artifact(vast_env, "run-x", "last.pt")
    assert a["sync_state"] == "verified" and vast_env.fleet.cas.path(a["sha256"]).read_bytes() == data


def test_force_destroy_needs_the_id_again_and_is_recorded(vast_env):
    row = vast_env.new_instance()
    write_remote(vast_env, row.id, "run-x/last.pt", b"unsaved")
    vast_env.fleet.syncer.read_block = lambda f, n: b"garbage" if f.read(n) else b""
    o = vast_env.fleet.destroy(row.id, force=True, confirm="123")
    assert not o.destroyed and "typed again" in o.reason
    o = vast_env.fleet.destroy(row.id, force=True, confirm=str(row.id))
    assert o.destroyed and o.forced and o.would_lose == ["run-x/last.pt"]
    ev = next(iter(vast_env.db.query("SELECT * FROM events WHERE kind = 'force-destroy'")))
    assert json.loads(ev["data"])["files"] == ["run-x/last.pt"]


def test_sweep_lists_orphans(vast_env):
    known = vast_env.new_instance()
    orphan = vast_env.provider.create(1003, "img", 20, label="made by hand")
    ids = [r.id for r in vast_env.fleet.sweep()]
    assert ids == [orphan] and known.id not in ids


def test_mirror_push(vast_env, sshd, tmp_path):
    from backend.vast.config import MirrorSettings
    from backend.vast.fleet import Fleet

    vast_env.settings.mirror = MirrorSettings(host="127.0.0.1", path=str(tmp_path / "mirror"), port=sshd.port,
                                              user="root", key=str(sshd.client_key))
    fleet = Fleet(vast_env.db, vast_env.settings, vast_env.budget, vast_env.provider, log=vast_env.logs.append)
    row = vast_env.new_instance()
    data = os.urandom(10_000)
    write_remote(vast_env, row.id, "run-x/best.pt", data)
    rep = fleet.sync_instance(row)[0]
    assert rep.ok and [e.name for e in rep.mirrored] == ["best.pt"]
    assert (tmp_path / "mirror" / "sha256" / sha(data)[:2] / sha(data)).read_bytes() == data
    a = artifact(vast_env, "run-x", "best.pt")
    assert a["sync_state"] == "mirrored" and "mirror" in {l["kind"] for l in json.loads(a["locations"])}
    fleet.close()


# --------------------------------------------------------------------------- logs


def test_log_follower_resumes_after_drop(vast_env):
    from backend.vast.logs import LogFollower
    from backend.vast.ssh import SSHError

    row = vast_env.new_instance()
    d = vast_env.instance_dir(row.id) / "runs" / "run-x"
    d.mkdir(parents=True)
    (d / "train.log").write_text("epoch 1\nepoch 2\npartial")
    (d / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 1, "step": 4, "train_loss": 2.5,
                                                 "val_loss": 2.7}) + "\n")
    rdir = vast_env.fleet.layout(row.id).run_dir("run-x")
    f = LogFollower(vast_env.db, "run-x", rdir, str(row.id))
    remote = vast_env.fleet.remote(row)
    assert f.poll(remote) == 3
    remote.drop()
    with open(d / "train.log", "a") as fh:
        fh.write(" line done\nepoch 3\n")
    f2 = LogFollower(vast_env.db, "run-x", rdir, str(row.id))  # a new process: offsets from state.db
    assert f2.poll(remote) == 2  # the session reconnects, reading resumes after the last full line
    lines = [r["message"] for r in vast_env.db.query("SELECT message FROM events WHERE kind = 'log' ORDER BY id")]
    assert lines == ["epoch 1", "epoch 2", "partial line done", "epoch 3"]
    run = vast_env.db.execute("SELECT epoch, val_loss FROM runs WHERE id = 'run-x'").fetchone()
    assert tuple(run) == (1, 2.7)

    # follow(): a connection that fails is retried, then reading resumes where it stopped
    with open(d / "train.log", "a") as fh:
        fh.write("epoch 4\n")
    attempts, errors, echoed = [], [], []

    def connect():
        attempts.append(1)
        if len(attempts) == 1:
            raise SSHError("connection refused (simulated)")
        return vast_env.fleet.remote(row)

    LogFollower(vast_env.db, "run-x", rdir, str(row.id), echo=echoed.append).follow(
        connect, lambda: True, interval=0.05, on_error=errors.append)
    assert len(attempts) == 2 and "reconnecting" in errors[0] and echoed == ["epoch 4"]


# --------------------------------------------------------------------------- cost, budget, idle


def test_ledger_matches_billing_and_budget_stops_spend(vast_env):
    from backend.vast.config import BudgetSettings
    from backend.vast.cost import Ledger

    t = [1_000_000.0]
    vast_env.cloud.clock = lambda: t[0]
    ledger = Ledger(vast_env.db, BudgetSettings(cap_usd=2.0, warn_usd=1.0, poll_interval_s=600), clock=lambda: t[0])
    a = vast_env.provider.create(1003, "img", 60, label="a")  # A100 PCIE ~0.73 $/h
    fleet_rate = vast_env.provider.instance(a).usd_per_h
    ok, _ = ledger.can_launch(vast_env.provider.instances(), 100.0)
    assert not ok
    for _ in range(40):
        t[0] += 600
        state = ledger.observe(vast_env.provider.instances())
        assert ledger.spent() >= vast_env.cloud.billed() - 1e-9  # never under-charges
        if state.over:
            break
    assert state.over and state.warn
    assert vast_env.cloud.billed() <= 2.0 + fleet_rate * 600 / 3600
    kinds = {r[0] for r in vast_env.db.execute("SELECT kind FROM events").fetchall()}
    assert "budget-warn" in kinds or "budget-over" in kinds
    samples = list(vast_env.db.query("SELECT * FROM cost_samples WHERE instance_id = ? ORDER BY id", [str(a)]))
    assert samples and samples[-1]["total_usd"] == pytest.approx(ledger.spent())


def test_budget_over_cap_syncs_then_destroys(vast_env, clock):
    row = vast_env.new_instance()
    data = os.urandom(20_000)
    write_remote(vast_env, row.id, "run-x/last.pt", data)
    fleet = vast_env.fresh_fleet(clock, cap_usd=0.0001, warn_usd=0.0, poll_interval_s=60.0)
    clock.advance(0.3)
    rows, state = fleet.poll()
    assert state.over
    assert vast_env.provider.instance(row.id) is None  # spend stopped
    assert fleet.cas.path(sha(data)).read_bytes() == data  # after its files were saved
    fleet.close()


def test_idle_detection_and_kill_idle(vast_env, clock):
    from state import store

    busy = vast_env.new_instance("busy", "run-busy")
    idle_row = vast_env.new_instance("idle", "run-idle")
    write_remote(vast_env, idle_row.id, "run-idle/best.pt", b"weights")
    store.upsert_run(vast_env.db, "run-busy", instance_id=str(busy.id), heartbeat_at=store.now())
    fleet = vast_env.fresh_fleet(clock)
    fleet.poll()
    clock.advance(0.5)  # past the idle window (0.3 s)
    store.heartbeat(vast_env.db, "run-busy")  # the busy trainer keeps beating (its GPU util reads 0 here)
    outcomes = fleet.kill_idle()
    assert [o.instance_id for o in outcomes] == [str(idle_row.id)] and outcomes[0].destroyed
    assert vast_env.provider.instance(busy.id) is not None
    assert artifact(vast_env, "run-idle", "best.pt")["sync_state"] == "verified"
    fleet.close()


@pytest.mark.timeout(300)
def test_budget_property_simulated_clock(tmp_path):
    """Whatever the fleet does, the money billed never exceeds cap + one poll interval x
    the fleet's hourly rate, and the ledger never charges less than the cloud bills."""
    from hypothesis import HealthCheck, example, given, settings
    from hypothesis import strategies as st

    from state.store import open_db
    from backend.vast.config import BudgetSettings
    from backend.vast.cost import Ledger, police
    from backend.vast.emulator import Cloud, Emulator
    from backend.vast.provider import VastProvider

    cloud = Cloud(api_key="k")
    emu = Emulator(cloud).start()
    provider = VastProvider("k", emu.url, backoff_s=0.0, sleep=lambda s: None)
    counter, capped = [0], [0]

    @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck))
    @example(cap=1.0, interval=900.0, steps=[([5], 1.0, False, False)] * 3)  # an H100 runs into the cap
    @example(cap=3.0, interval=300.0, steps=[([0, 3, 5], 0.9, False, False), ([4], 0.5, True, True)] * 8)
    @given(cap=st.floats(0.5, 20), interval=st.sampled_from([30.0, 60.0, 300.0, 900.0]),
           steps=st.lists(st.tuples(st.lists(st.integers(0, 7), max_size=3),  # offers to launch
                                    st.floats(0.1, 1.0),                       # fraction of the interval
                                    st.booleans(),                             # stop one instance
                                    st.booleans()),                            # one vanishes
                          min_size=1, max_size=25))
    def prop(cap, interval, steps):
        t = [1_000_000.0]
        with cloud.lock:
            cloud.instances.clear()
            cloud._billed.clear()
            cloud._billed_at.clear()
        cloud.clock = lambda: t[0]
        counter[0] += 1
        db = open_db(tmp_path / f"b{counter[0]}.db")
        ledger = Ledger(db, BudgetSettings(cap_usd=cap, warn_usd=cap / 2, poll_interval_s=interval),
                        clock=lambda: t[0])
        max_rate = 0.0
        rows = provider.instances()
        for launches, frac, stop_one, vanish_one in steps:
            for k in launches:
                offer = cloud.offers[k]
                if any(r["machine_id"] == offer["machine_id"] for r in cloud.instances.values()):
                    continue
                rate = offer["dph_base"] + offer["storage_cost"] * 60 / 720
                ok, _ = ledger.can_launch(rows, rate)
                if ok:
                    provider.create(offer["id"], "img", 60, label=f"l{k}")
                    ledger.launched(rate)
            live = list(cloud.instances)
            if stop_one and live:
                provider.stop(live[0])
            if vanish_one and len(live) > 1:
                cloud.vanish(live[-1])
            max_rate = max(max_rate, sum(cloud.rate(r) for r in cloud.instances.values()))
            t[0] += interval * frac  # polls come at most one interval apart
            rows = provider.instances()
            state = police(ledger, rows, lambda rs: [provider.destroy(r.id) for r in rs])
            capped[0] += state.over
            rows = provider.instances()
            billed = cloud.billed()
            assert billed <= cap + interval * max_rate / 3600 + 1e-9
            assert ledger.spent() >= billed - 1e-9
        db.close()

    try:
        prop()
    finally:
        emu.stop()
    assert capped[0] > 0  # the cap was actually reached in some of the examples


# --------------------------------------------------------------------------- CLI


def test_cli_commands_against_the_emulator(vast_env, tmp_path):
    from typer.testing import CliRunner

    from cli.root import app

    settings, budget = write_user_configs(vast_env, tmp_path, "[idle]\nwindow_s = 0.2\nheartbeat_timeout_s = 1.0")
    db = str(vast_env.tmp / "state" / "state.db")
    common = ["--db", db, "--settings", str(settings), "--budget", str(budget)]
    runner = CliRunner()

    def cli(*args):
        return runner.invoke(app, ["vast", *args], catch_exceptions=False)

    r = cli("offers", "gpu_name=RTX_4090 reliability>0.99", "--json", "--settings", str(settings))
    assert r.exit_code == 0 and [o["gpu_name"] for o in json.loads(r.stdout)] == ["RTX 4090"]
    known = vast_env.new_instance()
    orphan = vast_env.provider.create(1004, "img", 20, label="by hand")
    write_remote(vast_env, known.id, "run-x/best.pt", b"w" * 100)
    r = cli("instances", "--json", *common)
    data = json.loads(r.stdout)
    assert r.exit_code == 0 and {str(i["id"]) for i in data["instances"]} == {known.id, orphan}
    assert data["budget"]["cap_usd"] == 50.0 and not data["budget"]["over"]
    r = cli("sweep", "--json", *common)
    assert [str(o["id"]) for o in json.loads(r.stdout)] == [orphan]
    r = cli("sync", "--instance", str(known.id), "--json", *common)
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["verified"] == ["best.pt"]
    r = cli("destroy", str(orphan), "--force", "--confirm", "nope", *common)
    assert r.exit_code == 1 and "typed again" in r.stdout
    r = cli("destroy", str(known.id), "--json", *common)
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["destroyed"]
    time.sleep(0.3)
    r = cli("kill-idle", "--json", *common)  # the orphan is idle, but what it holds is unknown: refused
    assert r.exit_code == 1, r.stdout
    [o] = json.loads(r.stdout)
    assert o["instance_id"] == str(orphan) and not o["destroyed"] and "orphan" in o["reason"]
    r = cli("kill-idle", "--force", str(orphan), "--confirm", str(orphan), "--json", *common)
    assert r.exit_code == 0 and json.loads(r.stdout)[0]["forced"]
    assert vast_env.provider.instances() == []


def test_staging_is_verified_on_the_instance(vast_env, tmp_path):
    from backend.vast.remote import StagedFile

    row = vast_env.new_instance()
    st = vast_env.fleet.stager(row)
    files = []
    for i in range(3):
        p = tmp_path / f"f{i}.bin"
        p.write_bytes(os.urandom(1000 + i))
        files.append(StagedFile.of(p, f"data/x/f{i}.bin"))
    assert st.stage("inputs", files) == 3
    assert st.stage("inputs", files) == 0  # already there, checked by sha256 on the instance
    remote_copy = vast_env.instance_dir(row.id) / "data" / "x" / "f1.bin"
    remote_copy.write_bytes(b"tampered")
    assert st.verify("inputs", files) == [{"path": "data/x/f1.bin", "why": "size 8, expected 1001"}]
    assert st.stage("inputs", files) == 1
    assert remote_copy.read_bytes() == files[1].local.read_bytes()
