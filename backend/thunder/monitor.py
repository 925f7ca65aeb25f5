"""Follow a Thunder run: tail every rank's ``metrics.rank<R>.jsonl`` on its host into
state.db, watch for hangs, classify failures, and on the way out record the adapter files as
artifacts and run the AGP eval with the new adapter.

Watchdog: a rank whose metrics file has not grown for ``watchdog.window_s`` seconds (as seen
by this monitor, so host clock skew does not matter) is hung; a ring ``all_sum`` waiting on a
dead or stalled peer never returns, so the run is marked ``hung`` and all its ranks and the
launcher are stopped. Until a rank's first train/val report the longer
``watchdog.startup_window_s`` applies (imports, model load, the first validation pass); after
it, ``window_s`` must cover the time between reports (``steps_per_report`` iterations, plus a
validation pass every ``steps_per_eval``).

A monitor that attaches to a running run (``thunder monitor`` after ``launch --detach``, or
after the launching shell went away) starts from what state.db knows of the current attempt
(``state.adapters.attempt_progress``): each rank's window counts from its last recorded report and
a rank that already reported gets ``window_s``, so a run that hung while nobody watched is
caught at once. Lines no monitor has read yet count as new when first read.
"""

from __future__ import annotations

import json
import re
import shlex
import time
from pathlib import Path
from typing import Callable

import sqlite_utils

from state.store import now, record_artifacts
from backend.thunder.config import SAFE_SHAPE, ClusterConfig
from backend.thunder.hosts import cluster_hosts
from backend.thunder.launch import (ERR_LOG, RC_FILE, _pid_alive, adapter_dir, adapter_files, metrics_path,
                                    stop_launcher, stop_ranks)
from state.adapters import (OWNER_KIND, TERMINAL, add_metric_lines, attempt_progress, get_adapter_run,
                                     log_event, set_status, update_adapter_run)

METAL_TIMEOUT = re.compile(r"Command buffer execution failed:.*(?:GPU Timeout|kIOGPUCommandBufferCallbackErrorTimeout)"
                           r"|kIOGPUCommandBufferCallbackErrorTimeout")
ANSI = re.compile(r"\x1b\[[0-9;]*m")
METAL_OOM = re.compile(r"Command buffer execution failed:.*(?:Insufficient Memory|OutOfMemory)"
                       r"|kIOGPUCommandBufferCallbackErrorOutOfMemory")


def safe_shape_hint(cluster: ClusterConfig) -> str:
    t = cluster.train
    now = f"batch {t.batch_size}, {t.num_layers} LoRA layers, rank {t.lora_rank}, max seq {t.max_seq_length}"
    safe = (f"batch {SAFE_SHAPE['batch_size']}, {SAFE_SHAPE['num_layers']} LoRA layers, rank "
            f"{SAFE_SHAPE['lora_rank']}, lr {SAFE_SHAPE['learning_rate']:g}, max seq {SAFE_SHAPE['max_seq_length']}")
    return f"run with the safe shape ({safe}) in [train]; this run used {now}"


def classify_failure(stderr: str, rank_errors: dict[int, str], rc: int | None, cluster: ClusterConfig,
                     missing: list[int] | None = None) -> tuple[str, str]:
    """(error_kind, message) for a run that ended badly. ``missing``: ranks that never said
    done (mlx.launch exits 0 even when a rank fails, so its status alone proves nothing)."""
    m = METAL_TIMEOUT.search(stderr)
    if m:
        return "metal_timeout", (f"Metal command-buffer timeout (the GPU took too long on one step: "
                                 f"{m.group(0).strip()[:160]}); {safe_shape_hint(cluster)}")
    m = METAL_OOM.search(stderr)
    if m:
        return "metal_oom", f"Metal out of memory ({m.group(0).strip()[:160]}); {safe_shape_hint(cluster)}"
    if rank_errors:
        first = min(rank_errors)
        return "rank_error", f"rank {first}: {rank_errors[first]}"
    tail = [ANSI.sub("", ln).strip() for ln in stderr.strip().splitlines() if ln.strip()]
    what = f"mlx.launch exited with status {rc}"
    if missing:
        what += f" but rank(s) {', '.join(map(str, missing))} never reported done"
    return "launcher_exit", what + (f": {tail[-1][:300]}" if tail else "")


def watchdog_window(cluster: ClusterConfig, reported: bool) -> float:
    """How long a rank may go without a report: ``window_s`` once it has made a train/val
    report in this attempt, the (longer) startup window before."""
    wd = cluster.watchdog
    return wd.window_s if reported else max(wd.window_s, wd.startup_window_s)


def recorded_staleness(db: sqlite_utils.Database, run_id: str, cluster: ClusterConfig,
                       wall: float | None = None) -> list[tuple[int, float, float]]:
    """(rank, seconds since its newest recorded report, window) for every rank of a running
    run that is past its watchdog window by the state store alone (no host is asked). Such
    a run is hung, or no monitor has been following it."""
    row = get_adapter_run(db, run_id)
    if row is None or row["status"] != "running":
        return []
    seed = attempt_progress(db, run_id, int(row["attempt"] or 0), int(row["world_size"] or len(cluster.hosts)))
    wall = time.time() if wall is None else wall
    out = []
    for rank, seen in sorted(seed.last_report.items()):
        window = watchdog_window(cluster, rank in seed.reporting)
        if rank not in seed.done and wall - seen > window:
            out.append((rank, wall - seen, window))
    return out


class Monitor:
    def __init__(self, cluster: ClusterConfig, db: sqlite_utils.Database, run_id: str, proc=None,
                 clock: Callable[[], float] = time.monotonic):
        row = get_adapter_run(db, run_id)
        if row is None:
            raise KeyError(f"no adapter run {run_id} in the state store")
        self.cluster, self.db, self.run_id, self.proc, self.clock = cluster, db, run_id, proc, clock
        self.hosts = cluster_hosts(cluster)
        self.run_dir = row["run_dir"]
        self.local_dir = Path(row["local_dir"])
        self.attempt = int(row["attempt"] or 0)
        self.offsets = {int(k): v for k, v in json.loads(row["offsets"] or "{}").items()}
        # a monitor that re-attaches carries on from what the store knows of this attempt:
        # windows count from each rank's last recorded report, not from now
        seed = attempt_progress(db, run_id, self.attempt, len(self.hosts))
        started, wall = clock(), time.time()
        self.last_seen = {r: started - max(0.0, wall - seed.last_report[r]) if r in seed.last_report else started
                          for r in range(len(self.hosts))}
        self.done: set[int] = set(seed.done)
        self.read_errors: dict[int, str] = {}
        self.reporting: set[int] = set(seed.reporting)  # ranks with a train/val report in this attempt
        self.errors: dict[int, str] = dict(seed.errors)
        self.iteration = int(row["iteration"] or 0)

    # ------------------------------------------------------------------ metrics

    def read_metrics(self) -> int:
        """Pull new complete lines from every rank; returns how many arrived."""
        new_lines: list[dict] = []
        t = self.clock()
        for rank, host in enumerate(self.hosts):
            try:
                data = host.read_from(metrics_path(self.run_dir, rank), self.offsets.get(rank, 0))
            except OSError as e:  # a flaky ssh read is not a hang by itself; the window decides
                if self.read_errors.get(rank) != str(e):
                    log_event(self.db, self.run_id, f"rank {rank}: {e}", level="warning")
                self.read_errors[rank] = str(e)
                continue
            self.read_errors.pop(rank, None)
            if not data:
                continue
            # consume whole lines only; a half-written last line is read again next time
            complete, sep, _ = data.rpartition(b"\n")
            if not sep:
                continue
            self.offsets[rank] = self.offsets.get(rank, 0) + len(complete) + 1
            self.last_seen[rank] = t
            for raw in complete.split(b"\n"):
                try:
                    line = json.loads(raw)
                except json.JSONDecodeError:
                    log_event(self.db, self.run_id, f"rank {rank}: unreadable metrics line {raw[:120]!r}",
                              level="warning")
                    continue
                new_lines.append(line)
                if line.get("attempt", self.attempt) != self.attempt:
                    continue  # an earlier attempt's line: its metrics count, its done/error do not
                kind = line.get("kind")
                if kind == "done":
                    self.done.add(rank)
                elif kind == "error":
                    self.errors[rank] = line.get("error", "error")
                if kind in ("train", "val"):
                    self.reporting.add(rank)
                if kind == "train":
                    self.iteration = max(self.iteration, int(line["iteration"]))
        if new_lines:
            add_metric_lines(self.db, self.run_id, new_lines, offsets={str(k): v for k, v in self.offsets.items()},
                             iteration=self.iteration, heartbeat_at=now())
            for line in new_lines:
                if line["kind"] in ("start", "loaded", "done", "error"):
                    extra = {k: v for k, v in line.items() if k != "traceback"}
                    log_event(self.db, self.run_id, f"rank {line['rank']}: {line['kind']}",
                              level="error" if line["kind"] == "error" else "info", kind="rank", data=extra)
        return len(new_lines)

    # ------------------------------------------------------------------ launcher

    def launcher_rc(self) -> int | None:
        """The launcher's exit status, or None while it runs."""
        if self.proc is not None:
            rc = self.proc.poll()
            if rc is None:
                return None
        rcfile = self.local_dir / RC_FILE
        if rcfile.exists():
            text = rcfile.read_text().strip()
            if text.lstrip("-").isdigit():
                return int(text)
        if self.proc is not None:
            return self.proc.returncode
        row = get_adapter_run(self.db, self.run_id)
        if row["launcher_pid"] and _pid_alive(row["launcher_pid"]):
            return None
        return -1  # gone without writing its status

    def window(self, rank: int) -> float:
        return watchdog_window(self.cluster, rank in self.reporting)

    def stale_ranks(self) -> list[tuple[int, float]]:
        t = self.clock()
        return [(r, t - seen) for r, seen in sorted(self.last_seen.items())
                if r not in self.done and t - seen > self.window(r)]

    # ------------------------------------------------------------------ one step

    def poll(self) -> str | None:
        """Ingest new metrics and decide; returns the terminal status once the run has ended."""
        row = get_adapter_run(self.db, self.run_id)
        if row["status"] in TERMINAL:  # stopped by someone else (nko-ops thunder stop)
            return row["status"]
        self.read_metrics()
        rc = self.launcher_rc()
        if rc is not None:
            self.read_metrics()  # lines written just before the exit
            if len(self.done) == len(self.hosts) and not self.errors:
                return self.finish("completed", None, f"{self.iteration} iterations")
            missing = sorted(set(range(len(self.hosts))) - self.done)
            kind, msg = classify_failure(self._stderr(), self.errors, rc, self.cluster, missing)
            return self.finish("failed", kind, msg)
        if self.errors:
            kind, msg = classify_failure(self._stderr(), self.errors, rc, self.cluster)
            return self.finish("failed", kind, msg)
        stale = self.stale_ranks()
        if stale:
            ranks = ", ".join(f"{r} ({age:.0f}s, window {self.window(r):g}s"
                              + ("" if r in self.reporting else ", still starting") + ")" for r, age in stale)
            kind, msg = "hung", f"no metrics report from rank(s) {ranks}"
            if METAL_TIMEOUT.search(self._stderr()):
                kind, msg = classify_failure(self._stderr(), {}, None, self.cluster)
            return self.finish("hung", kind, msg)
        return None

    def watch(self, on_poll: Callable[["Monitor"], None] | None = None, max_s: float | None = None) -> str:
        end = None if max_s is None else self.clock() + max_s
        while True:
            status = self.poll()
            if on_poll:
                on_poll(self)
            if status:
                return status
            if end is not None and self.clock() > end:
                return "running"
            time.sleep(self.cluster.watchdog.poll_s)

    def _stderr(self, limit: int = 200_000) -> str:
        p = self.local_dir / ERR_LOG
        if not p.exists():
            return ""
        with open(p, "rb") as f:
            f.seek(max(0, p.stat().st_size - limit))
            return f.read().decode(errors="replace")

    # ------------------------------------------------------------------ the end

    def finish(self, status: str, kind: str | None, message: str) -> str:
        if status != "completed":
            ranks = stop_ranks(self.cluster, self.run_dir)
            launcher = stop_launcher(get_adapter_run(self.db, self.run_id)["launcher_pid"], str(self.local_dir),
                                     self.cluster.watchdog.stop_grace_s, proc=self.proc)
            message += "; stopped ranks: " + ", ".join(f"{r} {v}" for r, v in ranks.items()) + f"; launcher {launcher}"
        final = adapter_dir(self.run_dir, self.attempt)
        try:
            files = self.record_artifacts()
        except Exception as e:  # the run's outcome stands even if the files cannot be listed
            files = {}
            log_event(self.db, self.run_id, f"could not record artifacts: {e}", level="error")
        has_adapter = any(f["path"] == f"{final}/adapters.safetensors" for f in files.values())
        if status == "completed" and not has_adapter:
            status, kind = "failed", "no_adapter"
            message = f"every rank said done, but there is no {final}/adapters.safetensors"
        set_status(self.db, self.run_id, status, message, error=None if status == "completed" else message,
                   error_kind=kind, iteration=self.iteration, adapter_path=final if has_adapter else None)
        if status == "completed":
            self.run_agp_eval(final)
        return status

    def record_artifacts(self) -> dict:
        """Hash the adapter, its config and every checkpoint on rank 0's host into ``artifacts``."""
        host = self.hosts[0]
        listing = adapter_files(host, self.run_dir, hashed=True)
        state = "local" if host.is_local else "remote-only"
        record_artifacts(self.db, self.run_id, [
            {"name": rel, "path": f["path"], "sha256": f["sha256"], "size": f["size"],
             "locations": [{"kind": "host", "host": host.name, "ssh": host.cfg.ssh, "path": f["path"]}]}
            for rel, f in listing["files"].items()], owner_kind=OWNER_KIND, sync_state=state)
        return listing["files"]

    def run_agp_eval(self, adapter: str) -> dict:
        """Run ``backend.thunder.agp_eval`` on rank 0's host and attach its summary to the run."""
        ev = self.cluster.eval
        if not ev.enabled:
            result = {"status": "skipped", "reason": "eval.enabled = false in the cluster config"}
        elif not ev.rows:
            result = {"status": "skipped", "reason": "no eval.rows (the prediction rows the corpus was built from) "
                                                     "in the cluster config; AGP eval not run"}
        else:
            update_adapter_run(self.db, self.run_id, agp_eval={"status": "running", "adapter": adapter})
            try:
                result = self._agp_eval_on_host(adapter)
            except (OSError, ValueError) as e:
                result = {"status": "failed", "error": f"{type(e).__name__}: {e}"}
        update_adapter_run(self.db, self.run_id, agp_eval=result)
        level = "info" if result["status"] == "completed" else ("warning" if result["status"] == "skipped" else "error")
        summary, correct = result.get("overall"), result.get("already_correct")
        text = (f"AGP eval on the held-out split: CER {summary['cer_before']:.4f} -> {summary['cer_after']:.4f} "
                f"({summary['accepted']}/{summary['rows']} accepted"
                + (f"; already-correct rows damaged {correct['worse']}/{correct['rows']}" if correct else "") + ")"
                if summary else
                f"AGP eval {result['status']}: {result.get('reason') or result.get('error')}")
        log_event(self.db, self.run_id, text, level=level, kind="agp_eval")
        return result

    def _agp_eval_on_host(self, adapter: str) -> dict:
        ev, host = self.cluster.eval, self.hosts[0]
        out = f"{self.run_dir}/agp_eval"
        args = agp_eval_args(self.cluster, adapter, out)
        envs = "".join(f"{shlex.quote(e)} " for e in self.cluster.env)
        cmd = (f"cd {shlex.quote(self.cluster.workdir)} && exec env {envs}{shlex.quote(host.python)} -m "
               f"backend.thunder.agp_eval {' '.join(shlex.quote(a) for a in args)}")
        t0 = time.monotonic()
        r = host.run(cmd, timeout=ev.timeout_s)
        if r.returncode != 0:
            tail = [ln for ln in (r.stderr or "").strip().splitlines() if ln.strip()]
            return {"status": "failed", "error": tail[-1][:500] if tail else f"exit {r.returncode}",
                    "returncode": r.returncode, "seconds": round(time.monotonic() - t0, 1)}
        raw = host.read_from(f"{out}/agp_eval.json", 0)
        if raw is None:
            return {"status": "failed", "error": f"{out}/agp_eval.json was not written"}
        summary = json.loads(raw)
        summary["status"] = "completed"
        try:
            listing = host.run_python(_HASH_ONE, [f"{out}/agp_eval.json"])
            size, sha = json.loads(listing.stdout)
            record_artifacts(self.db, self.run_id, [{"name": "agp_eval/agp_eval.json", "path": f"{out}/agp_eval.json",
                                                     "sha256": sha, "size": size}], owner_kind=OWNER_KIND,
                             sync_state="local" if host.is_local else "remote-only")
        except (ValueError, OSError) as e:
            log_event(self.db, self.run_id, f"could not hash agp_eval.json: {e}", level="warning")
        return summary


_HASH_ONE = r'''
import hashlib, json, os, sys
p = sys.argv[1]
print(json.dumps([os.path.getsize(p), hashlib.sha256(open(p, "rb").read()).hexdigest()]))
'''


def agp_eval_args(cluster: ClusterConfig, adapter: str, out: str) -> list[str]:
    """The arguments of ``backend.thunder.agp_eval`` for a finished adapter (``[eval]`` of the
    cluster config)."""
    ev = cluster.eval
    args = ["--model", cluster.model, "--adapter", adapter, "--corpus", cluster.data,
            "--rows", ev.rows, "--out", out, "--max-tokens", str(ev.max_tokens)]
    for flag, value in (("--gate-policy", ev.gate_policy), ("--partition-policy", ev.partition_policy),
                        ("--partition-source", ev.partition_source), ("--acoustic-run", ev.acoustic_run)):
        if value:
            args += [flag, value]
    return args
