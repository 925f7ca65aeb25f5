"""Start, resume and stop Thunder runs.

A launch writes the ring hostfile (mlx's JSON format: ``{"backend": "ring", "envs": [...],
"hosts": [{"ssh": alias, "ips": [numeric IP], "rdma": []}, ...]}``; host i is rank i) under
``<local_root>/<run_id>/`` on the controller, writes ``attempt<K>.json`` into the run
directory on every host, and starts

    mlx.launch --backend ring --hostfile hostfile.json --starting-port P --python PY --cwd WORKDIR \
        -- -m backend.thunder.worker --config <run_dir>/attempt<K>.json

in its own session, its output in ``launch.out.log`` / ``launch.err.log`` and its exit status
in ``launch.rc`` (so a monitor that did not start it can still read how it ended).

Resume: a new attempt starts from the newest checkpoint of the run (``NNNNNNN_adapters.safetensors``
in any earlier attempt's adapter directory), counting iterations on from it; attempt K > 0
saves into ``adapters-resume<K>/``. The optimizer state is not in mlx-lm's checkpoints, so
Adam restarts from zero moments.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import sqlite_utils

from backend.thunder.config import ClusterConfig, config_json
from backend.thunder.hosts import Host, cluster_hosts
from state.adapters import TERMINAL, get_adapter_run, log_event, set_status, update_adapter_run
from models.errors import NkoOpsError

HOSTFILE = "hostfile.json"
OUT_LOG = "launch.out.log"
ERR_LOG = "launch.err.log"
RC_FILE = "launch.rc"
WORKER_MODULE = "backend.thunder.worker"


class LaunchError(NkoOpsError, RuntimeError):
    pass


# Run on a host as `python - RUN_DIR HASH(0|1)`: the run's attempts and adapter files.
ADAPTER_FILES = r'''
import glob, hashlib, json, os, re, sys
run_dir, want_hash = sys.argv[1], sys.argv[2] == "1"
attempts = {}
for p in glob.glob(os.path.join(run_dir, "attempt*.json")):
    m = re.fullmatch(r"attempt(\d+)\.json", os.path.basename(p))
    if m:
        with open(p) as f:
            c = json.load(f)
        attempts[m.group(1)] = {"start_iteration": c.get("start_iteration", 0), "adapter_dir": c.get("adapter_dir")}
def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
files = {}
for d in sorted(glob.glob(os.path.join(run_dir, "adapters*"))):
    for p in sorted(glob.glob(os.path.join(d, "*"))):
        if os.path.isfile(p) and (p.endswith(".safetensors") or p.endswith(".json")):
            files[os.path.relpath(p, run_dir)] = {"path": p, "size": os.path.getsize(p),
                                                  "sha256": sha(p) if want_hash else None}
print(json.dumps({"attempts": attempts, "files": files}))
'''

# `sh -s PIDFILE MARKER GRACE`: stop the process named in PIDFILE if its command line carries
# MARKER (never a recycled pid): SIGTERM, SIGCONT (a stopped process only sees TERM once
# continued), then SIGKILL after GRACE seconds. Prints stopped | killed | gone | foreign.
KILL_SCRIPT = r'''
pidfile=$1; marker=$2; grace=$3
[ -f "$pidfile" ] || { echo gone; exit 0; }
pid=$(cat "$pidfile")
alive() { st=$(ps -ww -o stat= -p "$pid" 2>/dev/null) && case "$st" in Z*) return 1;; *) return 0;; esac; }
alive || { echo gone; exit 0; }
case "$(ps -ww -o command= -p "$pid" 2>/dev/null)" in *"$marker"*) ;; *) echo foreign; exit 0;; esac
kill -TERM "$pid" 2>/dev/null; kill -CONT "$pid" 2>/dev/null
i=0
while [ "$i" -lt $((grace * 5)) ]; do alive || { echo stopped; exit 0; }; sleep 0.2; i=$((i + 1)); done
kill -KILL "$pid" 2>/dev/null
i=0
while [ "$i" -lt 25 ]; do alive || { echo killed; exit 0; }; sleep 0.2; i=$((i + 1)); done
echo alive
'''


def new_run_id() -> str:
    return "thunder-" + datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")


def run_dir(cluster: ClusterConfig, run_id: str) -> str:
    return f"{cluster.run_root.rstrip('/')}/{run_id}"


def adapter_dir(rdir: str, attempt: int) -> str:
    return f"{rdir}/adapters" if attempt == 0 else f"{rdir}/adapters-resume{attempt}"


def metrics_path(rdir: str, rank: int) -> str:
    return f"{rdir}/metrics.rank{rank}.jsonl"


def hostfile(cluster: ClusterConfig) -> dict:
    """mlx.launch's hostfile; the ring runs over the numeric Thunderbolt IPs."""
    return {"backend": "ring", "envs": list(cluster.env),
            "hosts": [{"ssh": h.launch_name, "ips": [h.cfg.ip], "rdma": []} for h in cluster_hosts(cluster)]}


def mlx_launch_program() -> str:
    beside = Path(sys.executable).parent / "mlx.launch"
    found = str(beside) if beside.exists() else shutil.which("mlx.launch")
    if not found:
        raise LaunchError("mlx.launch not found next to this python or on PATH (install mlx)")
    return found


def launcher_command(cluster: ClusterConfig, hostfile_path: Path, attempt_path: str) -> list[str]:
    return [mlx_launch_program(), "--backend", "ring", "--hostfile", str(hostfile_path),
            "--starting-port", str(cluster.starting_port), "--python", cluster.python, "--cwd", cluster.workdir,
            "--", "-m", WORKER_MODULE, "--config", attempt_path]


def attempt_config(cluster: ClusterConfig, run_id: str, attempt: int, start_iteration: int,
                   resume_file: str | None) -> dict:
    rdir = run_dir(cluster, run_id)
    iters = cluster.train.iters - start_iteration
    return {"run_id": run_id, "attempt": attempt, "run_dir": rdir, "model": cluster.model, "data": cluster.data,
            "adapter_dir": adapter_dir(rdir, attempt), "world_size": len(cluster.hosts),
            "start_iteration": start_iteration, "iters": iters, "resume_adapter_file": resume_file,
            "train": cluster.train.model_dump()}


def adapter_files(host: Host, rdir: str, hashed: bool) -> dict:
    r = host.run_python(ADAPTER_FILES, [rdir, "1" if hashed else "0"], timeout=3600)
    if r.returncode != 0:
        raise LaunchError(f"{host.name}: could not list the adapter files in {rdir}: "
                          f"{r.stderr.strip()[-500:] or r.returncode}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def latest_checkpoint(listing: dict) -> tuple[str, int] | None:
    """(path, global iteration) of the newest ``NNNNNNN_adapters.safetensors`` over all attempts."""
    starts = {a["adapter_dir"]: a["start_iteration"] for a in listing["attempts"].values()}
    best: tuple[str, int] | None = None
    for rel, f in listing["files"].items():
        name = rel.rsplit("/", 1)[-1]
        if not name.endswith("_adapters.safetensors") or not name.split("_", 1)[0].isdigit():
            continue
        it = starts.get(f["path"].rsplit("/", 1)[0], 0) + int(name.split("_", 1)[0])
        if best is None or it > best[1]:
            best = (f["path"], it)
    return best


@dataclass
class Launched:
    run_id: str
    attempt: int
    start_iteration: int
    local_dir: Path
    proc: subprocess.Popen


def _start_launcher(cmd: list[str], local_dir: Path) -> subprocess.Popen:
    # mlx.launch forwards its stdin to every rank and busy-loops on EOF; hand it a pipe whose
    # write end it holds itself, so stdin never ends and never has data, even after we exit.
    r, w = os.pipe()
    try:
        with open(local_dir / OUT_LOG, "ab") as out, open(local_dir / ERR_LOG, "ab") as err:
            wrapper = ["/bin/sh", "-c", 'rc=0; "$@" || rc=$?; echo "$rc" > "$0"', str(local_dir / RC_FILE), *cmd]
            return subprocess.Popen(wrapper, stdin=r, stdout=out, stderr=err, pass_fds=(w,), start_new_session=True,
                                    env={**os.environ, "PYTHONUNBUFFERED": "1"})
    finally:
        os.close(r)
        os.close(w)


def launch(cluster: ClusterConfig, db: sqlite_utils.Database, run_id: str | None = None, resume: str | None = None,
           name: str | None = None) -> Launched:
    """Start a new run (or a new attempt of ``resume``) and return at once; see ``monitor``."""
    hosts = cluster_hosts(cluster)
    pythons = {h.python for h in hosts}
    if len(pythons) > 1:
        raise LaunchError("hosts: field 'python' differs between hosts, but mlx.launch starts every rank with one "
                          f"--python ({', '.join(sorted(pythons))}); give every host the same venv path")
    if resume:
        run_id = resume
        row = get_adapter_run(db, run_id)
        if row is None:
            raise LaunchError(f"--resume {run_id}: no such adapter run in the state store")
        if row["status"] not in TERMINAL:
            raise LaunchError(f"--resume {run_id}: the run is {row['status']}; stop it first (nko-ops thunder stop)")
        if row["world_size"] and row["world_size"] != len(hosts):
            raise LaunchError(f"--resume {run_id}: the run had {row['world_size']} ranks, the config has {len(hosts)}")
        attempt = int(row["attempt"] or 0) + 1
        rdir = row["run_dir"] or run_dir(cluster, run_id)
        if rdir != run_dir(cluster, run_id):
            raise LaunchError(f"--resume {run_id}: the run lives in {rdir}, but this config's run_root gives "
                              f"{run_dir(cluster, run_id)}")
        ckpt = latest_checkpoint(adapter_files(hosts[0], rdir, hashed=False))
        resume_file, start = ckpt if ckpt else (None, 0)
        if start >= cluster.train.iters:
            raise LaunchError(f"--resume {run_id}: the newest checkpoint is at iteration {start}, "
                              f"not below train.iters = {cluster.train.iters}; raise iters to train further")
    else:
        run_id = run_id or new_run_id()
        if get_adapter_run(db, run_id) is not None:
            raise LaunchError(f"adapter run {run_id} already exists (use --resume {run_id} to continue it)")
        attempt, start, resume_file = 0, 0, None
        rdir = run_dir(cluster, run_id)

    local_dir = (Path(cluster.local_root) / run_id).resolve()
    local_dir.mkdir(parents=True, exist_ok=True)
    (local_dir / RC_FILE).unlink(missing_ok=True)
    hf = local_dir / HOSTFILE
    hf.write_text(json.dumps(hostfile(cluster), indent=1) + "\n")
    acfg = attempt_config(cluster, run_id, attempt, start, resume_file)
    attempt_path = f"{rdir}/attempt{attempt}.json"
    written: set[tuple[str, str]] = set()
    for h in hosts:
        key = ("local", "") if h.is_local else ("ssh", h.cfg.ssh)
        if key not in written:  # local hosts share one filesystem
            h.write_file(attempt_path, json.dumps(acfg, indent=1) + "\n")
            written.add(key)
    (local_dir / f"attempt{attempt}.json").write_text(json.dumps(acfg, indent=1) + "\n")

    cmd = launcher_command(cluster, hf, attempt_path)
    fields = dict(name=name or run_id, hosts=[{"name": h.name, "ssh": h.cfg.ssh, "ip": h.cfg.ip, "kind": h.cfg.kind}
                                              for h in hosts],
                  model=cluster.model, data=cluster.data, config=config_json(cluster), world_size=len(hosts),
                  run_dir=rdir, local_dir=str(local_dir), attempt=attempt, iteration=start,
                  error=None, error_kind=None, finished_at=None)
    if attempt == 0:
        fields["started_at"] = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    how = (f"resuming from {resume_file} (iteration {start})" if resume_file else
           "resume found no checkpoint; starting from iteration 0" if resume else "new run")
    set_status(db, run_id, "running", f"attempt {attempt}: {how}; {shlex.join(cmd)}", **fields)
    proc = _start_launcher(cmd, local_dir)
    update_adapter_run(db, run_id, launcher_pid=proc.pid, heartbeat_at=None)
    log_event(db, run_id, f"launcher pid {proc.pid}", data={"command": cmd, "attempt": attempt})
    return Launched(run_id, attempt, start, local_dir, proc)


# --------------------------------------------------------------------------- stopping


def stop_ranks(cluster: ClusterConfig, rdir: str) -> dict[int, str]:
    """Stop every rank of the run by its pid file; {rank: stopped|killed|gone|foreign|alive|error ...}."""
    out = {}
    grace = int(max(1, round(cluster.watchdog.stop_grace_s)))
    for rank, h in enumerate(cluster_hosts(cluster)):
        r = h.run(f"sh -s {shlex.quote(f'{rdir}/rank{rank}.pid')} {shlex.quote(f'{WORKER_MODULE} --config {rdir}/')} "
                  f"{grace}", input=KILL_SCRIPT, timeout=grace + 30)
        out[rank] = r.stdout.strip() or f"error: {r.stderr.strip()[-200:] or r.returncode}"
    return out


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_launcher(pid: int | None, local_dir: str | None, grace: float = 5.0,
                  proc: subprocess.Popen | None = None) -> str:
    """Signal the launcher's process group (it runs in its own session, pgid == pid), after
    checking that the pid still runs our wrapper for this run's directory. ``proc``: the
    launcher's Popen when this process started it (so it is reaped, not left a zombie)."""
    if proc is not None and proc.poll() is not None:
        return f"exited {proc.returncode}"
    if not pid or not _pid_alive(pid):
        return "gone"
    cmd = subprocess.run(["ps", "-ww", "-o", "command=", "-p", str(pid)], capture_output=True, text=True).stdout
    if not local_dir or f"{local_dir}/{RC_FILE}" not in cmd:
        return "foreign"
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(pid, sig)
        except ProcessLookupError:
            return "stopped"
        end = time.monotonic() + grace
        while time.monotonic() < end:
            try:
                if os.waitpid(pid, os.WNOHANG)[0] == pid:
                    return "stopped"
            except ChildProcessError:  # not our child: poll instead
                if not _pid_alive(pid):
                    return "stopped"
            time.sleep(0.1)
    return "alive"


def stop_run(cluster: ClusterConfig, db: sqlite_utils.Database, run_id: str, status: str = "cancelled",
             reason: str = "stopped by the operator", error_kind: str | None = None) -> dict:
    """Stop the ranks, then the launcher, and mark the run; returns what happened to each."""
    row = get_adapter_run(db, run_id)
    if row is None:
        raise LaunchError(f"no adapter run {run_id} in the state store")
    rdir = row["run_dir"] or run_dir(cluster, run_id)
    ranks = stop_ranks(cluster, rdir)
    launcher = stop_launcher(row["launcher_pid"], row["local_dir"], cluster.watchdog.stop_grace_s)
    outcome = {"ranks": ranks, "launcher": launcher}
    if row["status"] not in TERMINAL or status != "cancelled":
        set_status(db, run_id, status, f"{reason}; ranks: " + ", ".join(f"{k} {v}" for k, v in ranks.items())
                   + f"; launcher {launcher}", error=None if status == "cancelled" else reason,
                   error_kind=error_kind)
    return outcome
