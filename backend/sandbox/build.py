"""Build the sandbox: an emulated Vast account with real runs on it, an adapter run on a real
2-rank MLX ring, and gate decisions, all on this machine, in ``work/sandbox`` (its own
state.db, lane state, keys and settings). Everything goes through the same code a real
account uses: the Vast provider (the real ``vastai`` SDK) against the emulator, SSH and SFTP
against a real sshd on 127.0.0.1, the Vast executor, the verified store, Thunder's launcher
and monitor, the AGP lane.

Processes it leaves running, each recorded by pid in ``sandbox.json`` (procs.Record): the
emulator (``nko-ops vast emulator``) and the sshd. ``stop`` destroys every instance on the
emulated account (the emulator kills what runs in an instance's disk), then stops both.

No real API key is used or read: the emulator gets a random key of its own, handed to the
provider explicitly; processes started here get it as VAST_API_KEY and XDG_CONFIG_HOME
pointing at the sandbox's own vastai config, so the SDK never looks at the user's key file.
"""

from __future__ import annotations

import getpass
import json
import os
import posixpath
import secrets
import shlex
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from backend.localssh import LocalSSHError, free_port, free_port_pair, new_sshd, require_openssh
from backend.sandbox import MARKER
from backend.sandbox.procs import Record, alive, listening
from models.errors import NkoOpsError

REPO = Path(__file__).resolve().parents[2]
DEFAULT_ROOT = Path("work/sandbox")
SAMPLE = REPO / "data" / "sample"
RUN_ID = "sandbox-nko-baseline"
IDLE_RUN_ID = "sandbox-idle"
IDLE_FILE = "checkpoint-unsynced.pt"
LIVE_RUN_ID = "sandbox-live-nko-trajectory"
ADAPTER_RUN = "sandbox-adapter"
HUNG_RUN = "sandbox-adapter-hang"


class SandboxError(NkoOpsError, RuntimeError):
    pass


@dataclass(frozen=True)
class Paths:
    root: Path

    @property
    def db(self) -> Path:
        return self.root / "state.db"

    @property
    def marker(self) -> Path:
        return self.root / MARKER

    @property
    def key_file(self) -> Path:
        return self.root / "api_key"

    @property
    def config_home(self) -> Path:
        """XDG_CONFIG_HOME of the sandbox's processes: vastai/vast_api_key holds the emulator's key."""
        return self.root / "config"

    @property
    def vast_toml(self) -> Path:
        return self.root / "vast.toml"

    @property
    def budget_toml(self) -> Path:
        return self.root / "budget.toml"

    @property
    def disks(self) -> Path:
        return self.root / "disks"

    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def logs(self) -> Path:
        return self.root / "logs"


def paths(root: str | Path = DEFAULT_ROOT) -> Paths:
    return Paths(Path(root).resolve())


def sandbox_env(p: Paths) -> dict[str, str]:
    """Environment for anything that talks to the emulated account: its key, and vastai's
    config directory inside the sandbox (the user's key file is never read)."""
    return {"VAST_API_KEY": p.key_file.read_text().strip(), "XDG_CONFIG_HOME": str(p.config_home),
            "VASTAI_NO_UPDATE_CHECK": "1"}


# --------------------------------------------------------------------------- processes


def _start_emulator(p: Paths, rec: Record, ssh_port: int) -> str:
    port = free_port()
    env = {**os.environ, **sandbox_env(p), "PYTHONUNBUFFERED": "1"}
    log = open(p.logs / "emulator.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "vast", "emulator", "--port", str(port),
                             "--ssh-port", str(ssh_port), "--workspace", str(p.disks), "--boot-s", "1"],
                            cwd=REPO, env=env, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                            start_new_session=True)
    log.close()
    rec.add_process("emulator", proc.pid, port)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SandboxError(f"the Vast emulator exited: {(p.logs / 'emulator.log').read_text()[-800:]}")
        try:
            urllib.request.urlopen(url + "/api/v0/users/current", timeout=1)
        except urllib.error.HTTPError:  # 401 without the key: it answers
            return url
        except OSError:
            time.sleep(0.1)
            continue
        return url
    raise SandboxError(f"the Vast emulator did not answer on {url} within 60 s")


def _write_settings(p: Paths, url: str, sshd) -> None:
    """vast.toml and budget.toml of the sandbox, explicit in every field it relies on."""
    p.vast_toml.write_text("\n".join([
        "# nko-ops sandbox: the emulated Vast account on this machine (nothing here reaches Vast)",
        f'server_url = "{url}"',
        'query = "num_gpus=1 reliability>0.98"',
        'image = "pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime"',
        "disk_gb = 20.0",
        f'remote_base = "{p.disks}"',
        f'remote_python = "{sys.executable}"',
        f'ssh_user = "{getpass.getuser()}"',
        f'ssh_key = "{sshd.client_key}"',
        "ssh_timeout_s = 10.0", "boot_timeout_s = 60.0", "heartbeat_s = 1.0", "sync_every_s = 3.0",
        "max_recoveries = 1",
        "[remote_env]", 'OMP_NUM_THREADS = "1"',
        "[idle]", "gpu_util_below = 5.0", "window_s = 10.0", "heartbeat_timeout_s = 10.0", ""]))
    p.budget_toml.write_text("\n".join([
        "# nko-ops sandbox: emulated dollars", "[budget]", 'name = "sandbox"', "cap_usd = 5.0", "warn_usd = 4.0",
        "poll_interval_s = 2.0", ""]))


def _fresh(p: Paths) -> None:
    """A new sandbox in ``p.root``: everything but the cached data (features) goes."""
    for child in list(p.root.iterdir()) if p.root.exists() else []:
        if child.name == "data":
            continue
        shutil.rmtree(child) if child.is_dir() and not child.is_symlink() else child.unlink()
    for d in (p.root, p.logs, p.disks, p.config_home / "vastai"):
        d.mkdir(parents=True, exist_ok=True)
    key = "sandbox_" + secrets.token_hex(16)
    for f in (p.key_file, p.config_home / "vastai" / "vast_api_key"):
        f.write_text(key + "\n")
        f.chmod(0o600)


# --------------------------------------------------------------------------- data


def _data(p: Paths, n: int, log: Callable[[str], None]) -> dict:
    """The first ``n`` rows of the embedded sample as a snapshot (audio linked), its split and
    log-mel features (50 frames/s): reused when already built."""
    from models.features import extract
    from models.snapshot import load
    from models.split import make_split

    snap_dir = p.data / "snapshot"
    snap_dir.mkdir(parents=True, exist_ok=True)
    lines = (SAMPLE / "pairs.jsonl").read_text(encoding="utf-8").splitlines()[:n]
    pairs = snap_dir / "pairs.jsonl"
    text = "\n".join(lines) + "\n"
    if not pairs.exists() or pairs.read_text(encoding="utf-8") != text:
        pairs.write_text(text, encoding="utf-8")
    if not (snap_dir / "audio").exists():
        (snap_dir / "audio").symlink_to(SAMPLE / "audio")
    snap = load(snap_dir)
    split_path = p.data / "split.json"
    make_split(snap.feat_ids, seed=42, val_fraction=0.1, test_fraction=0.15,
               snapshot_sha256=snap.sha256).save(split_path)
    t0 = time.monotonic()
    extract(snap_dir, p.data / "features", "log-mel", subsample=2, progress=False, workers=1)
    log(f"data: {len(snap.feat_ids)} rows of data/sample, log-mel features ({time.monotonic() - t0:.0f}s)")
    return {"snapshot": str(snap_dir), "split": str(split_path), "features": str(p.data / "features")}


def _matrix(p: Paths, data: dict, epochs: int) -> Path:
    m = {"matrix_id": "sandbox", "description": "nko-ops sandbox: one short N'Ko run on the emulated Vast account",
         **data, "out_root": str(p.root / "runs"),
         "defaults": {"model": {"preset": "demo"}, "device": "cpu",
                      "train": {"epochs": epochs, "batch_size": 16, "lr": 0.002, "warmup_epochs": 1, "patience": 10,
                                "log_every": 5},
                      "ttt": {"steps": 1, "lr": 0.001, "chunk_size": 32}},
         "sanity": {"subset": {"train": 16, "val": 8, "test": 8}, "epochs": 1},
         "forecast": {"epoch_seconds": None, "usd_per_hour": 0.0, "source": "emulated account"},
         "runs": [{"run_id": RUN_ID, "script": "nko", "mode": "baseline", "seed": 42}]}
    path = p.root / "matrix.json"
    path.write_text(json.dumps(m, indent=1))
    return path


# --------------------------------------------------------------------------- steps


def _vast_matrix(p: Paths, matrix: Path, settings, budget, provider, log) -> None:
    from backend.matrix_run import run_matrix

    results = run_matrix(matrix, p.db, executor="vast", skip_sanity=True, poll_s=1.0, log=log, settings=settings,
                         budget=budget, provider=provider)
    bad = [r for r in results if r.status != "completed"]
    if bad:
        raise SandboxError("the sandbox's Vast run did not complete: " + "; ".join(str(r) for r in bad))


def _gate(p: Paths, matrix: Path, data: dict, log) -> None:
    from backend.agp_lane import run_matrix_lane

    lanes = run_matrix_lane(matrix, data["split"], data["snapshot"], p.root / "agp", p.db, calibrate=False)
    for run_id, summary in lanes.items():
        o = summary.get("overall", {})
        log(f"AGP lane on {run_id}: {o.get('rows', '?')} rows, gate decisions recorded")


def _idle_instance(p: Paths, fleet, log) -> str:
    """An instance left idle (nothing runs on it) holding a file with no verified local copy."""
    offers = fleet.provider.offers(fleet.settings.query, "dph_total", limit=20, storage_gb=fleet.settings.disk_gb)
    used = {i.machine_id for i in fleet.provider.instances()}
    offer = next(o for o in offers if o.machine_id not in used)
    iid = fleet.provider.create(offer.id, fleet.settings.image, fleet.settings.disk_gb, label=IDLE_RUN_ID)
    fleet.register(iid, IDLE_RUN_ID, IDLE_RUN_ID, offer)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        row = fleet.provider.instance(iid)
        if row and row.running:
            break
        time.sleep(0.2)
    else:
        raise SandboxError(f"the idle instance {iid} did not start")
    # written over SSH, as a run on the instance would leave it
    layout = fleet.layout(iid)
    remote = fleet.remote(row)
    target = f"{layout.runs}/{IDLE_RUN_ID}/{IDLE_FILE}"
    r = remote.run_line(f"mkdir -p {shlex.quote(posixpath.dirname(target))} && "
                        f"head -c 300000 /dev/urandom > {shlex.quote(target)}", timeout=30)
    if r.rc != 0:
        raise SandboxError(f"could not write {target} on instance {iid}: {r.err.strip()}")
    fleet.poll(enforce=False)
    log(f"idle instance {iid} (${row.usd_per_h:.3f}/h) holds {IDLE_RUN_ID}/{IDLE_FILE}, not synced")
    return str(iid)


def _live_run(p: Paths, rec: Record, data: dict, settings, budget, provider, log, epochs: int) -> None:
    """A run left training on its instance (detached, as `nko-ops vast launch --detach`):
    its train.log grows on the instance, the console tails it over SSH and its cost rises."""
    from backend.vast.executor import launch_config

    cfg = {"run_id": LIVE_RUN_ID, "script": "nko", "mode": "trajectory", "seed": 42, **data,
           "out_dir": str(p.root / "runs" / LIVE_RUN_ID), "model": {"preset": "demo"}, "device": "cpu",
           "train": {"epochs": epochs, "batch_size": 16, "lr": 0.002, "warmup_epochs": 1, "patience": epochs,
                     "log_every": 2}}
    path = p.root / f"{LIVE_RUN_ID}.json"
    path.write_text(json.dumps(cfg, indent=1))
    r = launch_config(path, p.db, detach=True, poll_s=1.0, log=log, settings=settings, budget=budget,
                      provider=provider)
    if r.status != "running":
        raise SandboxError(f"the sandbox's live run did not start: {r}")
    # the lane's executor re-attaches to it (as `nko-ops vast launch` run again does): metrics and
    # log lines into state.db, checkpoint syncs, and at the end registration and destroy
    out = open(p.logs / "live-executor.log", "ab")
    proc = subprocess.Popen([sys.executable, "-m", "cli", "vast", "launch", "--config", str(path),
                             "--db", str(p.db), "--settings", str(p.vast_toml), "--budget", str(p.budget_toml)],
                            cwd=REPO, env={**os.environ, **sandbox_env(p)}, stdin=subprocess.DEVNULL, stdout=out,
                            stderr=out, start_new_session=True)
    out.close()
    rec.add_process("executor", proc.pid)
    log(f"{LIVE_RUN_ID}: training on its instance ({epochs} epochs), followed by the Vast executor "
        f"(pid {proc.pid}, log {p.logs / 'live-executor.log'})")


def _thunder(p: Paths, log, hang: bool) -> None:
    """A LoRA adapter run on a 2-rank mlx[cpu] ring on 127.0.0.1 (a tiny llama built here,
    the AGP corpus from the sandbox run's test predictions), and, with ``hang``, a second run
    whose rank 1 is stopped so the watchdog marks it hung and stops its ranks."""
    from agp.corpus import SYSTEM_PROMPT, build_corpus, prompt_messages
    from agp.pipeline import lane_rows
    from agp.tiny_model import build_tiny_llama
    from state.store import open_db
    from backend.thunder.config import parse_config
    from backend.thunder.launch import launch
    from backend.thunder.monitor import Monitor
    from models.files import sha256_file

    t = p.root / "thunder"
    rows_path = p.root / "runs" / RUN_ID / "test_predictions.jsonl"
    rows, _ = lane_rows(rows_path)
    build_corpus(rows, t / "corpus", seed=42, valid_fraction=0.2, test_fraction=0.2,
                 rows_sha256=sha256_file(rows_path))
    texts = [SYSTEM_PROMPT] + [m["content"] for r in rows for m in prompt_messages(r)] + [r.reference_text for r in rows]
    model = build_tiny_llama(t / "model", texts * 3, vocab_size=300, hidden_size=32, layers=2)

    def cluster(**over):
        port = free_port_pair()
        data = {"name": "sandbox", "python": sys.executable, "workdir": str(REPO), "model": str(model),
                "data": str(t / "corpus"), "run_root": str(t / "runs"), "local_root": str(t / "local"),
                "starting_port": port,
                "hosts": [{"name": "mac-a", "kind": "local", "ip": "127.0.0.1"},
                          {"name": "mac-b", "kind": "local", "ip": "127.0.0.1"}],
                "train": {"iters": 6, "steps_per_report": 1, "steps_per_eval": 3, "save_every": 3, "val_batches": 2,
                          "num_layers": 2, "lora_rank": 4, "learning_rate": 1e-3, "max_seq_length": 128},
                "watchdog": {"window_s": 180, "startup_window_s": 600, "poll_s": 0.5, "stop_grace_s": 2},
                "eval": {"enabled": False}}
        for k, v in over.items():
            data[k] = {**data[k], **v} if isinstance(v, dict) else v
        return parse_config(data, "sandbox cluster")

    db = open_db(p.db)
    try:
        cfg = cluster()
        started = launch(cfg, db, run_id=ADAPTER_RUN, name="sandbox LoRA (2-rank ring)")
        status = Monitor(cfg, db, ADAPTER_RUN, proc=started.proc).watch(max_s=300)
        log(f"adapter run {ADAPTER_RUN}: {status}")
        if hang:
            _hung_run(cluster, db, log)
    finally:
        db.close()


def _hung_run(cluster, db, log) -> None:
    from backend.thunder.launch import launch
    from backend.thunder.monitor import Monitor
    from state.adapters import get_adapter_run

    cfg = cluster(train={"iters": 100000, "steps_per_report": 1, "steps_per_eval": 100000, "save_every": 100000},
                  watchdog={"window_s": 8.0, "startup_window_s": 600, "poll_s": 0.5, "stop_grace_s": 1})
    started = launch(cfg, db, run_id=HUNG_RUN, name="sandbox LoRA, rank 1 stalled (watchdog)")
    mon = Monitor(cfg, db, HUNG_RUN, proc=started.proc)
    pids: dict[int, int] = {}
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:
            if mon.poll() is not None:
                break
            n = dict(db.execute("SELECT rank, COUNT(*) FROM adapter_metrics WHERE adapter_run_id = ? AND "
                                "name = 'train_loss' GROUP BY rank", [HUNG_RUN]).fetchall())
            if n.get(0, 0) >= 1 and n.get(1, 0) >= 1:
                break
            time.sleep(0.3)
        rdir = Path(get_adapter_run(db, HUNG_RUN)["run_dir"])
        pids = {r: int((rdir / f"rank{r}.pid").read_text()) for r in (0, 1) if (rdir / f"rank{r}.pid").exists()}
        if 1 in pids:
            os.kill(pids[1], signal.SIGSTOP)  # rank 1 stalls; rank 0 waits in the ring's all_sum
        status = mon.watch(max_s=60)
        log(f"adapter run {HUNG_RUN}: {status} (rank 1 stopped on purpose; the watchdog stopped the ranks)")
    finally:
        for pid in pids.values():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


# --------------------------------------------------------------------------- start / stop


@dataclass
class Sandbox:
    paths: Paths
    url: str
    idle_instance: str
    seconds: float

    @property
    def console_command(self) -> str:
        root = os.path.relpath(self.paths.root) if self.paths.root.is_relative_to(Path.cwd()) else self.paths.root
        extra = "" if Path(root) == DEFAULT_ROOT else f" --dir {root}"
        return f"nko-ops sandbox console{extra}"


def start(root: str | Path = DEFAULT_ROOT, log: Callable[[str], None] = print, rows: int = 240, epochs: int = 10,
          hang: bool = True, live_epochs: int = 60) -> Sandbox:
    """Build a fresh sandbox in ``root`` (an earlier one there is stopped first) and leave the
    emulator and the sshd running, with the idle instance and (``live_epochs`` > 0) a run
    still training on its own instance; on any failure everything started is stopped again."""
    try:
        require_openssh()
    except LocalSSHError as e:
        raise SandboxError(str(e)) from None
    p = paths(root)
    if p.marker.exists():
        stop(root, log=lambda s: None)
    elif p.root.exists() and any(c.name != "data" for c in p.root.iterdir()):
        raise SandboxError(f"{p.root} is not a sandbox directory (no {MARKER}) and not empty: the sandbox "
                           "empties its directory, so give it a new one (--dir)")
    t0 = time.monotonic()
    _fresh(p)
    rec = Record(p.root)
    rec.data.update(root=str(p.root), db=str(p.db), settings=str(p.vast_toml), budget=str(p.budget_toml))
    rec.save()
    try:
        sshd = new_sshd(p.root / "sshd").start(detach=True)
        rec.add_process("sshd", sshd.proc.pid, sshd.port)
        url = _start_emulator(p, rec, sshd.port)
        rec.data["server_url"] = url
        rec.save()
        _write_settings(p, url, sshd)
        log(f"emulated Vast account on {url}; instances' SSH: sshd on 127.0.0.1:{sshd.port}")

        from state.store import open_db
        from backend.vast.config import load_budget, load_settings, state_dir_for
        from backend.vast.fleet import Fleet
        from backend.vast.provider import VastProvider

        settings = load_settings(p.vast_toml, state_dir=state_dir_for(p.db))
        budget = load_budget(p.budget_toml)
        provider = VastProvider(p.key_file.read_text().strip(), url, backoff_s=0.2)

        data = _data(p, rows, log)
        matrix = _matrix(p, data, epochs)
        _vast_matrix(p, matrix, settings, budget, provider, log)
        _gate(p, matrix, data, log)
        db = open_db(p.db)
        fleet = Fleet(db, settings, budget, provider, log=log)
        try:
            idle_iid = _idle_instance(p, fleet, log)
        finally:
            fleet.close()
            db.close()
        _thunder(p, log, hang)
        if live_epochs:
            _live_run(p, rec, data, settings, budget, provider, log, live_epochs)
    except BaseException:
        stop(root, log=lambda s: None)
        raise
    sb = Sandbox(p, url, idle_iid, time.monotonic() - t0)
    rec.data.update(idle_instance=idle_iid, built_s=round(sb.seconds, 1))
    rec.save()
    return sb


def stop(root: str | Path = DEFAULT_ROOT, log: Callable[[str], None] = print) -> list[str]:
    """Destroy every instance on the emulated account, stop every recorded process, and
    check that nothing the sandbox started still listens. Returns what was stopped."""
    p = paths(root)
    if not p.marker.exists():
        log(f"no sandbox in {p.root}")
        return []
    rec = Record(p.root)
    stopped, problems = [], []
    # first what acts on the account (the live run's executor), so nothing rents or syncs meanwhile
    stopped += rec.stop_all(only=[n for n in rec.data["processes"] if n not in ("emulator", "sshd")])
    url = rec.data.get("server_url")
    if url and "emulator" in rec.running():
        try:
            stopped += _destroy_all(p, url)
        except SandboxError as e:
            problems.append(str(e))
    stopped += rec.stop_all()
    _kill_in(p.disks)
    deadline = time.monotonic() + 5.0  # a killed process's sockets close as the kernel tears it down
    while True:
        still = [f"{n}:{port}" for n, port in rec.data.get("ports", {}).items() if listening(port)]
        if not still or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    if still:
        problems.append(f"still listening after stop: {', '.join(still)}")
    rec.data["stopped_at"] = time.time()
    rec.save()
    for s in stopped:
        log(f"stopped {s}")
    if problems:
        raise SandboxError("; ".join(problems))
    return stopped


def _destroy_all(p: Paths, url: str) -> list[str]:
    """Destroy every instance on the emulated account (the emulator kills what runs on its
    disk) and record it in the sandbox's state.db."""
    from state import fleet as fleet_state, store
    from backend.provider import ProviderError
    from backend.vast.provider import VastProvider

    out = []
    try:
        provider = VastProvider(p.key_file.read_text().strip(), url, attempts=2, backoff_s=0.1)
        rows = provider.instances()
        for row in rows:
            provider.destroy(row.id)
            out.append(f"instance {row.id} ({row.label or 'no label'})")
        left = provider.instances()
    except (ProviderError, OSError) as e:
        raise SandboxError(f"could not destroy the emulated instances ({e}); their processes were killed") from None
    if rows and p.db.exists():
        db = store.open_db(p.db)
        try:
            for row in rows:
                fleet_state.mark_destroyed(db, row.id, store.now())
                store.add_event(db, f"instance {row.id} destroyed: sandbox stopped", instance_id=row.id,
                                kind="instance-destroyed", source="sandbox")
            db.conn.commit()
        finally:
            db.close()
    if left:
        raise SandboxError(f"instances still on the emulated account after destroy: {[int(r.id) for r in left]}")
    return out


def _kill_in(path: Path) -> None:
    """Kill anything still working inside the instances' disks (trainers, runners)."""
    from backend.vast.emulator import _processes_in

    if path.exists():
        for pid, _ in _processes_in(path):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
