"""`nko-ops matrix run FILE [--executor local|vast]`: the steps around the driver loop that
every executor of a matrix takes, in this order (the local executor's module docstring tells
the whole story):

1. Load and resolve the matrix (pins, identities); for Vast, its settings and budget.
2. The lock-free pre-check: classify every selected run on a read of state.db and refuse
   (ExecutorError) before anything is written; then take the matrix's executor lock and
   classify again only if another executor changed the runs meanwhile.
3. Pin the matrix and record its runs; the stale-run sweep (local trainer runs, sanity runs
   included, recorded as running whose process is gone are marked interrupted); bundles found
   complete on disk are registered; ``import_from`` runs are imported.
4. The sanity step (always on this machine) or its recorded skip.
5. The full runs through ``backend.executor.drive`` on the chosen executor, under one
   SIGINT/SIGTERM handler for steps 4 and 5.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable

from backend.executor import (ExecutorError, Job, Outcome, RunResult, Stop, catch_signals, drive, lock_matrix,
                              sweep_stale)
from backend.executor_local import POLL_S, LocalExecutor
from backend.matrix import Identity, Matrix, MatrixError, RunSpec, load_matrix, resolve
from backend.vast import executor as vast_executor
from backend.vast.config import BudgetSettings, VastConfigError, VastSettings, load_budget, load_settings, state_dir_for
from backend.provider import Provider
from backend.vast.provider import provider_from_settings
from state import execution, store
from state.execution import RunStatus

EXECUTORS = ("local", "vast")


def load_and_resolve(matrix_path: str | Path) -> tuple[Matrix, Identity]:
    m = load_matrix(matrix_path)
    ident = resolve(m)
    if ident.problems:
        raise MatrixError(f"{matrix_path}: the matrix does not match its files\n  " + "\n  ".join(ident.problems))
    return m, ident


def check_matrix(db, m: Matrix, ident: Identity) -> None:
    """Refuse a matrix that ran before on other snapshot / split / recipe identities."""
    row = execution.matrix_identities(db, m.matrix_id)
    if row:
        for key in ("snapshot_sha256", "split_sha256", "recipe_hash"):
            if row[key] and row[key] != getattr(ident, key):
                raise ExecutorError(f"matrix {m.matrix_id!r} ran before with {key} {row[key][:16]}…, now "
                                    f"{getattr(ident, key)[:16]}…; its runs would mix {key.split('_')[0]}s: "
                                    f"use a new matrix_id")


def register_matrix(db, m: Matrix, ident: Identity) -> None:
    """Record the matrix and its identities; refuse if it ran on other ones before."""
    check_matrix(db, m, ident)
    execution.register_matrix(db, m.matrix_id, str(m.path), m.file_sha256, ident.recipe_hash, ident.snapshot_sha256,
                              m.snapshot, ident.snapshot_rows, ident.split_sha256, m.split, ident.split_sizes)


def sanity_gate(ex: LocalExecutor, db, m: Matrix, jobs: list[Job], skip_sanity: bool, stop: Stop,
                log: Callable[[str], None], nothing_started: str = "full runs not started") -> list[RunResult] | None:
    """Run the sanity step for ``jobs`` (or record that it was skipped by request) and mark
    each job's flags. Returns the blocked results when it failed, else None."""
    if skip_sanity:
        store.add_event(db, f"sanity step skipped by request for {len(jobs)} run(s)", kind="sanity",
                        level="warning", source="executor",
                        data={"matrix_id": m.matrix_id, "runs": [j.spec.run_id for j in jobs]})
        log("sanity step SKIPPED (recorded in state.db)")
    else:
        todo, notes = ex.sanity_jobs(jobs)
        results = drive(ex, todo, ex.sanity_slots(), ex.poll_s, stop, log)
        ok = True
        for job, r in zip(todo, results):
            notes.append(f"{job.spec.script}/{job.spec.mode}: {r.status}" + (f" ({r.error})" if r.error else ""))
            ok = ok and r.status == Outcome.COMPLETED
        store.add_event(db, "sanity step " + ("passed" if ok else "FAILED") + ": " + "; ".join(notes),
                        kind="sanity", level="info" if ok else "error", source="executor",
                        data={"matrix_id": m.matrix_id, "ok": ok, "notes": notes})
        for n in notes:
            log(f"sanity {n}")
        if not ok:
            msg = f"sanity step failed; {nothing_started}" if stop.signum is None else "stopped"
            return [RunResult(j.spec.run_id, Outcome.BLOCKED, "not started", str(j.out_dir), error=msg) for j in jobs]
    for job in jobs:
        flags = execution.run_flags(db, job.state_id)
        flags["sanity"] = "skipped" if skip_sanity else "passed"
        execution.update_run(db, job.state_id, flags=flags)
    return None


def run_matrix(matrix_path: str | Path, db_path: str | Path = "state.db", executor: str = "local",
               parallel: int = 1, skip_sanity: bool = False, with_optional: bool = False,
               only: list[str] | None = None, poll_s: float | None = None, log: Callable[[str], None] = print,
               settings: VastSettings | None = None, budget: BudgetSettings | None = None,
               provider: Provider | None = None) -> list[RunResult]:
    """Run a matrix (module docstring); one RunResult per selected run, in matrix order.
    Raises MatrixError / ExecutorError, before anything is written or rented, when it cannot.
    ``settings``/``budget``/``provider``: the Vast executor's (default: from the config files)."""
    if executor not in EXECUTORS:
        raise ExecutorError(f"executor {executor!r} is not available (one of: {', '.join(EXECUTORS)})")
    if executor == "vast" and parallel < 1:
        raise ExecutorError(f"vast executor: --parallel must be at least 1 (got {parallel})")
    m, ident = load_and_resolve(matrix_path)
    specs = m.selected(with_optional, only)
    if executor == "vast":
        settings, budget, provider = _vast_setup(db_path, settings, budget, provider)
    local_poll_s = POLL_S if poll_s is None or executor == "vast" else poll_s  # the sanity step's too
    ex, seen, plan = _precheck(m, ident, specs, db_path, 1 if executor == "vast" else parallel, local_poll_s, log)
    lock = lock_matrix(Path(m.out_root), m.matrix_id)
    db = ex.db = store.open_db(db_path)
    try:
        if _runs_seen(ex, specs) != seen:
            plan = _checked_plan(ex, specs)[1]
        done, jobs = _prepare(ex, db, m, ident, specs, plan, log)
        if jobs:
            with catch_signals() as stop:
                blocked = sanity_gate(ex, db, m, jobs, skip_sanity, stop, log,
                                      nothing_started="nothing rented" if executor == "vast" else
                                      "full runs not started")
                if blocked is not None:
                    return _ordered(done + blocked, specs)
                if executor == "local":
                    done += drive(ex, jobs, parallel, local_poll_s, stop, log)
                else:
                    done += vast_executor.run_jobs(db, ex, m.matrix_id, jobs, parallel, stop, settings, budget,
                                                   provider, vast_executor.POLL_S if poll_s is None else poll_s, log)
        return _ordered(done, specs)
    finally:
        db.close()
        lock.close()


def _vast_setup(db_path, settings, budget, provider) -> tuple[VastSettings, BudgetSettings, Provider]:
    try:
        settings = settings or load_settings(state_dir=state_dir_for(db_path))
        budget = budget or load_budget()
        provider = provider or provider_from_settings(settings)
    except VastConfigError as e:
        raise ExecutorError(f"vast executor: {e}") from None
    return settings, budget, provider


def _precheck(m: Matrix, ident: Identity, specs: list[RunSpec], db_path, parallel: int, poll_s: float,
              log: Callable[[str], None]) -> tuple[LocalExecutor, list, tuple]:
    """Every check that can refuse, before anything is written: without the lock (taking it
    creates out_root), on a read of state.db (an empty store when there is none yet)."""
    check_db = store.open_db(db_path if Path(db_path).exists() else ":memory:")
    try:
        ex = LocalExecutor(m, ident, check_db, parallel, poll_s, log)
        seen, plan = _checked_plan(ex, specs)
    finally:
        check_db.close()
    return ex, seen, plan


def _prepare(ex: LocalExecutor, db, m: Matrix, ident: Identity, specs: list[RunSpec], plan: tuple,
             log: Callable[[str], None]) -> tuple[list[RunResult], list[Job]]:
    """Steps 3: pin the matrix, record its runs, sweep stale ones, register what was found,
    import; returns (results already satisfied, jobs to run)."""
    done, jobs, imports, found = plan
    register_matrix(db, m, ident)
    for spec in specs:
        if store.get_run(db, spec.run_id) is None:
            execution.set_status(db, spec.run_id, RunStatus.PLANNED, f"in matrix {m.matrix_id}",
                                 matrix_id=m.matrix_id, script=spec.script, mode=spec.mode, seed=spec.seed,
                                 out_dir=str(m.out_dir(spec).resolve()))
    sweep_stale(db, m.matrix_id)
    ex.record_found(found)
    for spec in imports:
        r = ex.try_import(spec)
        if r is not None:
            done.append(r)
        else:
            jobs.append(ex.job(spec))
    for r in done:
        log(f"{r.run_id}: {r.how} ({r.out_dir})")
    return done, jobs


def _ordered(results: list[RunResult], specs: list[RunSpec]) -> list[RunResult]:
    order = {s.run_id: i for i, s in enumerate(specs)}
    return sorted(results, key=lambda r: order.get(r.run_id, len(order)))


def _runs_seen(ex: LocalExecutor, specs: list[RunSpec]) -> list:
    """What ``plan`` reads that another executor changes: the run rows and which run
    directories hold manifest.json / last.pt."""
    return [(store.get_run(ex.db, s.run_id), (ex.m.out_dir(s) / "manifest.json").exists(),
             (ex.m.out_dir(s) / "last.pt").exists()) for s in specs]


def _checked_plan(ex: LocalExecutor, specs: list[RunSpec]) -> tuple[list, tuple]:
    """(``_runs_seen``, ``ex.plan``) after the matrix's identity check; raises on refusals."""
    check_matrix(ex.db, ex.m, ex.ident)
    return _runs_seen(ex, specs), ex.plan(specs)
