"""Local executor: run a matrix's trainer runs as subprocesses of this machine
(`nko-ops matrix run FILE --executor local [--parallel N]`).

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
import fcntl
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from state import store
from backend.matrix import Identity, Matrix, MatrixError, RunSpec, config_sha256, load_matrix, resolve
from backend.runs import Bundle, BundleError, import_run, recorded_hashes, register_bundle, verify_bundle
from models.errors import NkoOpsError

POLL_S = 1.0
LOG_CHUNK = 1 << 20  # bytes of trainer output read at a time


class ExecutorError(NkoOpsError, RuntimeError):
    """The matrix cannot run as asked; the message says why (nothing was started)."""


@dataclass
class RunResult:
    run_id: str
    status: str  # completed | failed | interrupted | blocked
    how: str  # reused | imported | trained | resumed | not started
    out_dir: str
    test_cer: float | None = None
    error: str | None = None
    wall_s: float = 0.0

    def __str__(self) -> str:
        cer = f" test CER {self.test_cer:.4f}" if self.test_cer is not None else ""
        err = f": {self.error}" if self.error else ""
        return f"{self.run_id}: {self.status} ({self.how}){cer}{err}"


@dataclass
class _Job:
    spec: RunSpec
    cfg: dict
    out_dir: Path
    db_id: str
    sanity: bool = False
    how: str = "trained"
    proc: subprocess.Popen | None = None
    out_file: Path | None = None
    out_offset: int = 0
    metrics_offset: int = 0
    started: float = 0.0


def _pdeathsig() -> None:
    """In the child: ask Linux to SIGTERM it when the executor dies (no orphans)."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except (ProcessLookupError, PermissionError):
        return False
    try:
        return "train" in Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        return True


def _normalised(cfg: dict) -> dict:
    from models.config import RunConfig

    return RunConfig.model_validate(cfg).to_json()


def same_config(have: dict | None, want: dict) -> bool:
    """Whether a completed run's recorded config is ``want`` up to where its files lay (the
    path fields): a run trained on Vast records the instance's paths (``data/snapshot-…``,
    ``runs/<id>``). The identities behind the paths still have to match: ``snapshot_sha256``
    is compared here, the split and recipe hashes by ``LocalExecutor.verify``."""
    from backend.vast.remote import PATH_FIELDS  # the fields the Vast executor rewrites

    def strip(cfg: dict | None) -> dict:
        return {k: v for k, v in (cfg or {}).items() if k not in PATH_FIELDS}

    return strip(have) == strip(want)


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=True) + "\n", encoding="utf-8")
    tmp.replace(path)


class LocalExecutor:
    def __init__(self, m: Matrix, ident: Identity, db, parallel: int = 1, poll_s: float = POLL_S,
                 log: Callable[[str], None] = print):
        if parallel < 1:
            raise ExecutorError("--parallel must be at least 1")
        self.m, self.ident, self.db, self.parallel, self.poll_s, self.log = m, ident, db, parallel, poll_s, log
        self.root = Path(m.out_root)
        self.stop_signal: int | None = None
        from models.split import Split

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

    # ------------------------------------------------------------------ planning

    def classify(self, specs: list[RunSpec]) -> tuple[list[RunResult], list[_Job], list[RunSpec]]:
        """(already satisfied, jobs to run, runs to import). Raises ExecutorError on refusals,
        before it writes anything; then registers the bundles found complete on disk."""
        done, jobs, imports, found = self.plan(specs)
        self.record_found(found)
        return done, jobs, imports

    def record_found(self, found: list[tuple[str, Bundle]]) -> None:
        for run_id, b in found:
            register_bundle(self.db, b, run_id, "local", self.m.matrix_id, message="found complete on disk")

    def plan(self, specs: list[RunSpec]) -> tuple[list[RunResult], list[_Job], list[RunSpec], list[tuple[str, Bundle]]]:
        """``classify`` without writing anything: also returns (run id, bundle) for the bundles
        found complete on disk that state.db does not record as completed (``record_found``)."""
        done, jobs, imports, found, refusals = [], [], [], [], []
        for spec in specs:
            cfg = self.config(spec)
            d = self.m.out_dir(spec)
            row = store.get_run(self.db, spec.run_id)
            if row and row["status"] in ("running", "queued") and _alive(row["pid"]):
                refusals.append(f"run {spec.run_id!r} is still running as pid {row['pid']} "
                                f"(started by another executor); stop it or wait")
                continue
            if (d / "manifest.json").exists():
                b = self.verify(d)
                if not b.ok:
                    refusals.append(f"run {spec.run_id!r}: {d} holds a completed bundle that fails verification "
                                    f"({b.problems[0]}); completed runs are immutable: move it away to re-run")
                elif not same_config(b.results.get("config"), cfg):
                    refusals.append(f"run {spec.run_id!r} completed with a different config than the matrix now "
                                    f"gives; completed runs are immutable: give the changed run a new run_id")
                else:
                    if not row or row["status"] != "completed":
                        found.append((spec.run_id, b))
                    done.append(RunResult(spec.run_id, "completed", "reused", str(d), b.results.get("test_cer")))
                continue
            if row and row["status"] == "completed" and row["executor"] == "import" and row["out_dir"]:
                b = self.verify(Path(row["out_dir"]), recorded=recorded_hashes(self.db, spec.run_id))
                if b.ok:
                    done.append(RunResult(spec.run_id, "completed", "reused", row["out_dir"], b.results.get("test_cer")))
                    continue
                refusals.append(f"run {spec.run_id!r}: its imported bundle {row['out_dir']} no longer verifies "
                                f"({b.problems[0]})")
                continue
            if spec.import_from and Path(spec.import_from).is_dir():
                imports.append(spec)
                continue
            if (d / "last.pt").exists() and row and row["config_sha256"] and row["config_sha256"] != config_sha256(cfg):
                refusals.append(f"run {spec.run_id!r} was interrupted with a different config; resume it with the "
                                f"original matrix or give the changed run a new run_id")
                continue
            jobs.append(_Job(spec, cfg, d, spec.run_id, how="resumed" if (d / "last.pt").exists() else "trained"))
        if refusals:
            raise ExecutorError("refusing to run the matrix:\n  " + "\n  ".join(refusals))
        return done, jobs, imports, found

    def try_import(self, spec: RunSpec) -> RunResult | None:
        try:
            b = import_run(self.db, spec.import_from, spec.run_id, self.m, self.ident)
        except BundleError as e:
            store.add_event(self.db, f"import of {spec.import_from} refused, training instead: {e}",
                            run_id=spec.run_id, kind="import", level="warning", source="executor")
            self.log(f"{spec.run_id}: import from {spec.import_from} refused; it will be trained\n  {e}")
            return None
        self.log(f"{spec.run_id}: imported from {spec.import_from}")
        return RunResult(spec.run_id, "completed", "imported", str(b.dir), b.results.get("test_cer"))

    # ------------------------------------------------------------------ running

    def launch(self, job: _Job, slots: int | None = None) -> None:
        cfg_path = self.config_path(job.spec, job.sanity)
        _write_json(cfg_path, job.cfg)
        job.out_file = self.root / "_executor" / f"{job.spec.run_id}{'.sanity' if job.sanity else ''}.out"
        job.out_file.parent.mkdir(parents=True, exist_ok=True)
        job.out_offset = job.out_file.stat().st_size if job.out_file.exists() else 0
        job.metrics_offset = 0  # re-read from the start: the trainer truncates metrics.jsonl on resume
        env = dict(os.environ)
        threads = str(max(1, (os.cpu_count() or 1) // (slots or self.parallel)))  # no oversubscription
        for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
            env.setdefault(var, threads)
        cmd = [sys.executable, "-m", "models.train_cli", "train", "--config", str(cfg_path)]
        with open(job.out_file, "ab") as out:
            job.proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                        start_new_session=True,
                                        preexec_fn=_pdeathsig if sys.platform.startswith("linux") else None)
        job.started = time.time()
        store.set_run_status(self.db, job.db_id, "running",
                             f"{job.how} by the local executor (pid {job.proc.pid})" if not job.sanity
                             else f"sanity run (pid {job.proc.pid})",
                             matrix_id=self.m.matrix_id + ("#sanity" if job.sanity else ""), script=job.spec.script,
                             mode=job.spec.mode, seed=job.spec.seed, config=job.cfg,
                             config_sha256=config_sha256(job.cfg), out_dir=str(job.out_dir.resolve()),
                             executor="local", host=socket.gethostname(), pid=job.proc.pid, started_at=store.now(),
                             heartbeat_at=store.now(), metrics_offset=0, error=None,
                             snapshot_sha256=self.ident.snapshot_sha256, split_sha256=self.ident.split_sha256,
                             recipe_hash=self.ident.recipe_hash)

    def poll(self, job: _Job) -> None:
        """Ingest new metrics and output lines, and heartbeat (one transaction each)."""
        lines, fields = [], {}
        mf = job.out_dir / "metrics.jsonl"
        if mf.exists():
            size = mf.stat().st_size
            if size < job.metrics_offset:
                job.metrics_offset = 0
            if size > job.metrics_offset:
                with open(mf, "rb") as f:
                    f.seek(job.metrics_offset)
                    chunk = f.read(size - job.metrics_offset)
                end = chunk.rfind(b"\n") + 1  # complete lines only
                for raw in chunk[:end].splitlines():
                    try:
                        rec = json.loads(raw)
                    except (json.JSONDecodeError, UnicodeDecodeError):
                        continue
                    if isinstance(rec, dict):
                        lines.append(rec)
                job.metrics_offset += end
        events = []
        for rec in lines:
            if rec.get("kind") in ("step", "epoch"):
                for k in ("epoch", "step", "train_loss", "val_loss", "best_val_loss", "best_epoch"):
                    if isinstance(rec.get(k), (int, float)) and not isinstance(rec.get(k), bool):
                        fields[k] = rec[k]
            elif rec.get("kind") == "status":
                events.append({"run_id": job.db_id, "source": "trainer", "kind": "trainer-status",
                               "message": str(rec.get("status")), "data": rec,
                               "level": "error" if rec.get("status") == "failed" else "info"})
        if job.out_file is not None and job.out_file.exists():
            with open(job.out_file, "rb") as f:
                while True:  # every complete line, a chunk at a time; the offset passes only what is stored
                    f.seek(job.out_offset)
                    chunk = f.read(LOG_CHUNK)
                    end = chunk.rfind(b"\n") + 1
                    if not end and len(chunk) == LOG_CHUNK:  # a line longer than a chunk: stored in pieces
                        end = len(chunk)
                    if not end:
                        break
                    for line in chunk[:end].decode("utf-8", errors="replace").splitlines():
                        events.append({"run_id": job.db_id, "source": "trainer", "kind": "log",
                                       "message": line[:2000]})
                    job.out_offset += end
        with store.transaction(self.db):
            store.add_metrics(self.db, job.db_id, lines, metrics_offset=job.metrics_offset,
                              log_offset=job.out_offset, heartbeat_at=store.now(), **fields)
            store.add_events(self.db, events)

    def finish(self, job: _Job, rc: int) -> RunResult:
        self.poll(job)
        wall = time.time() - job.started
        if rc == 0:
            b = self.verify(job.out_dir, subset=job.sanity)
            if b.ok:
                flags = json.loads((store.get_run(self.db, job.db_id) or {}).get("flags") or "{}")
                register_bundle(self.db, b, job.db_id, "local",
                                self.m.matrix_id + ("#sanity" if job.sanity else ""), flags=flags,
                                message=f"bundle verified ({wall:.0f} s)")
                return RunResult(job.spec.run_id, "completed", job.how, str(job.out_dir), b.results.get("test_cer"),
                                 wall_s=wall)
            error = "bundle check failed: " + "; ".join(b.problems[:3])
        elif self.stop_signal is not None:
            store.set_run_status(self.db, job.db_id, "interrupted", f"stopped by signal {self.stop_signal}; "
                                 "rerun the matrix to resume from last.pt", finished_at=store.now())
            return RunResult(job.spec.run_id, "interrupted", job.how, str(job.out_dir), wall_s=wall,
                             error="stopped; rerun to resume")
        else:
            error = f"trainer exited with status {rc}"
            ej = job.out_dir / "error.json"
            if ej.exists():
                try:
                    info = json.loads(ej.read_text(encoding="utf-8"))
                    error += f" in {info.get('stage')}: {info.get('error_type')}: {info.get('message')}"
                except (ValueError, OSError):
                    pass
            elif job.out_file is not None and job.out_file.exists():
                tail = job.out_file.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-3:]
                if tail:
                    error += ": " + " | ".join(tail)
        store.set_run_status(self.db, job.db_id, "failed", error, finished_at=store.now(), error=error)
        return RunResult(job.spec.run_id, "failed", job.how, str(job.out_dir), error=error, wall_s=wall)

    def execute(self, jobs: list[_Job], slots: int | None = None) -> list[RunResult]:
        """Run ``jobs`` at most ``slots`` (default ``parallel``) at a time; results in job order."""
        slots = slots or self.parallel
        pending, active, results = list(jobs), [], {}
        for job in jobs:
            store.set_run_status(self.db, job.db_id, "queued", job.how,
                                 matrix_id=self.m.matrix_id + ("#sanity" if job.sanity else ""),
                                 script=job.spec.script, mode=job.spec.mode, seed=job.spec.seed,
                                 out_dir=str(job.out_dir.resolve()), executor="local")
        try:
            while pending or active:
                while pending and len(active) < slots and self.stop_signal is None:
                    job = pending.pop(0)
                    self.log(f"{job.db_id}: {'sanity run' if job.sanity else job.how} -> {job.out_dir}")
                    self.launch(job, slots)
                    active.append(job)
                if self.stop_signal is not None:
                    for job in active:
                        if job.proc.poll() is None:
                            job.proc.terminate()
                    for job in pending:
                        store.set_run_status(self.db, job.db_id, "planned", "not started: executor stopped")
                        results[job.db_id] = RunResult(job.spec.run_id, "interrupted", "not started", str(job.out_dir))
                    pending = []
                time.sleep(self.poll_s)
                for job in list(active):
                    rc = job.proc.poll()
                    if rc is None:
                        self.poll(job)
                        continue
                    active.remove(job)
                    r = self.finish(job, rc)
                    results[job.db_id] = r
                    self.log(str(r) if not job.sanity else f"sanity {r}")
        finally:
            for job in active:  # an exception in this loop: leave no trainer behind
                if job.proc.poll() is None:
                    job.proc.terminate()
                    try:
                        job.proc.wait(30)
                    except subprocess.TimeoutExpired:
                        job.proc.kill()
        return [results[j.db_id] for j in jobs]

    # ------------------------------------------------------------------ sanity

    def sanity(self, jobs: list[_Job]) -> tuple[bool, list[str]]:
        todo, notes = [], []
        for spec in sanity_specs([j.spec for j in jobs]):
            cfg = self.config(spec, sanity=True)
            d = self.m.sanity_dir(spec)
            if (d / "manifest.json").exists():
                b = self.verify(d, subset=True)
                if b.ok and b.results.get("config") == cfg:
                    notes.append(f"{spec.script}/{spec.mode}: passed before ({d})")
                    continue
                # a stale or different sanity run: start it afresh (sanity dirs are scratch)
                import shutil

                shutil.rmtree(d)
            todo.append(_Job(spec, cfg, d, f"{spec.run_id}#sanity", sanity=True, how="sanity"))
        if todo:
            self.log(f"sanity step: {len(todo)} short run(s) ({self.m.sanity.epochs} epoch(s) on "
                     f"{self.m.sanity.subset.train}/{self.m.sanity.subset.val}/{self.m.sanity.subset.test} utterances)")
        # sanity runs are small: on a multi-core machine two share it even with --parallel 1
        results = self.execute(todo, max(self.parallel, min(2, os.cpu_count() or 1)))
        ok = True
        for job, r in zip(todo, results):
            notes.append(f"{job.spec.script}/{job.spec.mode}: {r.status}" + (f" ({r.error})" if r.error else ""))
            ok = ok and r.status == "completed"
        return ok, notes


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


def _lock(root: Path, matrix_id: str):
    root.mkdir(parents=True, exist_ok=True)
    f = open(root / f".executor-{matrix_id}.lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ExecutorError(f"another executor is running matrix {matrix_id!r} (lock {root}/.executor-{matrix_id}.lock)")
    return f


def check_matrix(db, m: Matrix, ident: Identity) -> None:
    """Refuse a matrix that ran before on other snapshot / split / recipe identities."""
    row = next(iter(db.query("SELECT * FROM matrices WHERE id = ?", [m.matrix_id])), None)
    if row:
        for key in ("snapshot_sha256", "split_sha256", "recipe_hash"):
            if row[key] and row[key] != getattr(ident, key):
                raise ExecutorError(f"matrix {m.matrix_id!r} ran before with {key} {row[key][:16]}…, now "
                                    f"{getattr(ident, key)[:16]}…; its runs would mix {key.split('_')[0]}s: "
                                    f"use a new matrix_id")


def register_matrix(db, m: Matrix, ident: Identity) -> None:
    """Record the matrix and its identities; refuse if it ran on other ones before."""
    check_matrix(db, m, ident)
    with store.transaction(db):
        db.conn.execute(
            "INSERT INTO matrices(id, path, sha256, snapshot_sha256, split_sha256, recipe_hash, updated_at) "
            "VALUES (?,?,?,?,?,?,?) ON CONFLICT(id) DO UPDATE SET path = excluded.path, sha256 = excluded.sha256, "
            "updated_at = excluded.updated_at",
            (m.matrix_id, str(m.path), m.file_sha256, ident.snapshot_sha256, ident.split_sha256, ident.recipe_hash,
             store.now()))
        db.conn.execute("INSERT OR IGNORE INTO snapshots(sha256, path, rows) VALUES (?,?,?)",
                        (ident.snapshot_sha256, m.snapshot, ident.snapshot_rows))
        db.conn.execute("INSERT OR IGNORE INTO splits(sha256, snapshot_sha256, path, train, val, test) "
                        "VALUES (?,?,?,?,?,?)", (ident.split_sha256, ident.snapshot_sha256, m.split,
                                                 *(ident.split_sizes.get(p) for p in ("train", "val", "test"))))


def load_and_resolve(matrix_path: str | Path) -> tuple[Matrix, Identity]:
    m = load_matrix(matrix_path)
    ident = resolve(m)
    if ident.problems:
        raise MatrixError(f"{matrix_path}: the matrix does not match its files\n  " + "\n  ".join(ident.problems))
    return m, ident


def write_agp_dumps(m: Matrix, db) -> Path | None:
    """``out_root/agp_dumps.json``: the verified prediction files of the matrix's AGP runs."""
    if not m.agp_dumps:
        return None
    entries = []
    for rid in m.agp_dumps:
        row = store.get_run(db, rid)
        if not row or row["status"] != "completed":
            continue
        art = next(iter(db.query("SELECT path, sha256, size FROM artifacts WHERE owner_kind = 'run' AND run_id = ? "
                                 "AND name = 'test_predictions.jsonl'", [rid])), None)
        if art:
            entries.append({"run_id": rid, "script": row["script"], "mode": row["mode"], "predictions": art["path"],
                            "sha256": art["sha256"], "size": art["size"]})
    path = Path(m.out_root) / "agp_dumps.json"
    _write_json(path, {"matrix_id": m.matrix_id, "runs": entries})
    return path


def sanity_gate(ex: "LocalExecutor", db, m: Matrix, jobs: list[_Job], skip_sanity: bool,
                log: Callable[[str], None], nothing_started: str = "full runs not started") -> list[RunResult] | None:
    """Run the sanity step for ``jobs`` (or record that it was skipped by request) and mark
    each job's flags. Returns the blocked results when it failed, else None."""
    if skip_sanity:
        store.add_event(db, f"sanity step skipped by request for {len(jobs)} run(s)", kind="sanity",
                        level="warning", source="executor",
                        data={"matrix_id": m.matrix_id, "runs": [j.spec.run_id for j in jobs]})
        log("sanity step SKIPPED (recorded in state.db)")
    else:
        ok, notes = ex.sanity(jobs)
        store.add_event(db, "sanity step " + ("passed" if ok else "FAILED") + ": " + "; ".join(notes),
                        kind="sanity", level="info" if ok else "error", source="executor",
                        data={"matrix_id": m.matrix_id, "ok": ok, "notes": notes})
        for n in notes:
            log(f"sanity {n}")
        if not ok:
            msg = f"sanity step failed; {nothing_started}" if ex.stop_signal is None else "stopped"
            return [RunResult(j.spec.run_id, "blocked", "not started", str(j.out_dir), error=msg) for j in jobs]
    for job in jobs:
        row = store.get_run(db, job.db_id)
        flags = json.loads(row["flags"]) if row and row["flags"] else {}
        flags["sanity"] = "skipped" if skip_sanity else "passed"
        store.upsert_run(db, job.db_id, flags=flags)
    return None


def run_matrix(matrix_path: str | Path, db_path: str | Path = "state.db", executor: str = "local",
               parallel: int = 1, skip_sanity: bool = False, with_optional: bool = False,
               only: list[str] | None = None, poll_s: float = POLL_S,
               log: Callable[[str], None] = print) -> list[RunResult]:
    """Run a matrix; returns one RunResult per selected run (see the module docstring).
    Raises MatrixError / ExecutorError, before anything is written, when it cannot."""
    if executor == "vast":  # one instance per run on Vast.ai (backend/vast/executor.py)
        from backend.vast.executor import run_matrix_vast

        return run_matrix_vast(matrix_path, db_path, parallel=parallel, skip_sanity=skip_sanity,
                               with_optional=with_optional, only=only, log=log)
    if executor != "local":
        raise ExecutorError(f"executor {executor!r} is not available (one of: local, vast)")
    m, ident = load_and_resolve(matrix_path)
    specs = m.selected(with_optional, only)
    # every check that can refuse runs before anything is written: first without the lock
    # (taking it creates out_root), then again under it if another executor changed the runs
    check_db = store.open_db(db_path if Path(db_path).exists() else ":memory:")
    try:
        ex = LocalExecutor(m, ident, check_db, parallel, poll_s, log)
        seen, plan = _checked_plan(ex, specs)
    finally:
        check_db.close()
    lock = _lock(Path(m.out_root), m.matrix_id)
    db = ex.db = store.open_db(db_path)
    try:
        if _runs_seen(ex, specs) != seen:
            plan = _checked_plan(ex, specs)[1]
        done, jobs, imports, found = plan
        register_matrix(db, m, ident)
        for spec in specs:
            if store.get_run(db, spec.run_id) is None:
                store.set_run_status(db, spec.run_id, "planned", f"in matrix {m.matrix_id}", matrix_id=m.matrix_id,
                                     script=spec.script, mode=spec.mode, seed=spec.seed,
                                     out_dir=str(m.out_dir(spec).resolve()))
        for row in db.query("SELECT id, pid FROM runs WHERE status IN ('running', 'queued') AND executor = 'local' "
                            "AND matrix_id IN (?, ?)", [m.matrix_id, m.matrix_id + "#sanity"]):
            if not _alive(row["pid"]):
                store.set_run_status(db, row["id"], "interrupted", "its executor stopped; will resume from last.pt")
        ex.record_found(found)
        for spec in imports:
            r = ex.try_import(spec)
            if r is not None:
                done.append(r)
            else:
                d = m.out_dir(spec)
                jobs.append(_Job(spec, ex.config(spec), d, spec.run_id,
                                 how="resumed" if (d / "last.pt").exists() else "trained"))
        for r in done:
            log(f"{r.run_id}: {r.how} ({r.out_dir})")
        previous: dict[int, object] = {}
        if threading_main():
            for sig in (signal.SIGINT, signal.SIGTERM):
                previous[sig] = signal.signal(sig, lambda s, f: setattr(ex, "stop_signal", s))
        try:
            if jobs:
                blocked = sanity_gate(ex, db, m, jobs, skip_sanity, log)
                if blocked is not None:
                    return done + blocked
                done += ex.execute(jobs)
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
        write_agp_dumps(m, db)
        order = {s.run_id: i for i, s in enumerate(specs)}
        return sorted(done, key=lambda r: order[r.run_id])
    finally:
        db.close()
        lock.close()


def _runs_seen(ex: LocalExecutor, specs: list[RunSpec]) -> list:
    """What ``plan`` reads that another executor changes: the run rows and which run
    directories hold manifest.json / last.pt."""
    return [(store.get_run(ex.db, s.run_id), (ex.m.out_dir(s) / "manifest.json").exists(),
             (ex.m.out_dir(s) / "last.pt").exists()) for s in specs]


def _checked_plan(ex: LocalExecutor, specs: list[RunSpec]) -> tuple[list, tuple]:
    """(``_runs_seen``, ``ex.plan``) after the matrix's identity check; raises on refusals."""
    check_matrix(ex.db, ex.m, ex.ident)
    return _runs_seen(ex, specs), ex.plan(specs)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()
