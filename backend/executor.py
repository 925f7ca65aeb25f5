"""What every executor shares: the job and result types, the protocol an executor implements
(launch, poll, stop), and the one driver loop that runs jobs through it.

The driver owns what must not differ between executors: at most ``slots`` jobs at a time,
SIGINT/SIGTERM (no new launch; each active job is asked to stop, jobs not started yet are
reported as such), results in job order, and an executor-wide halt (a budget cap) that ends
the whole batch. How a job starts, is watched and stops is the executor's business:
backend/executor_local.py (trainer subprocesses) and backend/vast/executor.py (one rented
instance per run). The matrix-level steps around the loop (pre-check, lock, stale-run sweep,
sanity step) are in backend/matrix_run.py.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import signal
import threading
import time
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path
from typing import Callable, Iterator, Protocol

from models.errors import NkoOpsError
from backend.matrix import RunSpec
from state import execution


class ExecutorError(NkoOpsError, RuntimeError):
    """The matrix cannot run as asked; the message says why (nothing was started)."""


class Outcome(StrEnum):
    """How a run ended for this executor session (``running``: detached, still training)."""

    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    BLOCKED = "blocked"
    RUNNING = "running"


@dataclass
class RunResult:
    run_id: str
    status: Outcome
    how: str  # reused | imported | trained | resumed | synced | not started
    out_dir: str
    test_cer: float | None = None
    error: str | None = None
    wall_s: float = 0.0

    def __str__(self) -> str:
        cer = f" test CER {self.test_cer:.4f}" if self.test_cer is not None else ""
        err = f": {self.error}" if self.error else ""
        return f"{self.run_id}: {self.status} ({self.how}){cer}{err}"


@dataclass
class Job:
    """One trainer run to execute: a matrix run, or (``sanity``) its short check on a subset."""

    spec: RunSpec
    cfg: dict
    out_dir: Path
    sanity: bool = False
    how: str = "trained"  # trained | resumed | sanity

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    @property
    def state_id(self) -> str:
        """The run's id in state.db (a sanity run has its own row, flagged ``sanity``)."""
        return execution.sanity_run_id(self.run_id) if self.sanity else self.run_id


class Executor(Protocol):
    """What the driver needs of an executor. ``launch`` returns None once the job runs, or
    its result when it could not start (blocked, failed); ``poll`` returns the jobs of
    ``active`` that ended, with their results; ``stop`` asks a running job to stop and returns
    its result, or None when the job ends later (it is then polled until it does)."""

    def begin(self, jobs: list[Job], results: dict[str, RunResult]) -> tuple[list[Job], list[Job]]: ...

    def launch(self, job: Job, slots: int) -> RunResult | None: ...

    def poll(self, active: list[Job]) -> list[tuple[Job, RunResult]]: ...

    def stop(self, job: Job, signum: int) -> RunResult | None: ...

    def not_started(self, job: Job, signum: int) -> RunResult: ...

    def halt(self) -> str | None: ...

    def abort(self, job: Job, reason: str) -> RunResult: ...

    def detached(self, job: Job) -> RunResult: ...

    def end(self, active: list[Job]) -> None: ...


class Stop:
    """The first SIGINT/SIGTERM received while ``catch_signals`` is active (None: none)."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def set(self, signum: int) -> None:
        if self.signum is None:
            self.signum = signum


@contextlib.contextmanager
def catch_signals(stop: Stop | None = None) -> Iterator[Stop]:
    """Record SIGINT/SIGTERM in a ``Stop`` instead of raising (main thread only; elsewhere
    the handlers cannot be installed and the caller's stay)."""
    stop = stop or Stop()
    previous: dict[int, object] = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous[sig] = signal.signal(sig, lambda s, f: stop.set(s))
    try:
        yield stop
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def drive(ex: Executor, jobs: list[Job], slots: int, poll_s: float, stop: Stop,
          log: Callable[[str], None] = print, detach: bool = False,
          sleep: Callable[[float], None] = time.sleep) -> list[RunResult]:
    """Run ``jobs`` through ``ex``, at most ``slots`` at a time; one result per job, in job
    order. With ``detach``, return once every job has started (they keep running)."""
    results: dict[str, RunResult] = {}
    pending, active = ex.begin(jobs, results)
    stopped = False
    try:
        while pending or active:
            if stop.signum is not None and not stopped:
                stopped = True
                pending = _stop_all(ex, pending, active, results, stop.signum)
                if not active:
                    break
            reason = None if stopped else ex.halt()
            if reason is not None:
                log(f"budget: {reason}")
                _halt_all(ex, pending, active, results, reason)
                pending, active = [], []
                break
            while pending and len(active) < slots and not stopped:
                job = pending.pop(0)
                r = ex.launch(job, slots)
                if r is None:
                    active.append(job)
                else:
                    results[job.state_id] = r
            if detach and not pending and not stopped:
                for job in active:
                    results[job.state_id] = ex.detached(job)
                active = []
                break
            sleep(poll_s)
            for job, r in ex.poll(list(active)):
                active.remove(job)
                results[job.state_id] = r
                log(f"sanity {r}" if job.sanity else str(r))
    finally:
        ex.end(active)
    return [results[j.state_id] for j in jobs if j.state_id in results]


def _stop_all(ex: Executor, pending: list[Job], active: list[Job], results: dict[str, RunResult],
              signum: int) -> list[Job]:
    """Ask every active job to stop; report the pending ones as not started. Returns the new
    (empty) pending list; ``active`` keeps the jobs still ending."""
    for job in list(active):
        r = ex.stop(job, signum)
        if r is not None:
            active.remove(job)
            results[job.state_id] = r
    for job in pending:
        results[job.state_id] = ex.not_started(job, signum)
    return []


def _halt_all(ex: Executor, pending: list[Job], active: list[Job], results: dict[str, RunResult],
              reason: str) -> None:
    for job in active:
        results[job.state_id] = ex.abort(job, reason)
    for job in pending:
        results[job.state_id] = RunResult(job.run_id, Outcome.BLOCKED, "not started", str(job.out_dir), error=reason)


# --------------------------------------------------------------------------- the matrix lock, stale runs

def lock_matrix(root: Path, matrix_id: str):
    """The matrix's executor lock (one executor per matrix at a time); close the returned
    file to release it. Raises ExecutorError when another executor holds it."""
    root.mkdir(parents=True, exist_ok=True)
    f = open(root / f".executor-{matrix_id}.lock", "a")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ExecutorError(f"another executor is running matrix {matrix_id!r} (lock {root}/.executor-{matrix_id}.lock)")
    return f


def trainer_alive(pid: int | None) -> bool:
    """Whether ``pid`` is a live trainer process of this machine."""
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


def sweep_stale(db, matrix_id: str, alive: Callable[[int | None], bool] = trainer_alive) -> list[str]:
    """Mark the matrix's local trainer runs (its sanity runs included) recorded as running or
    queued whose process is gone as interrupted; returns their ids."""
    stale = [rid for rid, pid in execution.local_active_runs(db, matrix_id) if not alive(pid)]
    for rid in stale:
        execution.set_status(db, rid, execution.RunStatus.INTERRUPTED,
                             "its executor stopped; will resume from last.pt")
    return stale
