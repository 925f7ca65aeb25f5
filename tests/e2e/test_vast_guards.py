"""Vast lane guards against losing data or leaking money, each on the emulator through the
real SDK and a real sshd: launch retries adopt only their own instance, the "nothing left to
lose" listing fails instead of shrinking, lost instances are destroyed only once verified
(else kept with an alert), the ledger charges instances no poll saw, a destroy answered
``success: false`` is a failure, listing commands only observe, and --parallel 0 is refused."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from vast_helpers import write_remote, write_user_configs

from backend.provider import Offer

pytestmark = pytest.mark.sshd
HELPER = Path(__file__).resolve().parents[2] / "backend" / "vast" / "remote_helper.py"


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def instance_row(env, iid) -> dict:
    return next(iter(env.db.query("SELECT * FROM instances WHERE id = ?", [str(iid)])))


def events(env, kind: str, iid=None) -> list[dict]:
    sql, args = "SELECT * FROM events WHERE kind = ?", [kind]
    if iid is not None:
        sql, args = sql + " AND instance_id = ?", args + [str(iid)]
    return list(env.db.query(sql + " ORDER BY id", args))


def corrupt(f, n):
    return b"garbage" if f.read(n) else b""


# --------------------------------------------------------------------------- 1. launch retries


def test_failed_create_adopts_only_the_instance_it_created(vast_env):
    """An older, stopped instance of the same run (label = run id) holds unsynced files. A
    relaunch after an executor restart whose create answer is lost must adopt the instance
    it created, and when that one never boots, destroy only it."""
    from backend.vast.executor import LaunchError

    old = vast_env.new_instance("run-a", "run-a")
    data = os.urandom(30_000)
    write_remote(vast_env, old.id, "run-a/last.pt", data)
    vast_env.provider.stop(old.id)  # e.g. stopped by the budget cap, its disk kept

    fleet = vast_env.fresh_fleet()  # the executor restarted: nothing created in this session
    run = vast_env.vast_run(fleet, "run-a")
    vast_env.cloud.boot_s = 3600.0  # the new instance never comes up
    vast_env.settings.boot_timeout_s = 1.0
    vast_env.cloud.faults.create_reply_lost = 1  # the create succeeds, its answer is lost
    rows, _ = fleet.poll(enforce=False)
    with pytest.raises(LaunchError):
        run.launch(rows)

    new = int(run.iid)
    assert new != old.id  # the old instance was not taken for the new one
    assert vast_env.cloud.gone.get(new) == "destroyed"
    assert vast_env.provider.instance(old.id).status == "stopped"
    assert (vast_env.instance_dir(old.id) / "runs" / "run-a" / "last.pt").read_bytes() == data
    assert instance_row(vast_env, old.id)["destroyed_at"] is None
    [ev] = events(vast_env, "instance-destroyed", new)
    assert "no trainer had started on it" in ev["message"]
    assert [r.id for r in vast_env.provider.instances()] == [old.id]
    fleet.close()


def test_discard_checks_instances_not_created_here_or_with_a_trainer(vast_env):
    """discard destroys unchecked only an instance this Fleet created with no trainer
    started; an earlier one, or one a trainer was started on, goes through destroy."""
    earlier = vast_env.new_instance("run-e", "run-e")  # registered by another Fleet (session)
    data = os.urandom(20_000)
    write_remote(vast_env, earlier.id, "run-e/last.pt", data)
    fleet = vast_env.fresh_fleet()
    fleet.syncer.read_block = corrupt  # nothing can be verified
    o = fleet.discard(earlier.id, "launch failed")
    assert not o.destroyed and o.would_lose == ["run-e/last.pt"]
    assert vast_env.provider.instance(earlier.id) is not None
    fleet.syncer.read_block = lambda f, n: f.read(n)
    o = fleet.discard(earlier.id, "launch failed")
    assert o.destroyed and fleet.cas.path(sha(data)).read_bytes() == data
    assert "every file verified locally" in events(vast_env, "instance-destroyed", earlier.id)[0]["message"]

    offer = next(o for o in vast_env.provider.offers("num_gpus=1", "dph_total", None, 60) if o.id != 1000)
    mine = vast_env.provider.create(offer.id, "img", 60, label="run-m")
    fleet.register(mine, "run-m", "run-m", offer)
    fleet.mark_trainer(mine, "run-m")  # a trainer may have run: its runs directory must be seen
    o = fleet.discard(mine, "launch failed")
    assert not o.destroyed and "runs directory" in o.reason
    assert vast_env.provider.instance(mine) is not None

    fresh = vast_env.provider.create(1000, "img", 60, label="run-f")
    fleet.register(fresh, "run-f", "run-f", Offer(1000, 5000, "RTX 4090", 1, 0.3, 0.99, 1000.0, 60.0))
    assert fleet.discard(fresh, "launch failed").destroyed  # created here, no trainer: no SSH needed
    assert vast_env.cloud.gone[int(fresh)] == "destroyed"
    fleet.close()


# --------------------------------------------------------------------------- 2. the listing


def _hash(directory: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HELPER), "hash", *flags, str(directory)], capture_output=True,
                          text=True, timeout=120, check=False)


def test_hash_listing_fails_instead_of_leaving_files_out(tmp_path):
    runs = tmp_path / "runs"
    (runs / "r").mkdir(parents=True)
    (runs / "r" / "ok.pt").write_bytes(b"weights")
    r = _hash(runs)
    assert r.returncode == 0 and [e["name"] for e in json.loads(r.stdout)] == ["r/ok.pt"]

    r = _hash(tmp_path / "elsewhere")
    assert r.returncode == 3 and "not a directory" in r.stderr and r.stdout == ""
    assert json.loads(_hash(tmp_path / "elsewhere", "--missing-ok").stdout) == []

    (runs / "r" / "gone.log").symlink_to(tmp_path / "nowhere")  # a name whose content cannot be read
    r = _hash(runs)
    assert r.returncode == 3 and "gone.log: a dangling symbolic link" in r.stderr and r.stdout == ""
    (runs / "r" / "gone.log").unlink()
    os.mkfifo(runs / "r" / "pipe")  # opening it would block the hash forever
    r = _hash(runs)
    assert r.returncode == 3 and "pipe: not a regular file" in r.stderr
    (runs / "r" / "pipe").unlink()
    short = Path("/sys/devices/system/cpu/online")  # says 4096 bytes, reads a few: shrinks every time
    if short.exists() and short.stat().st_size > len(short.read_bytes()):
        (runs / "r" / "short.log").symlink_to(short)
        r = _hash(runs)
        assert r.returncode == 3 and "short.log: kept changing while it was hashed" in r.stderr
        (runs / "r" / "short.log").unlink()

    # A checkpoint renamed over each time the hasher opens it: the hash is of a version that is
    # no longer there, so it must not be listed. Deterministic: a write lease (fcntl) makes the
    # hasher's open wait until this test has put the next version in place.
    target = runs / "r" / "last.pt"
    target.write_bytes(b"version 0")
    swaps = _swap_on_open(target)
    try:
        r = _hash(runs)
    finally:
        swaps.stop()
    assert swaps.count >= 3  # one per try of the hasher
    assert r.returncode == 3 and "last.pt: kept changing while it was hashed" in r.stderr and r.stdout == ""
    listed = {e["name"]: e["sha256"] for e in json.loads(_hash(runs).stdout)}  # once it settles
    assert listed == {"r/last.pt": sha(target.read_bytes()), "r/ok.pt": sha(b"weights")}


class _swap_on_open:
    """Holds a write lease on ``target``; whenever another process opens it, renames a new
    version over it (leased in turn) before letting that open go through on the old one."""

    F_SETLEASE, F_GETLEASE = 1024, 1025

    def __init__(self, target: Path):
        import fcntl
        import signal

        self.fcntl, self.target, self.count = fcntl, target, 0
        self.previous = signal.signal(signal.SIGIO, lambda s, f: None)  # a lease break signals the holder
        self.fd = self._lease(target)
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _lease(self, path: Path) -> int:
        fd = os.open(path, os.O_RDONLY)
        try:
            self.fcntl.fcntl(fd, self.F_SETLEASE, self.fcntl.F_WRLCK)
        except OSError as e:
            os.close(fd)
            pytest.skip(f"file leases are not available here ({e})")
        return fd

    def _run(self) -> None:
        while not self.done.wait(0.001):
            if self.fcntl.fcntl(self.fd, self.F_GETLEASE) == self.fcntl.F_WRLCK:
                continue  # nobody is opening it
            self.count += 1
            nxt = self.target.with_name(".next")
            nxt.write_bytes(f"version {self.count} ".encode() * (self.count + 1))  # longer: looks appended
            fd = self._lease(nxt)
            os.replace(nxt, self.target)
            self._release(self.fd)
            self.fd = fd

    def _release(self, fd: int) -> None:
        self.fcntl.fcntl(fd, self.F_SETLEASE, self.fcntl.F_UNLCK)
        os.close(fd)

    def stop(self) -> None:
        import signal

        self.done.set()
        self.thread.join()
        self._release(self.fd)
        signal.signal(signal.SIGIO, self.previous)


def test_destroy_refused_when_the_runs_directory_is_missing_after_a_trainer(vast_env):
    row = vast_env.new_instance("run-d", "run-d")
    vast_env.fleet.mark_trainer(row.id, "run-d")
    write_remote(vast_env, row.id, "run-d/train.log", b"epoch 1\n")
    shutil.rmtree(vast_env.instance_dir(row.id) / "runs")  # not where the listing looks any more
    o = vast_env.fleet.destroy(row.id)
    assert not o.destroyed and "cannot verify the files on the instance" in o.reason and "runs" in o.reason
    assert vast_env.provider.instance(row.id) is not None

    # a file on it that cannot be read refuses the destroy as well (it is not left out)
    unreadable = vast_env.instance_dir(row.id) / "runs" / "run-d" / "best.pt"
    unreadable.parent.mkdir(parents=True)
    unreadable.symlink_to(vast_env.tmp / "nowhere")
    o = vast_env.fleet.destroy(row.id)
    assert not o.destroyed and "best.pt" in o.reason
    assert vast_env.provider.instance(row.id) is not None


def test_remote_root_recorded_at_registration_survives_a_settings_change(vast_env):
    row = vast_env.new_instance("run-s", "run-s")
    data = os.urandom(10_000)
    write_remote(vast_env, row.id, "run-s/best.pt", data)
    root = str(vast_env.instance_dir(row.id))
    assert json.loads(instance_row(vast_env, row.id)["data"])["remote_root"] == root
    vast_env.settings.remote_base = str(vast_env.tmp / "moved")  # configs/vast.toml edited since
    fleet = vast_env.fresh_fleet()
    assert fleet.layout(row.id).root == root
    o = fleet.destroy(row.id)
    assert o.destroyed and fleet.cas.path(sha(data)).read_bytes() == data
    fleet.close()


# --------------------------------------------------------------------------- 3. lost instances


def test_lost_instance_is_kept_with_an_alert_until_its_files_are_saved(vast_env):
    """The run's host goes offline holding an unsynced checkpoint: the run gives up on it,
    but the instance is not forgotten (not marked destroyed, still charged, an error event);
    once the host is back, destroy saves the file first."""
    row = vast_env.new_instance("run-l", "run-l")
    vast_env.fleet.mark_trainer(row.id, "run-l")
    data = os.urandom(40_000)
    write_remote(vast_env, row.id, "run-l/last.pt", data)
    vast_env.fleet.stager(row)  # its host key is known, as for any instance that ran a trainer
    vast_env.settings.max_recoveries = 0
    run = vast_env.vast_run(vast_env.fleet, "run-l")
    run.iid = str(row.id)

    vast_env.cloud.offline(int(row.id))
    rows, _ = vast_env.fleet.poll(enforce=False)
    result = run.step({r.id: r for r in rows})
    assert result is not None and result.status == "failed" and "lost (offline)" in result.error

    assert vast_env.provider.instance(row.id).status == "offline"
    assert instance_row(vast_env, row.id)["destroyed_at"] is None
    [kept] = events(vast_env, "instance-kept", row.id)
    assert kept["level"] == "error" and "still bills" in kept["message"]
    assert json.loads(kept["data"])["files"] == []  # unknown to state.db: nothing was ever synced
    assert not vast_env.fleet.sweep()  # still ours, not an orphan
    spent = vast_env.fleet.ledger.spent()
    later = vast_env.fresh_fleet(lambda: time.time() + 0.2)  # a poll 0.2 s later
    later.poll(enforce=False)
    later.close()
    assert vast_env.fleet.ledger.spent() > spent  # its storage is still charged

    vast_env.cloud.online(int(row.id))
    o = vast_env.fleet.destroy(row.id)
    assert o.destroyed and vast_env.fleet.cas.path(sha(data)).read_bytes() == data
    assert instance_row(vast_env, row.id)["destroyed_at"]


def test_changed_host_key_fails_the_run_keeps_the_instance_and_stops_it(vast_env):
    """Its files cannot be verified: not destroyed (an alert says so), but stopped, so it no
    longer bills compute; its disk and the file on it stay."""
    import paramiko

    row = vast_env.new_instance("run-k", "run-k")
    vast_env.fleet.mark_trainer(row.id, "run-k")
    write_remote(vast_env, row.id, "run-k/last.pt", b"unsynced")
    vast_env.fleet.stager(row)  # first use: the key is recorded
    hostport = vast_env.fleet.remote(row).target.hostport
    vast_env.fleet.forget_remote(row.id)
    known = vast_env.fleet.known
    known.check_or_trust(hostport, paramiko.RSAKey.generate(1024))  # another key on record now
    run = vast_env.vast_run(vast_env.fleet, "run-k")
    run.iid = str(row.id)

    rows, _ = vast_env.fleet.poll(enforce=False)
    result = run.step({r.id: r for r in rows})
    assert result.status == "failed" and "HOST KEY HAS CHANGED" in result.error and "kept" in result.error
    assert "stopped (compute no longer bills" in result.error
    live = vast_env.provider.instance(row.id)
    assert live.status == "stopped"
    assert vast_env.cloud.rate(vast_env.cloud.instances[int(row.id)]) < live.usd_per_h  # storage only
    assert (vast_env.instance_dir(row.id) / "runs" / "run-k" / "last.pt").read_bytes() == b"unsynced"
    assert instance_row(vast_env, row.id)["destroyed_at"] is None
    [kept] = events(vast_env, "instance-kept", row.id)
    assert "HOST KEY HAS CHANGED" in kept["message"] and "stopped" in kept["message"]
    [stopped] = events(vast_env, "instance-stopped", row.id)
    assert "compute no longer bills" in stopped["message"] and f"vast sync --instance {row.id}" in stopped["message"]


# --------------------------------------------------------------------------- 4. the ledger


def test_ledger_charges_instances_destroyed_or_lost_before_any_poll(vast_env):
    t = [2_000_000.0]
    vast_env.cloud.clock = lambda: t[0]
    fleet = vast_env.fresh_fleet(clock=lambda: t[0])
    offers = vast_env.provider.offers("num_gpus=1", "dph_total", None, vast_env.settings.disk_gb)
    ids = []
    for offer, run_id in zip(offers, ("run-1", "run-2", "run-3")):
        asked = t[0]
        iid = vast_env.provider.create(offer.id, "img", vast_env.settings.disk_gb, label=run_id)
        fleet.register(iid, run_id, run_id, offer, since=asked)
        ids.append(iid)
    t[0] += 3600
    assert fleet.discard(ids[0], "launch failed").destroyed  # no row read: the offer's rate
    assert fleet.destroy(ids[1]).destroyed  # the row read before the destroy: its start and rate
    t[0] += 1800
    vast_env.cloud.vanish(int(ids[2]))
    fleet.poll(enforce=False)  # noticed gone, never seen alive
    billed = [vast_env.cloud.billed(int(i)) for i in ids]
    assert billed[0] > 0.1 and billed[2] > billed[0]  # an hour and an hour and a half of GPU time
    for iid, usd in zip(ids, billed):
        charged = json.loads(instance_row(vast_env, iid)["data"])
        total = charged["compute_usd"] + charged["storage_usd"]
        assert total >= usd - 1e-9 and total == pytest.approx(usd, rel=0.01)
    assert fleet.ledger.spent() == pytest.approx(vast_env.cloud.billed(), rel=0.01)
    fleet.close()


# --------------------------------------------------------------------------- 5. destroy answers, listings


def test_destroy_answered_success_false_is_a_failure(vast_env):
    from backend.provider import ProviderError

    row = vast_env.new_instance("run-u", "run-u")
    vast_env.cloud.faults.destroy_unsuccessful = 1
    with pytest.raises(ProviderError) as e:
        vast_env.provider.destroy(row.id)
    assert "refused" in str(e.value) and "could not be destroyed" in str(e.value)
    vast_env.cloud.faults.destroy_unsuccessful = 1
    o = vast_env.fleet.destroy(row.id)
    assert not o.destroyed and "provider refused" in o.reason
    assert vast_env.provider.instance(row.id) is not None
    assert instance_row(vast_env, row.id)["destroyed_at"] is None
    assert events(vast_env, "destroy-failed", row.id)
    assert vast_env.fleet.destroy(row.id).destroyed  # the next answer is a real success
    assert vast_env.provider.instance(row.id) is None


def test_listing_instances_over_the_cap_only_observes(vast_env, tmp_path):
    from typer.testing import CliRunner

    from cli.root import app

    settings, budget = write_user_configs(vast_env, tmp_path, budget="cap_usd = 0.0001\nwarn_usd = 0.0\npoll_interval_s = 60.0")
    common = ["--db", str(vast_env.tmp / "state" / "state.db"), "--settings", str(settings), "--budget", str(budget)]
    known = vast_env.new_instance("run-o", "run-o")
    write_remote(vast_env, known.id, "run-o/last.pt", b"unsynced")
    orphan = vast_env.provider.create(1004, "img", 20, label="by hand")
    time.sleep(0.3)

    r = CliRunner().invoke(app, ["vast", "instances", "--json", *common], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["budget"]["over"]
    plan = {p["id"]: p["would"] for p in out["over_cap_policy"]}
    assert plan[str(known.id)].startswith("sync, then destroy") and plan[str(orphan)].startswith("stop it")
    r = CliRunner().invoke(app, ["vast", "instances", *common], catch_exceptions=False)
    assert r.exit_code == 0 and "OVER CAP" in r.stdout and "would, per instance" in r.stdout
    # nothing was synced, stopped or destroyed
    assert {(i.id, i.status) for i in vast_env.provider.instances()} == {
        (known.id, "running"), (orphan, "running")}
    assert not vast_env.db.execute("SELECT count(*) FROM artifacts").fetchone()[0]


# --------------------------------------------------------------------------- 6. resuming from the store


def test_a_changed_checkpoint_keeps_its_last_verified_version_until_the_new_one_is(vast_env):
    """last.pt v1 is verified; v2 replaces it on the instance and its transfer keeps breaking
    off, then the instance dies. The row holds v2's hash (not verified), and the run resumes
    from v1, still in the store, with the logs verified alongside it."""
    import io

    import torch

    from backend.vast.sync import PREVIOUS

    def ckpt(log_bytes: int, extra: bytes) -> bytes:
        buf = io.BytesIO()
        torch.save({"log_offsets": {"train.log": log_bytes, "metrics.jsonl": 0}, "pad": extra}, buf)
        return buf.getvalue()

    row = vast_env.new_instance("run-v", "run-v")
    log1 = b"epoch 1\n"
    v1 = ckpt(len(log1), os.urandom(1000))
    write_remote(vast_env, row.id, "run-v/last.pt", v1)
    write_remote(vast_env, row.id, "run-v/train.log", log1)
    fleet = vast_env.fleet
    assert fleet.sync_instance(row, ["run-v"])[0].ok

    v2 = ckpt(len(log1) * 2, os.urandom(3 * 1024 * 1024))
    write_remote(vast_env, row.id, "run-v/last.pt", v2)
    write_remote(vast_env, row.id, "run-v/train.log", log1 * 2)

    def dying(f, n):  # the instance goes away during the transfer of the new checkpoint
        if f.tell() >= 1024 * 1024:
            raise EOFError("connection lost")
        return f.read(n)

    fleet.syncer.read_block = dying
    rep = fleet.sync_instance(row, ["run-v"])[0]
    assert [e.name for e, _ in rep.failed] == ["last.pt"] and "kept dropping" in rep.failed[0][1]
    vast_env.cloud.vanish(int(row.id))

    a = next(iter(vast_env.db.query("SELECT * FROM artifacts WHERE run_id = 'run-v' AND name = 'last.pt'")))
    assert a["sha256"] == sha(v2) and a["sync_state"] == "remote-only"
    [prev] = [loc for loc in json.loads(a["locations"]) if loc["kind"] == PREVIOUS]
    assert prev["sha256"] == sha(v1) and prev["size"] == len(v1)
    assert fleet.syncer.last_verified("run-v", "last.pt").sha256 == sha(v1)
    assert fleet.syncer.last_verified("run-v", "train.log").sha256 == sha(log1 * 2)

    run = vast_env.vast_run(fleet, "run-v")
    files = {f.path: f for f in run._resume_files()}
    assert set(files) == {"runs/run-v/last.pt", "runs/run-v/train.log"}
    assert files["runs/run-v/last.pt"].sha256 == sha(v1)
    assert files["runs/run-v/last.pt"].local.read_bytes() == v1

    # once the new version is verified, it is the one to resume from
    fleet.syncer.read_block = lambda f, n: f.read(n)
    again = vast_env.new_instance("run-v", "run-v")
    write_remote(vast_env, again.id, "run-v/last.pt", v2)
    assert fleet.sync_instance(again, ["run-v"])[0].ok
    a = next(iter(vast_env.db.query("SELECT * FROM artifacts WHERE run_id = 'run-v' AND name = 'last.pt'")))
    assert a["sync_state"] == "verified" and PREVIOUS not in a["locations"]
    assert fleet.syncer.last_verified("run-v", "last.pt").sha256 == sha(v2)


def test_a_checkpoint_hashed_again_brings_the_logs_after_it_up_to_date(vast_env):
    """last.pt is replaced while it is pulled (the trainer saved the next epoch): it is hashed
    again, and so are the logs listed after it, so the verified train.log is never older than
    the verified last.pt that records its offset (resuming from them would fail)."""
    row = vast_env.new_instance("run-h", "run-h")
    ckpt = write_remote(vast_env, row.id, "run-h/last.pt", os.urandom(100_000))
    log = write_remote(vast_env, row.id, "run-h/train.log", b"epoch 1\n")
    saved = []

    def next_epoch(f, n):
        if not saved:  # while the first version is read: epoch 2 is logged, then checkpointed
            saved.append(os.urandom(100_000))
            with open(log, "ab") as fh:
                fh.write(b"epoch 2\n")
            ckpt.write_bytes(saved[0])  # in place, as torch.save does
        return f.read(n)

    vast_env.fleet.syncer.read_block = next_epoch
    rep = vast_env.fleet.sync_instance(row, ["run-h"])[0]
    assert rep.ok, str(rep)
    got = {e.name: e for e in rep.verified}
    assert got["last.pt"].sha256 == sha(saved[0])
    assert got["train.log"].sha256 == sha(b"epoch 1\nepoch 2\n")


# --------------------------------------------------------------------------- 7. idle evidence on the instance


def _runner(st, run_id: str, *argv: str) -> None:
    """Start the remote runner (as rmt.start_trainer does) around ``argv``."""
    from backend.vast.ssh import quote

    ctl = st.layout.ctl_dir(run_id)
    st.remote.makedirs(ctl)
    st.remote.makedirs(st.layout.run_dir(run_id))
    st.remote.run_line(f"cd {quote(st.layout.root)} && nohup setsid {quote(st.python)} {quote(st.layout.helper)} "
                       f"runner {quote(ctl)} 0.2 -- {' '.join(quote(a) for a in argv)} > /dev/null 2>&1 < /dev/null &",
                       timeout=60).check("starting a runner")


def test_kill_idle_counts_idle_time_from_the_instance_on_its_first_run(vast_env, clock):
    """A kill-idle that never polled these instances before: the one whose trainer exited
    longer ago than the window is destroyed at once (its runner's exit time is the evidence);
    one with a live trainer, and one on which no trainer ever ran, are not."""
    from backend.vast import remote as rmt
    from backend.vast.config import IdleSettings

    # the clock below reads 3.5 s after the first trainer exits, while the live one beats every
    # 0.2 s of real time: its newest beat is then up to ~3.5 s old, within this timeout
    vast_env.settings.idle = IdleSettings(gpu_util_below=5.0, window_s=3.0, heartbeat_timeout_s=10.0)
    done = vast_env.new_instance("run-done", "run-done")
    busy = vast_env.new_instance("run-busy", "run-busy")
    fresh = vast_env.new_instance("run-fresh", "run-fresh")
    for row, argv in ((done, ("true",)), (busy, ("sleep", "60"))):
        vast_env.fleet.mark_trainer(row.id, row.label)
        _runner(vast_env.fleet.stager(row), row.label, *argv)
    st = vast_env.fleet.stager(done)
    deadline = time.monotonic() + 30
    while (ended := rmt.status(st.remote, st.layout, "run-done", st.python)["exit"]) is None:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    clock.advance(max(0.0, ended["time"] + 3.5 - clock()))  # past the window (3 s) since that exit

    fleet = vast_env.fresh_fleet(clock)  # a new process: no idle tracking from earlier polls
    outcomes = fleet.kill_idle()
    assert [(o.instance_id, o.destroyed) for o in outcomes] == [(str(done.id), True)]
    assert vast_env.provider.instance(done.id) is None
    assert {r.id for r in vast_env.provider.instances()} == {busy.id, fresh.id}
    said = "\n".join(vast_env.logs)
    assert f"instance {done.id}: idle (GPU below 5% for" in said and "trainer's last activity" in said
    assert f"instance {fresh.id}: not idle (GPU low for 0 s only" in said
    assert f"instance {busy.id}: not idle" in said
    fleet.close()


# --------------------------------------------------------------------------- 8. logs


def test_log_lines_are_kept_when_the_metrics_read_fails(vast_env):
    """train.log is read, then reading metrics.jsonl fails over SFTP: nothing is stored and
    the offsets stay, so the next poll stores those train.log lines (once)."""
    from state import store
    from backend.vast.logs import LogFollower
    from backend.vast.ssh import SSHError

    row = vast_env.new_instance()
    d = vast_env.instance_dir(row.id) / "runs" / "run-x"
    d.mkdir(parents=True)
    (d / "train.log").write_text("epoch 1\nepoch 2\n")
    (d / "metrics.jsonl").mkdir()  # stat works, reading it fails
    f = LogFollower(vast_env.db, "run-x", vast_env.fleet.layout(row.id).run_dir("run-x"), str(row.id))
    with pytest.raises(SSHError, match="metrics.jsonl"):
        f.poll(vast_env.fleet.remote(row))
    assert f.offsets == {"train.log": 0, "metrics.jsonl": 0}

    (d / "metrics.jsonl").rmdir()
    (d / "metrics.jsonl").write_text(json.dumps({"kind": "epoch", "epoch": 1, "step": 3, "val_loss": 1.5}) + "\n")
    assert f.poll(vast_env.fleet.remote(row)) == 3
    assert f.poll(vast_env.fleet.remote(row)) == 0
    lines = [r["message"] for r in vast_env.db.query("SELECT message FROM events WHERE kind = 'log' ORDER BY id")]
    assert lines == ["epoch 1", "epoch 2"]
    run = store.get_run(vast_env.db, "run-x")
    assert run["log_offset"] == (d / "train.log").stat().st_size and run["val_loss"] == 1.5


# --------------------------------------------------------------------------- 9. settings


def test_settings_and_budget_are_type_checked_naming_file_and_field(tmp_path):
    from typer.testing import CliRunner

    from cli.root import app
    from backend.vast.config import VastConfigError, load_budget, load_settings

    vast, budget = tmp_path / "vast.toml", tmp_path / "budget.toml"
    bad_settings = {
        'disk_gb = "lots"': "field 'disk_gb': must be a number, got 'lots'",
        'max_recoveries = "two"': "field 'max_recoveries': must be an integer, got 'two'",
        "max_recoveries = -1": "field 'max_recoveries': must not be negative, got -1",
        "sync_every_s = 0": "field 'sync_every_s': must be positive, got 0",
        'ssh_key = 5': "field 'ssh_key': must be a string, got 5",
        "[remote_env]\nOMP_NUM_THREADS = 8": "field 'remote_env.OMP_NUM_THREADS': must be a string, got 8",
        '[idle]\nwindow_s = "x"': "field 'idle.window_s': must be a number, got 'x'",
        "[idle]\ngpu_util_below = 150": "field 'idle.gpu_util_below': must be between 0 and 100, got 150",
        "idle = 3": "field 'idle': must be a table, got 3",
        '[mirror]\nhost = "h"': "field 'mirror.path': required",
        '[mirror]\nhost = "h"\npath = "/p"\nport = "22"': "field 'mirror.port': must be an integer, got '22'",
        "[idle]\nwindow = 3": "field 'idle.window': unknown field (known: gpu_util_below, heartbeat_timeout_s, window_s)",
    }
    for text, want in bad_settings.items():
        vast.write_text(text + "\n")
        with pytest.raises(VastConfigError) as e:
            load_settings(vast)
        assert str(e.value).startswith(f"{vast}: {want}"), (text, str(e.value))
    bad_budget = {
        'cap_usd = "100"': "field 'budget.cap_usd': must be a number, got '100'",
        "cap_usd = 0": "field 'budget.cap_usd': must be positive, got 0",
        "cap_usd = 10\nwarn_usd = 20": "field 'budget.warn_usd': must be between 0 and cap_usd (10), got 20",
        "cap_usd = 10\npoll_interval_s = true": "field 'budget.poll_interval_s': must be a number, got True",
    }
    for text, want in bad_budget.items():
        budget.write_text("[budget]\n" + text + "\n")
        with pytest.raises(VastConfigError) as e:
            load_budget(budget)
        assert str(e.value) == f"{budget}: {want}", (text, str(e.value))

    vast.write_text('disk_gb = 80\nmax_recoveries = 3\n[idle]\nwindow_s = 60\n[remote_env]\nA = "1"\n')
    s = load_settings(vast)
    assert (s.disk_gb, s.max_recoveries, s.idle.window_s, s.remote_env) == (80, 3, 60, {"A": "1"})
    budget.write_text("[budget]\ncap_usd = 10\nwarn_usd = 5\n")
    assert load_budget(budget).cap_usd == 10

    # kill-idle with a bad idle window: one line naming the field, no traceback, nothing polled
    vast.write_text('[idle]\nwindow_s = "x"\n')
    r = CliRunner().invoke(app, ["vast", "kill-idle", "--db", str(tmp_path / "state.db"), "--settings", str(vast),
                                 "--budget", str(budget)])
    assert r.exit_code == 2 and f"error: {vast}: field 'idle.window_s': must be a number, got 'x'" in r.output
    assert "Traceback" not in r.output and r.exception is None or isinstance(r.exception, SystemExit)


# --------------------------------------------------------------------------- 10. the console's preview


def test_console_preview_uses_the_destroy_rule_for_a_missing_runs_directory(vast_env, tmp_path):
    """A trainer was started on the instance but its runs directory is missing: the preview
    must not say that nothing would be lost (Fleet.destroy refuses it); on an instance no
    trainer was ever started on, a missing runs directory holds nothing."""
    from console.ops import Ops

    settings, budget = write_user_configs(vast_env, tmp_path)
    ran = vast_env.new_instance("run-r", "run-r")
    vast_env.fleet.mark_trainer(ran.id, "run-r")
    never = vast_env.new_instance("run-n", "run-n")
    assert not (vast_env.instance_dir(ran.id) / "runs").exists()

    ops = Ops(vast_env.tmp / "state" / "state.db", settings, budget)
    try:
        c = ops.preview_destroy(str(ran.id))
        assert c.refusal and "cannot verify the files on the instance" in c.error and "runs" in c.error
        [o] = ops.destroy([c])
        assert not o.destroyed and vast_env.provider.instance(ran.id) is not None
        c = ops.preview_destroy(str(never.id))
        assert c.refusal == "" and c.files == 0 and not c.at_risk
        [o] = ops.destroy([c])
        assert o.destroyed and vast_env.provider.instance(never.id) is None
    finally:
        ops.close()
