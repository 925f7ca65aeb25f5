"""The one driver loop (backend/executor.py) on an executor whose jobs are counted down in
memory: slots, result order, SIGINT/SIGTERM, a halt, detach, the sanity flag; and the
stale-run sweep both executors now share."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from backend.executor import Job, Outcome, RunResult, Stop, catch_signals, drive, sweep_stale
from backend.matrix import RunSpec
from state import execution, store
from state.records import RunStatus


class CountdownExecutor:
    """Each job runs for ``polls[run_id]`` polls, then completes (or fails, if its run id
    starts with "bad"). Records what the driver asked of it."""

    def __init__(self, polls: dict[str, int], stop_ends_at_once: bool = False, halt_after: int | None = None):
        self.left = dict(polls)
        self.stop_ends_at_once, self.halt_after = stop_ends_at_once, halt_after
        self.active: set[str] = set()
        self.max_active = 0
        self.calls: list[tuple[str, str]] = []
        self.polls = 0
        self.stop_signal: int | None = None

    def begin(self, jobs, results):
        self.calls.append(("begin", ",".join(j.state_id for j in jobs)))
        return list(jobs), []

    def launch(self, job, slots):
        self.calls.append(("launch", job.state_id))
        self.active.add(job.state_id)
        self.max_active = max(self.max_active, len(self.active))
        return None

    def poll(self, active):
        self.polls += 1
        ended = []
        for job in active:
            self.left[job.run_id] -= 1
            if self.left[job.run_id] <= 0:
                self.active.discard(job.state_id)
                status = Outcome.INTERRUPTED if self.stop_signal else \
                    Outcome.FAILED if job.run_id.startswith("bad") else Outcome.COMPLETED
                ended.append((job, RunResult(job.run_id, status, job.how, str(job.out_dir))))
        return ended

    def stop(self, job, signum):
        self.calls.append(("stop", job.state_id))
        self.stop_signal = signum
        if self.stop_ends_at_once:
            self.active.discard(job.state_id)
            return RunResult(job.run_id, Outcome.INTERRUPTED, job.how, str(job.out_dir), error="left running")
        self.left[job.run_id] = 1  # ends at the next poll
        return None

    def not_started(self, job, signum):
        self.calls.append(("not_started", job.state_id))
        return RunResult(job.run_id, Outcome.INTERRUPTED, "not started", str(job.out_dir))

    def halt(self):
        return "cap reached" if self.halt_after is not None and self.polls >= self.halt_after else None

    def abort(self, job, reason):
        self.calls.append(("abort", job.state_id))
        return RunResult(job.run_id, Outcome.FAILED, job.how, str(job.out_dir), error=f"stopped: {reason}")

    def detached(self, job):
        return RunResult(job.run_id, Outcome.RUNNING, job.how, str(job.out_dir), error="detached")

    def end(self, active):
        self.calls.append(("end", ",".join(j.state_id for j in active)))


def _jobs(*run_ids: str, sanity: bool = False) -> list[Job]:
    return [Job(RunSpec(run_id=r, script="nko", mode="baseline"), {}, Path("/tmp") / r, sanity=sanity,
                how="sanity" if sanity else "trained") for r in run_ids]


def _drive(ex, jobs, slots=2, stop=None, **kw):
    return drive(ex, jobs, slots, 0.0, stop or Stop(), log=lambda s: None, sleep=lambda s: None, **kw)


def test_results_come_in_job_order_whatever_order_they_finish_in():
    ex = CountdownExecutor({"slow": 5, "fast": 1, "bad-mid": 3})
    results = _drive(ex, _jobs("slow", "fast", "bad-mid"), slots=3)
    assert [r.run_id for r in results] == ["slow", "fast", "bad-mid"]
    assert [r.status for r in results] == ["completed", "completed", "failed"]
    assert ex.calls[-1] == ("end", "")  # nothing left active


def test_at_most_slots_jobs_run_at_once_and_a_freed_slot_is_refilled():
    ex = CountdownExecutor({f"r{i}": 1 + i % 3 for i in range(7)})
    results = _drive(ex, _jobs(*(f"r{i}" for i in range(7))), slots=2)
    assert ex.max_active == 2 and [r.status for r in results] == ["completed"] * 7
    assert [c[1] for c in ex.calls if c[0] == "launch"] == [f"r{i}" for i in range(7)]


def test_a_signal_stops_the_active_jobs_and_reports_the_pending_ones_not_started():
    stop = Stop()
    ex = CountdownExecutor({"a": 3, "b": 3, "c": 3})

    def sleep(_):
        if ex.polls == 1:
            stop.set(signal.SIGTERM)

    results = drive(ex, _jobs("a", "b", "c"), 2, 0.0, stop, log=lambda s: None, sleep=sleep)
    assert [(r.run_id, r.status, r.how) for r in results] == [
        ("a", "interrupted", "trained"), ("b", "interrupted", "trained"), ("c", "interrupted", "not started")]
    assert ("stop", "a") in ex.calls and ("stop", "b") in ex.calls and ("not_started", "c") in ex.calls
    assert ("launch", "c") not in ex.calls  # no launch after the signal


def test_a_job_that_keeps_running_elsewhere_is_reported_at_once_on_a_signal():
    stop = Stop()
    stop.set(signal.SIGINT)
    ex = CountdownExecutor({"a": 3}, stop_ends_at_once=True)
    ex_begin = ex.begin

    def begin(jobs, results):  # "a" was re-attached: active from the start
        ex_begin(jobs, results)
        ex.active.add("a")
        return [], list(jobs)

    ex.begin = begin
    (r,) = _drive(ex, _jobs("a"), stop=stop)
    assert (r.status, r.error) == ("interrupted", "left running") and ex.polls == 0


def test_a_halt_aborts_the_active_jobs_and_blocks_the_rest():
    ex = CountdownExecutor({"a": 9, "b": 9, "c": 9}, halt_after=1)
    results = _drive(ex, _jobs("a", "b", "c"), slots=2)
    assert [(r.status, r.error) for r in results] == [("failed", "stopped: cap reached"),
                                                      ("failed", "stopped: cap reached"),
                                                      ("blocked", "cap reached")]


def test_detach_returns_once_every_job_has_started():
    ex = CountdownExecutor({"a": 9, "b": 9})
    results = _drive(ex, _jobs("a", "b"), slots=1, detach=True)
    assert [r.status for r in results] == ["completed", "running"] and ex.polls == 9


def test_a_sanity_job_has_its_own_state_row_and_is_logged_as_such():
    (job,) = _jobs("nko-base", sanity=True)
    assert job.sanity and job.run_id == "nko-base" and job.state_id == execution.sanity_run_id("nko-base")
    assert "#" not in job.state_id
    lines: list[str] = []
    drive(CountdownExecutor({"nko-base": 1}), [job], 1, 0.0, Stop(), log=lines.append, sleep=lambda s: None)
    assert lines == ["sanity nko-base: completed (sanity)"]


def test_catch_signals_turns_a_signal_into_a_stop_and_restores_the_handler():
    before = signal.getsignal(signal.SIGTERM)
    with catch_signals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.signum == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


# --------------------------------------------------------------------------- the stale-run sweep

def test_the_sweep_marks_dead_local_trainers_interrupted_sanity_runs_included(tmp_path):
    db = store.open_db(tmp_path / "state.db")
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    sanity = execution.sanity_run_id("r1")
    for rid, extra in (("r1", {}), (sanity, {"sanity": 1}), ("r2", {}), ("other", {})):
        execution.set_status(db, rid, RunStatus.RUNNING, "", matrix_id="other" if rid == "other" else "m",
                             executor="local", pid=dead.pid, **extra)
    execution.set_status(db, "r2", RunStatus.RUNNING, "", pid=os.getpid())  # still alive
    stale = sweep_stale(db, "m", alive=lambda pid: pid == os.getpid())
    assert sorted(stale) == sorted(["r1", sanity])
    assert store.get_run(db, sanity)["status"] == "interrupted" and store.get_run(db, "r2")["status"] == "running"
    assert store.get_run(db, "other")["status"] == "running"  # another matrix's run is not this one's business


@pytest.mark.parametrize("executor", ["local", "vast"])
def test_both_executors_sweep_stale_runs_before_they_run(tmp_path, executor):
    """A sanity run left "running" by an executor killed outright is marked interrupted by the
    next executor of the matrix, whichever it is (the Vast path used to skip the sweep)."""
    from backend_helpers import make_corpus, matrix_dict, write_bundle

    from backend.matrix_run import load_and_resolve, run_matrix
    from backend.memory_provider import MemoryProvider
    from backend.vast.config import BudgetSettings, VastSettings

    corpus = make_corpus(tmp_path / "data", n=40)
    raw = matrix_dict(corpus, tmp_path / "runs", [{"run_id": "r", "script": "nko", "mode": "baseline", "seed": 1}],
                      matrix_id="m")
    mpath = tmp_path / "m.json"
    mpath.write_text(json.dumps(raw))
    m, ident = load_and_resolve(mpath)
    from backend.executor_local import LocalExecutor

    cfg = LocalExecutor(m, ident, None).config(m.run("r"))
    test = corpus["split_obj"].test
    write_bundle(m.out_dir(m.run("r")), corpus, "r", "nko", "baseline", 1, {f: "ߌ" for f in test},
                 {f: "ߌ" for f in test}, config=cfg)  # complete: nothing to train, nothing to rent
    dbp = tmp_path / "state.db"
    db = store.open_db(dbp)
    sanity = execution.sanity_run_id("r")
    execution.set_status(db, sanity, RunStatus.RUNNING, "sanity run (pid 1)", matrix_id="m", sanity=1,
                         executor="local", pid=2 ** 22 + 1)  # no such process
    kw = {}
    if executor == "vast":
        kw = dict(settings=VastSettings(state_dir=tmp_path / ".nko-ops"), budget=BudgetSettings(cap_usd=1.0),
                  provider=MemoryProvider([]))
    (r,) = run_matrix(mpath, dbp, executor=executor, log=lambda s: None, **kw)
    assert (r.status, r.how) == ("completed", "reused")
    row = store.get_run(db, sanity)
    assert row["status"] == "interrupted" and row["sanity"] == 1 and row["matrix_id"] == "m"
