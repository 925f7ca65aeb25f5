"""Local executor: run a matrix's trainer runs as subprocesses of this machine
(`nko-ops matrix run FILE --executor local [--parallel N]`). Steps 1-3 and the sanity gate
live in backend/matrix_run.py (shared with the Vast executor), the loop that runs the jobs in
backend/executor.py; this module plans the runs and runs the trainers.

Order of work, nothing written (not state.db, not out_root) before step 2 has passed:

1. Load and validate the matrix, hash its snapshot / split / feature store and compare with
   the pins (backend/matrix.py) and with the identities state.db pinned for the matrix.
2. Classify each selected run: *reuse* (its directory holds a bundle that verifies, with the
   same config up to where its files lay: a run trained on Vast records the instance's
   paths), *import* (``import_from`` names a directory that passes `runs import`), *resume*
   (``last.pt`` present: the trainer continues from it) or *train*. A completed run whose
   config changed is refused: completed runs are immutable. Then take the matrix's executor
   lock (classifying again if another executor changed the runs meanwhile), pin the matrix
   and record the runs.
3. Sanity step: for each mode and each script still to train, one short run
   (``sanity.epochs`` epochs on ``sanity.subset``) under ``out_root/_sanity/``, whose bundle
   must verify (two at a time on a multi-core machine). Any failure stops the matrix
   before a full run starts. ``skip_sanity`` skips it and is recorded (an event and every
   run's flags).
4. Full runs, at most ``parallel`` at a time, each with cores / parallel torch threads
   (on a busy 2-core machine, two torch threads per trainer made epochs erratic and often
   many times slower than one):
   ``python -m models.train_cli train --config …``
   with stdout/stderr to ``out_root/_executor/<run_id>.out``. Every poll: new
   ``metrics.jsonl`` lines into ``metrics``, new output lines into ``events``, a heartbeat
   into ``runs``. Exit 0 + a verified bundle = completed; anything else = failed (with the
   trainer's error.json message). SIGINT/SIGTERM stop the children (their ``last.pt`` stays)
   and mark the runs interrupted; a trainer whose executor is killed outright gets SIGTERM
   from the kernel (Linux parent-death signal), so a later executor resumes it cleanly.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from backend.executor import ExecutorError, Job, Outcome, RunResult, trainer_alive
from backend.matrix import Identity, Matrix, RunSpec, config_sha256
from backend.runs import Bundle, import_run, recorded_hashes, register_bundle, verify_bundle
from backend.vast.remote import PATH_FIELDS  # the fields the Vast executor rewrites
from models.bundle import BundleError
from models.config import RunConfig
from models.files import atomic_write_json
from models.split import Split
from state import execution, store
from state.execution import RunStatus

POLL_S = 1.0
LOG_CHUNK = 1 << 20  # bytes of trainer output read at a time


@dataclass
class Trainer:
    """A job's trainer process and how far its output and metrics were read."""

    proc: subprocess.Popen | None
    out_file: Path
    out_offset: int = 0
    metrics_offset: int = 0
    started: float = 0.0


def _pdeathsig() -> None:
    """In the child: ask Linux to SIGTERM it when the executor dies (no orphans)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _normalised(cfg: dict) -> dict:
    return RunConfig.model_validate(cfg).to_json()


def same_config(have: dict | None, want: dict) -> bool:
    """Whether a completed run's recorded config is ``want`` up to where its files lay (the
    path fields): a run trained on Vast records the instance's paths (``data/snapshot-…``,
    ``runs/<id>``). The identities behind the paths still have to match: ``snapshot_sha256``
    is compared here, the split and recipe hashes by ``LocalExecutor.verify``."""

    def strip(cfg: dict | None) -> dict:
        return {k: v for k, v in (cfg or {}).items() if k not in PATH_FIELDS}

    return strip(have) == strip(want)


class LocalExecutor:
    """Trainer runs as subprocesses of this machine (the ``backend.executor.Executor`` protocol),
    plus the planning every executor of a matrix relies on (``plan``, ``verify``, ``sanity``)."""

    def __init__(self, m: Matrix, ident: Identity, db, parallel: int = 1, poll_s: float = POLL_S,
                 log: Callable[[str], None] = print):
        if parallel < 1:
            raise ExecutorError("--parallel must be at least 1")
        self.m, self.ident, self.db, self.parallel, self.poll_s, self.log = m, ident, db, parallel, poll_s, log
        self.root = Path(m.out_root)
        self.stop_signal: int | None = None
        self.trainers: dict[str, Trainer] = {}
        self.test_ids = Split.load(Path(m.split)).test

    # ------------------------------------------------------------------ configs

    def config(self, spec: RunSpec, sanity: bool = False) -> dict:
        cfg = self.m.run_config(spec, sanity=sanity)
        cfg["snapshot_sha256"] = self.ident.snapshot_sha256  # the trainer verifies it
        return _normalised(cfg)

    def config_path(self, spec: RunSpec, sanity: bool = False) -> Path:
        return self.root / "_configs" / f"{spec.run_id}{'.sanity' if sanity else ''}.json"

    def verify(self, d: Path, subset: bool = False, recorded: dict | None = None):
        return verify_bundle(d, self.ident.snapshot_sha256, self.ident.split_sha256, self.ident.recipe_hash,
                             self.test_ids, subset=subset, recorded=recorded)

    def job(self, spec: RunSpec) -> Job:
        """The job of a full run: resumed when its directory holds last.pt."""
        d = self.m.out_dir(spec)
        return Job(spec, self.config(spec), d, how="resumed" if (d / "last.pt").exists() else "trained")

    # ------------------------------------------------------------------ planning

    def classify(self, specs: list[RunSpec]) -> tuple[list[RunResult], list[Job], list[RunSpec]]:
        """(already satisfied, jobs to run, runs to import). Raises ExecutorError on refusals,
        before it writes anything; then registers the bundles found complete on disk."""
        done, jobs, imports, found = self.plan(specs)
        self.record_found(found)
        return done, jobs, imports

    def record_found(self, found: list[tuple[str, Bundle]]) -> None:
        for run_id, b in found:
            register_bundle(self.db, b, run_id, "local", self.m.matrix_id, message="found complete on disk")

    def plan(self, specs: list[RunSpec]) -> tuple[list[RunResult], list[Job], list[RunSpec], list[tuple[str, Bundle]]]:
        """``classify`` without writing anything: also returns (run id, bundle) for the bundles
        found complete on disk that state.db does not record as completed (``record_found``)."""
        done, jobs, imports, found, refusals = [], [], [], [], []
        for spec in specs:
            kind, what = self._classify_one(spec)
            if kind == "refused":
                refusals.append(what)
            elif kind == "import":
                imports.append(what)
            elif kind == "job":
                jobs.append(what)
            else:
                result, bundle = what
                done.append(result)
                if bundle is not None:
                    found.append((spec.run_id, bundle))
        if refusals:
            raise ExecutorError("refusing to run the matrix:\n  " + "\n  ".join(refusals))
        return done, jobs, imports, found

    def _classify_one(self, spec: RunSpec) -> tuple[str, object]:
        """("refused", why) | ("done", (RunResult, bundle to record or None)) | ("import", spec) |
        ("job", Job)."""
        cfg = self.config(spec)
        d = self.m.out_dir(spec)
        row = store.get_run(self.db, spec.run_id)
        if row and row["status"] in (RunStatus.RUNNING, RunStatus.QUEUED) and trainer_alive(row["pid"]):
            return "refused", (f"run {spec.run_id!r} is still running as pid {row['pid']} "
                               f"(started by another executor); stop it or wait")
        if (d / "manifest.json").exists():
            b = self.verify(d)
            if not b.ok:
                return "refused", (f"run {spec.run_id!r}: {d} holds a completed bundle that fails verification "
                                   f"({b.problems[0]}); completed runs are immutable: move it away to re-run")
            if not same_config(b.results.get("config"), cfg):
                return "refused", (f"run {spec.run_id!r} completed with a different config than the matrix now "
                                   f"gives; completed runs are immutable: give the changed run a new run_id")
            r = RunResult(spec.run_id, Outcome.COMPLETED, "reused", str(d), b.results.get("test_cer"))
            return "done", (r, b if not row or row["status"] != RunStatus.COMPLETED else None)
        if row and row["status"] == RunStatus.COMPLETED and row["executor"] == "import" and row["out_dir"]:
            b = self.verify(Path(row["out_dir"]), recorded=recorded_hashes(self.db, spec.run_id))
            if b.ok:
                return "done", (RunResult(spec.run_id, Outcome.COMPLETED, "reused", row["out_dir"], b.results.get("test_cer")),
                                None)
            return "refused", (f"run {spec.run_id!r}: its imported bundle {row['out_dir']} no longer verifies "
                               f"({b.problems[0]})")
        if spec.import_from and Path(spec.import_from).is_dir():
            return "import", spec
        if (d / "last.pt").exists() and row and row["config_sha256"] and row["config_sha256"] != config_sha256(cfg):
            return "refused", (f"run {spec.run_id!r} was interrupted with a different config; resume it with the "
                               f"original matrix or give the changed run a new run_id")
        return "job", Job(spec, cfg, d, how="resumed" if (d / "last.pt").exists() else "trained")

    def try_import(self, spec: RunSpec) -> RunResult | None:
        try:
            b = import_run(self.db, spec.import_from, spec.run_id, self.m, self.ident)
        except BundleError as e:
            store.add_event(self.db, f"import of {spec.import_from} refused, training instead: {e}",
                            run_id=spec.run_id, kind="import", level="warning", source="executor")
            self.log(f"{spec.run_id}: import from {spec.import_from} refused; it will be trained\n  {e}")
            return None
        self.log(f"{spec.run_id}: imported from {spec.import_from}")
        return RunResult(spec.run_id, Outcome.COMPLETED, "imported", str(b.dir), b.results.get("test_cer"))

    # ------------------------------------------------------------------ the Executor protocol

    def begin(self, jobs: list[Job], results: dict[str, RunResult]) -> tuple[list[Job], list[Job]]:
        for job in jobs:
            execution.set_status(self.db, job.state_id, RunStatus.QUEUED, job.how, matrix_id=self.m.matrix_id,
                                 sanity=int(job.sanity), script=job.spec.script, mode=job.spec.mode,
                                 seed=job.spec.seed, out_dir=str(job.out_dir.resolve()), executor="local")
        return list(jobs), []

    def launch(self, job: Job, slots: int) -> RunResult | None:
        self.log(f"{job.state_id}: {'sanity run' if job.sanity else job.how} -> {job.out_dir}")
        cfg_path = self.config_path(job.spec, job.sanity)
        atomic_write_json(cfg_path, job.cfg, sort_keys=True)
        out_file = self.root / "_executor" / f"{job.spec.run_id}{'.sanity' if job.sanity else ''}.out"
        out_file.parent.mkdir(parents=True, exist_ok=True)
        # metrics are re-read from the start: the trainer truncates metrics.jsonl on resume
        t = self.trainers[job.state_id] = Trainer(None, out_file, out_file.stat().st_size if out_file.exists() else 0)
        env = dict(os.environ)
        threads = str(max(1, (os.cpu_count() or 1) // slots))  # no oversubscription
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, threads)
        cmd = [sys.executable, "-m", "models.train_cli", "train", "--config", str(cfg_path)]
        with open(out_file, "ab") as out:
            t.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                      start_new_session=True,
                                      preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None)
        t.started = time.time()
        pid = t.proc.pid
        execution.set_status(self.db, job.state_id, RunStatus.RUNNING,
                             f"{job.how} by the local executor (pid {pid})" if not job.sanity
                             else f"sanity run (pid {pid})",
                             matrix_id=self.m.matrix_id, sanity=int(job.sanity), script=job.spec.script,
                             mode=job.spec.mode, seed=job.spec.seed, config=job.cfg,
                             config_sha256=config_sha256(job.cfg), out_dir=str(job.out_dir.resolve()),
                             executor="local", host=socket.gethostname(), pid=pid, started_at=store.now(),
                             heartbeat_at=store.now(), metrics_offset=0, error=None,
                             snapshot_sha256=self.ident.snapshot_sha256, split_sha256=self.ident.split_sha256,
                             recipe_hash=self.ident.recipe_hash)
        return None

    def poll(self, active: list[Job]) -> list[tuple[Job, RunResult]]:
        ended = []
        for job in active:
            rc = self.trainers[job.state_id].proc.poll()
            if rc is None:
                self.ingest(job)
            else:
                ended.append((job, self.finish(job, rc)))
        return ended

    def stop(self, job: Job, signum: int) -> RunResult | None:
        """SIGTERM the trainer (its last.pt stays); ``poll`` reports it interrupted once it exits."""
        self.stop_signal = signum
        proc = self.trainers[job.state_id].proc
        if proc.poll() is None:
            proc.terminate()
        return None

    def not_started(self, job: Job, signum: int) -> RunResult:
        self.stop_signal = signum
        execution.set_status(self.db, job.state_id, RunStatus.PLANNED, "not started: executor stopped")
        return RunResult(job.spec.run_id, Outcome.INTERRUPTED, "not started", str(job.out_dir))

    def halt(self) -> str | None:
        return None  # nothing local to budget

    def abort(self, job: Job, reason: str) -> RunResult:
        raise AssertionError("the local executor never halts")

    def detached(self, job: Job) -> RunResult:
        raise AssertionError("the local executor does not detach")

    def end(self, active: list[Job]) -> None:
        for job in active:  # an exception in the loop: leave no trainer behind
            proc = self.trainers[job.state_id].proc
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(30)
                except subprocess.TimeoutExpired:
                    proc.kill()

    # ------------------------------------------------------------------ a running trainer

    def ingest(self, job: Job) -> None:
        """Ingest new metrics and output lines, and heartbeat (one transaction each)."""
        t = self.trainers[job.state_id]
        lines = self._new_metrics(job.out_dir / "metrics.jsonl", t)
        fields, events = {}, []
        for rec in lines:
            if rec.get("kind") in ("step", "epoch"):
                for k in ("epoch", "step", "train_loss", "val_loss", "best_val_loss", "best_epoch"):
                    if isinstance(rec.get(k), (int, float)) and not isinstance(rec.get(k), bool):
                        fields[k] = rec[k]
            elif rec.get("kind") == "status":
                events.append({"run_id": job.state_id, "source": "trainer", "kind": "trainer-status",
                               "message": str(rec.get("status")), "data": rec,
                               "level": "error" if rec.get("status") == "failed" else "info"})
        events += [{"run_id": job.state_id, "source": "trainer", "kind": "log", "message": line[:2000]}
                   for line in self._new_output(t)]
        with store.transaction(self.db):
            store.add_metrics(self.db, job.state_id, lines, metrics_offset=t.metrics_offset,
                              log_offset=t.out_offset, heartbeat_at=store.now(), **fields)
            store.add_events(self.db, events)

    @staticmethod
    def _new_metrics(mf: Path, t: Trainer) -> list[dict]:
        """The complete metrics.jsonl records written since the last read."""
        if not mf.exists():
            return []
        size = mf.stat().st_size
        if size < t.metrics_offset:
            t.metrics_offset = 0
        if size <= t.metrics_offset:
            return []
        with open(mf, "rb") as f:
            f.seek(t.metrics_offset)
            chunk = f.read(size - t.metrics_offset)
        end = chunk.rfind(b"\n") + 1  # complete lines only
        lines = []
        for raw in chunk[:end].splitlines():
            try:
                rec = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                continue
            if isinstance(rec, dict):
                lines.append(rec)
        t.metrics_offset += end
        return lines

    @staticmethod
    def _new_output(t: Trainer) -> list[str]:
        """Every complete output line since the last read, a chunk at a time; the offset passes
        only what is returned."""
        out: list[str] = []
        if not t.out_file.exists():
            return out
        with open(t.out_file, "rb") as f:
            while True:
                f.seek(t.out_offset)
                chunk = f.read(LOG_CHUNK)
                end = chunk.rfind(b"\n") + 1
                if not end and len(chunk) == LOG_CHUNK:  # a line longer than a chunk: stored in pieces
                    end = len(chunk)
                if not end:
                    break
                out += chunk[:end].decode("utf-8", errors="replace").splitlines()
                t.out_offset += end
        return out

    def finish(self, job: Job, rc: int) -> RunResult:
        self.ingest(job)
        t = self.trainers[job.state_id]
        wall = time.time() - t.started
        if rc == 0:
            b = self.verify(job.out_dir, subset=job.sanity)
            if b.ok:
                register_bundle(self.db, b, job.state_id, "local", self.m.matrix_id,
                                flags=execution.run_flags(self.db, job.state_id),
                                message=f"bundle verified ({wall:.0f} s)")
                return RunResult(job.spec.run_id, Outcome.COMPLETED, job.how, str(job.out_dir), b.results.get("test_cer"),
                                 wall_s=wall)
            error = "bundle check failed: " + "; ".join(b.problems[:3])
        elif self.stop_signal is not None:
            execution.set_status(self.db, job.state_id, RunStatus.INTERRUPTED,
                                 f"stopped by signal {self.stop_signal}; rerun the matrix to resume from last.pt",
                                 finished_at=store.now())
            return RunResult(job.spec.run_id, Outcome.INTERRUPTED, job.how, str(job.out_dir), wall_s=wall,
                             error="stopped; rerun to resume")
        else:
            error = trainer_error(rc, job.out_dir, t.out_file)
        execution.set_status(self.db, job.state_id, RunStatus.FAILED, error, finished_at=store.now(), error=error)
        return RunResult(job.spec.run_id, Outcome.FAILED, job.how, str(job.out_dir), error=error, wall_s=wall)

    # ------------------------------------------------------------------ sanity

    def sanity_jobs(self, jobs: list[Job]) -> tuple[list[Job], list[str]]:
        """The sanity runs still to do for ``jobs`` (sanity_specs), and notes on those that
        passed before."""
        todo, notes = [], []
        for spec in sanity_specs([j.spec for j in jobs]):
            cfg = self.config(spec, sanity=True)
            d = self.m.sanity_dir(spec)
            if (d / "manifest.json").exists():
                b = self.verify(d, subset=True)
                if b.ok and b.results.get("config") == cfg:
                    notes.append(f"{spec.script}/{spec.mode}: passed before ({d})")
                    continue
                shutil.rmtree(d)  # a stale or different sanity run: start it afresh (sanity dirs are scratch)
            todo.append(Job(spec, cfg, d, sanity=True, how="sanity"))
        if todo:
            self.log(f"sanity step: {len(todo)} short run(s) ({self.m.sanity.epochs} epoch(s) on "
                     f"{self.m.sanity.subset.train}/{self.m.sanity.subset.val}/{self.m.sanity.subset.test} utterances)")
        return todo, notes

    def sanity_slots(self) -> int:
        """Sanity runs are small: on a multi-core machine two share it even with --parallel 1."""
        return max(self.parallel, min(2, os.cpu_count() or 1))


def trainer_error(rc: int, out_dir: Path, out_file: Path | None) -> str:
    """Why a trainer failed: its error.json, else the last lines of its output."""
    error = f"trainer exited with status {rc}"
    ej = out_dir / "error.json"
    if ej.exists():
        try:
            info = json.loads(ej.read_text(encoding="utf-8"))
            error += f" in {info.get('stage')}: {info.get('error_type')}: {info.get('message')}"
        except (ValueError, OSError):
            pass
    elif out_file is not None and out_file.exists():
        tail = out_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
        if tail:
            error += ": " + " | ".join(tail)
    return error


def sanity_specs(specs: list[RunSpec]) -> list[RunSpec]:
    """The fewest runs (first in matrix order) that exercise every mode and every script of
    ``specs``: one per mode, plus one per script not covered yet."""
    chosen: list[RunSpec] = []
    for spec in specs:
        if spec.mode not in {c.mode for c in chosen}:
            chosen.append(spec)
    for spec in specs:
        if spec.script not in {c.script for c in chosen}:
            chosen.append(spec)
    return chosen
