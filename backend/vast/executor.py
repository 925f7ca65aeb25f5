"""`nko-ops matrix run FILE --executor vast`: each run on its own rented instance.

Per run: pick the cheapest offer matching ``query`` (configs/vast.toml) that the budget
allows, create the instance (label = run id), wait for SSH, stage the project wheel and the
run's inputs (each file checked by sha256 on the instance), start the trainer detached, then
at every poll: follow train.log / metrics.jsonl into state.db, read the runner's heartbeat,
sync checkpoints every ``sync_every_s``. When the trainer exits: a last sync, the run
directory is rebuilt locally from the verified store, its bundle is verified and registered
exactly as the local executor does, and the instance is destroyed (only if every file on it
is verified locally). If the instance is lost mid-run, the run is relaunched on a new offer
with its last verified checkpoint and resumes (up to ``max_recoveries`` times).

Whether a run resumes is decided by the local store, not by the local run directory (a Vast
run's ``last.pt`` lives on the instance and in the store): every launch (a rerun after a
budget stop, a failed relaunch or an interrupted executor, or a relaunch after a loss)
uploads the run's last verified ``last.pt`` and logs when the store has one.

The sanity step runs locally (a short CPU run per (script, mode) costs nothing) before any
instance is rented. Interrupting the executor leaves the instances running their trainers;
running the matrix again re-attaches to them.
"""

from __future__ import annotations

import posixpath
import shutil
import time
from pathlib import Path
from typing import Callable, Protocol

from backend.executor import Job, Outcome, RunResult, Stop, catch_signals, drive
from backend.executor_local import trainer_error
from backend.matrix import Identity, RunSpec, config_sha256, identity_of
from backend.runs import Bundle, register_bundle, verify_bundle
from backend.vast import remote as rmt
from backend.vast.config import BudgetSettings, VastSettings, load_budget, load_settings, state_dir_for
from backend.vast.cost import ts
from backend.vast.fleet import Fleet
from backend.vast.guard import BudgetGuard, runway_until, write_lease
from backend.vast.logs import LogFollower
from backend.provider import LOST_STATUSES, Instance, Provider, ProviderError
from backend.vast.provider import provider_from_settings
from backend.vast.ssh import HostKeyChanged, SSHError
from backend.vast.sync import Entry, SyncError
from models.config import load_config
from models.split import Split
from state import execution, store
from state.execution import RunStatus
from models.errors import NkoOpsError

RESUME_FILES = ("last.pt", "best.pt", "train.log", "run.log", "metrics.jsonl")
POLL_S = 10.0


class LaunchError(NkoOpsError, RuntimeError):
    pass


class BudgetBlocked(LaunchError):
    pass


class Verifier(Protocol):
    """What a VastRun needs to check a bundle: the identities it must carry (LocalExecutor for
    a matrix run, SingleRun for one run config)."""

    ident: Identity

    def verify(self, d: Path, subset: bool = False) -> Bundle: ...


class VastRun:
    """One run on one instance at a time (a new one after a loss)."""

    def __init__(self, fleet: Fleet, job: Job, ex: Verifier, matrix_id: str | None, wheel: Path,
                 log: Callable[[str], None]):
        self.fleet, self.job, self.ex, self.matrix_id, self.wheel, self.log = fleet, job, ex, matrix_id, wheel, log
        self.db, self.s = fleet.db, fleet.settings
        self.run_id = job.run_id
        self.iid: str | None = None
        self.follower: LogFollower | None = None
        self.tried_machines: set[int] = set()
        self.recoveries = 0
        self.ssh_failures = 0
        self.restarts = 0
        self.last_sync = 0.0
        self.started = time.time()

    # ------------------------------------------------------------------ launching

    def launch(self, rows: list[Instance]) -> None:
        """Rent an instance for the run and start its trainer there, resuming from the run's
        last verified checkpoint in the local store when there is one."""
        files = self._resume_files()
        offers = self.fleet.provider.offers(self.s.query, self.s.order, limit=20, storage_gb=self.s.disk_gb)
        offers = [o for o in offers if o.machine_id not in self.tried_machines]
        if not offers:
            raise LaunchError(f"no offer matches {self.s.query!r}" + (" on a machine not tried before"
                                                                      if self.tried_machines else ""))
        offer = offers[0]
        ok, why = self.fleet.ledger.can_launch(rows, offer.dph_total)
        if not ok:
            raise BudgetBlocked(why)
        self.tried_machines.add(offer.machine_id)
        asked_at = self.fleet.clock()
        iid = str(self.fleet.provider.create(offer.id, self.s.image, self.s.disk_gb, label=self.run_id))
        self.fleet.ledger.launched(offer.dph_total)
        if self.fleet.guard is not None:
            self.fleet.guard.launched(offer.dph_total)
        self.iid = iid
        relaunch = self.recoveries > 0
        self.job.how = "resumed" if files else "trained"
        if not files:
            execution.update_run(self.db, self.run_id, log_offset=0, metrics_offset=0)
        self.fleet.register(iid, self.run_id, self.run_id, offer, since=asked_at)
        self.log(f"{self.run_id}: instance {iid} ({offer.gpu_name}, ${offer.dph_total:.3f}/h) created; waiting for SSH")
        execution.set_status(self.db, self.run_id, RunStatus.RUNNING, f"{'relaunched' if relaunch else self.job.how} on "
                             f"Vast instance {iid}", source="vast", executor="vast", instance_id=iid,
                             host=None, pid=None, matrix_id=self.matrix_id, script=self.job.spec.script,
                             mode=self.job.spec.mode, seed=self.job.spec.seed, config=self.job.cfg,
                             config_sha256=config_sha256(self.job.cfg), out_dir=str(self.job.out_dir.resolve()),
                             started_at=store.now(), error=None,
                             snapshot_sha256=self.ex.ident.snapshot_sha256, split_sha256=self.ex.ident.split_sha256,
                             recipe_hash=self.ex.ident.recipe_hash)
        try:
            inst = self._wait_running(iid)
            self._start_on(inst, files)
        except (LaunchError, SSHError, rmt.StageError, ProviderError) as e:
            # discard destroys unchecked only an instance just created with no trainer started
            self.log(f"{self.run_id}: bringing up instance {iid} failed ({e}); destroying it")
            o = self.fleet.discard(iid, reason=f"launch failed: {e}")
            if not o.destroyed:
                self.log(str(o))
            raise LaunchError(f"instance {iid}: {e}") from None

    def _wait_running(self, iid: str) -> dict:
        deadline = time.monotonic() + self.s.boot_timeout_s
        while time.monotonic() < deadline:
            guard = self.fleet.guard
            if guard is not None and guard.over.is_set():
                raise BudgetBlocked(f"budget cap reached while the instance was starting ({guard.state})")
            inst = self.fleet.provider.instance(iid)
            if inst is None:
                raise LaunchError("the instance disappeared while starting")
            if inst.running and inst.ssh is not None:
                return inst
            time.sleep(1.0)
        raise LaunchError(f"not running with SSH after {self.s.boot_timeout_s:.0f} s")

    def _resume_files(self) -> list[rmt.StagedFile]:
        """The run's last verified checkpoint and logs, from the local store: of each file the
        newest version verified there (a newer one whose transfer was cut off does not count)."""
        found = {n: e for n in RESUME_FILES if (e := self.fleet.syncer.last_verified(self.run_id, n)) is not None}
        if "last.pt" not in found:
            return []
        files = [rmt.StagedFile(self.fleet.cas.path(e.sha256), f"runs/{self.run_id}/{n}", e.sha256, e.size)
                 for n, e in found.items()]
        offsets = _log_offsets(files[0].local)
        for f in files:
            name = f.path.rsplit("/", 1)[-1]
            if name in offsets and f.size < offsets[name]:
                self.log(f"{self.run_id}: verified {name} is shorter than last.pt expects; starting fresh")
                return []
        return files

    def _start_on(self, inst: Instance, resume: list[rmt.StagedFile]) -> None:
        """Stage the project, the inputs and ``resume`` (the files to resume from, or []) on
        the instance, then start the trainer there (or attach to the one running)."""
        iid = inst.id
        st = self.fleet.stager(inst)
        app = st.install_wheel(self.wheel)
        inputs, fields = rmt.run_inputs(self.job.cfg)
        sent = st.stage("inputs", inputs)
        if resume:
            st.stage("resume", resume)
            logs = {f.path.rsplit("/", 1)[-1]: f.size for f in resume}
            execution.update_run(self.db, self.run_id, log_offset=logs.get("train.log", 0), metrics_offset=0)
            self.log(f"{self.run_id}: uploaded the last verified checkpoint ({len(resume)} files) to instance {iid}")
        self.log(f"{self.run_id}: staged project and {len(inputs)} input files ({sent} sent) on instance {iid}, "
                 "all verified there")
        status = rmt.status(st.remote, st.layout, self.run_id, st.python)
        if status.get("runner_alive"):
            self.log(f"{self.run_id}: trainer already running on instance {iid}; attaching")
            self.fleet.mark_trainer(iid, self.run_id)
        else:
            cfg_remote = rmt.remote_config(self.job.cfg, fields)
            # the runs directory first, then the mark: a destroy then insists on seeing that directory
            st.remote.makedirs(st.layout.run_dir(self.run_id))
            self.fleet.mark_trainer(iid, self.run_id)
            # the server-side backstop: the runner stops the trainer (and the instance) once the
            # budget's runway has passed without a controller renewing the lease
            state = self.fleet.ledger.state(self.fleet.provider.instances())
            write_lease(self.fleet, inst, runway_until(state, self.fleet.clock()))
            env = {"CONTAINER_ID": iid, **({"VAST_SERVER_URL": self.s.server_url} if self.s.server_url else {}),
                   **self.s.remote_env}
            rmt.start_trainer(st.remote, st.layout, self.run_id, cfg_remote, st.python, app,
                              env, self.s.heartbeat_s, lease_grace_s=0.0)
        self.follower = LogFollower(self.db, self.run_id, st.layout.run_dir(self.run_id), iid)
        execution.update_run(self.db, self.run_id, host=f"{inst.ssh_host}:{inst.ssh_port}", instance_id=iid)
        store.add_event(self.db, f"trainer started on instance {iid}" + (" (resuming)" if resume else ""),
                        run_id=self.run_id, instance_id=iid, kind="remote-start", source="vast")
        self.last_sync = time.time()

    def attach(self, inst: Instance) -> None:
        """Take over a run whose trainer is already running on ``inst`` (executor restarted)."""
        self.iid = inst.id
        self.tried_machines.add(inst.machine_id)
        self._start_on(inst, [])

    # ------------------------------------------------------------------ each poll

    def step(self, rows: dict[str, Instance]) -> RunResult | None:
        row = rows.get(self.iid)
        if row is None or row.status in LOST_STATUSES:
            return self.recover(f"instance {self.iid} lost ({'gone' if row is None else row.status})")
        try:
            st = self.fleet.stager(row)
            if self.follower is not None:
                self.follower.poll(st.remote)
            status = rmt.status(st.remote, st.layout, self.run_id, st.python)
            self.ssh_failures = 0
        except HostKeyChanged as e:  # retire refuses too (nothing can be verified): kept, with an alert
            return self.fail(str(e))
        except (SSHError, rmt.StageError) as e:
            self.ssh_failures += 1
            self.log(f"{self.run_id}: instance {self.iid} unreachable ({e}); attempt {self.ssh_failures}")
            if self.ssh_failures >= 5:
                try:
                    fresh = self.fleet.provider.instance(self.iid)
                except ProviderError:
                    return None
                if fresh is None or not fresh.running:
                    return self.recover(f"instance {self.iid} unreachable and not running")
            return None
        beat = (status.get("heartbeat") or {}).get("time")
        if beat:
            execution.update_run(self.db, self.run_id, heartbeat_at=ts(beat))
        if status.get("exit") is not None:
            return self.finish(row, int(status["exit"]["rc"]))
        if not status.get("runner_alive"):
            self.restarts += 1
            if self.restarts > 3:
                return self.fail("the trainer's runner keeps dying without an exit status", row=row)
            self.log(f"{self.run_id}: runner gone without an exit status; restarting (resumes from last.pt)")
            try:
                self._start_on(row, [])
            except (SSHError, rmt.StageError) as e:
                self.log(f"{self.run_id}: restart on instance {self.iid} failed ({e}); trying again next poll")
            return None
        if time.time() - self.last_sync >= self.s.sync_every_s:
            self.last_sync = time.time()
            try:
                for rep in self.fleet.sync_instance(row, [self.run_id]):
                    self.log(f"checkpoint sync {rep}")
            except (SSHError, SyncError) as e:
                self.log(f"{self.run_id}: checkpoint sync failed ({e}); retrying at the next interval")
        return None

    # ------------------------------------------------------------------ the end

    def finish(self, row: Instance, rc: int) -> RunResult:
        if self.follower is not None:
            try:
                self.follower.poll(self.fleet.stager(row).remote)
            except SSHError:
                pass
        reports = []
        for attempt in range(3):
            try:
                reports = self.fleet.sync_instance(row, [self.run_id])
                if all(r.ok for r in reports):
                    break
            except (SSHError, SyncError, rmt.StageError) as e:
                self.log(f"{self.run_id}: final sync attempt {attempt + 1} failed: {e}")
            time.sleep(1.0 * (attempt + 1))
        entries = [e for rep in reports for e in rep.verified]
        local = self.materialize(entries)
        wall = time.time() - self.started
        if rc == 0:
            b = self.ex.verify(self.job.out_dir)
            if b.ok:
                flags = execution.run_flags(self.db, self.run_id)
                flags.update(instance_id=self.iid, recoveries=self.recoveries)
                register_bundle(self.db, b, self.run_id, "vast", self.matrix_id, flags=flags,
                                message=f"bundle verified (trained on Vast instance {self.iid}, {wall:.0f} s)")
                self._record_local(entries, local)
                result = RunResult(self.run_id, Outcome.COMPLETED, self.job.how, str(self.job.out_dir),
                                   b.results.get("test_cer"), wall_s=wall)
            else:
                result = self._failed("bundle check failed: " + "; ".join(b.problems[:3]), wall)
        else:
            error = trainer_error(rc, self.job.out_dir, None)
            self._record_local(entries, local)
            result = self._failed(error, wall)
        o = self.fleet.retire(self.iid, f"run {self.run_id} finished ({result.status})", self.run_id)
        self.log(str(o))
        if not o.destroyed:
            result.error = ((result.error + "; ") if result.error else "") + f"instance {self.iid} kept: {o.reason}"
        cost = self.fleet.ledger.run_spend(self.run_id)
        store.add_event(self.db, f"run {self.run_id}: {result.status}; Vast spend ${cost:.4f}", run_id=self.run_id,
                        kind="run-cost", source="vast", data={"usd": cost})
        return result

    def adopt_from_store(self) -> RunResult | None:
        """A run whose instance is gone but whose whole bundle was synced (e.g. kill-idle
        saved it after the executor stopped): rebuild it from the store, rent nothing."""
        rows = execution.synced_artifacts(self.db, self.run_id)
        if not any(r["name"] == "manifest.json" for r in rows):
            return None
        entries = [Entry(r["name"], r["size"], r["sha256"]) for r in rows if self.fleet.cas.has(r["sha256"])]
        local = self.materialize(entries)
        b = self.ex.verify(self.job.out_dir)
        if not b.ok:
            self.log(f"{self.run_id}: the synced bundle does not verify ({b.problems[0]}); training again")
            return None
        register_bundle(self.db, b, self.run_id, "vast", self.matrix_id, flags=execution.run_flags(self.db, self.run_id),
                        message="bundle rebuilt from the verified local store (its instance is gone)")
        self._record_local(entries, local)
        return RunResult(self.run_id, Outcome.COMPLETED, "synced", str(self.job.out_dir), b.results.get("test_cer"))

    def materialize(self, entries: list[Entry]) -> dict[str, Path]:
        """Copy the verified files from the store into the local run directory."""
        out = self.job.out_dir
        out.mkdir(parents=True, exist_ok=True)
        placed = {}
        for e in entries:
            dest = out / e.name
            dest.parent.mkdir(parents=True, exist_ok=True)
            tmp = dest.with_name(f".{dest.name}.vast-tmp")
            shutil.copyfile(self.fleet.cas.path(e.sha256), tmp)
            tmp.replace(dest)
            placed[e.name] = dest
        return placed

    def _record_local(self, entries: list[Entry], local: dict[str, Path]) -> None:
        """Artifacts: verified, with the local run directory as their path (register_bundle
        has just recorded them as plain local files)."""
        rdir = self.fleet.layout(self.iid).run_dir(self.run_id) if self.iid else None
        for e in entries:
            p = local.get(e.name)
            self.fleet.syncer.record(self.run_id, e, "verified", self.iid,
                                      posixpath.join(rdir, e.name) if rdir else None,
                                      [{"kind": "local", "path": str(p.resolve())}] if p else [],
                                      path=str(p.resolve()) if p else None)

    def _failed(self, error: str, wall: float) -> RunResult:
        execution.set_status(self.db, self.run_id, RunStatus.FAILED, error, source="vast", finished_at=store.now(),
                             error=error)
        return RunResult(self.run_id, Outcome.FAILED, self.job.how, str(self.job.out_dir), error=error, wall_s=wall)

    def fail(self, error: str, row: Instance | None = None) -> RunResult:
        if self.iid:
            o = self.fleet.retire(self.iid, f"run {self.run_id} failed", self.run_id)
            self.log(str(o))
            if not o.destroyed:
                error += f"; instance {self.iid} kept: {o.reason}"
        return self._failed(error, time.time() - self.started)

    def recover(self, why: str) -> RunResult | None:
        self.log(f"{self.run_id}: {why}")
        store.add_event(self.db, f"{why}; " + ("relaunching from the last verified checkpoint"
                                               if self.recoveries < self.s.max_recoveries else "giving up"),
                        run_id=self.run_id, instance_id=self.iid, kind="recovery", level="error", source="vast")
        # the lost instance may hold files (a host that comes back, a stopped disk) and may
        # still bill: destroyed only once they are verified here, else kept with an alert
        o = self.fleet.retire(self.iid, f"lost by run {self.run_id}", self.run_id)
        self.log(str(o))
        if self.recoveries >= self.s.max_recoveries:
            return self._failed(f"{why}; {self.recoveries} recoveries already, giving up", time.time() - self.started)
        self.recoveries += 1
        try:
            rows, state = _poll(self.fleet)
            if state.over:
                raise BudgetBlocked(f"budget cap reached ({state})")
            self.launch(rows)
        except (LaunchError, ProviderError, SSHError) as e:
            return self._failed(f"{why}; relaunch failed: {e}", time.time() - self.started)
        return None


def _log_offsets(last_pt: Path) -> dict:
    import torch

    ckpt = torch.load(last_pt, map_location="cpu", weights_only=False)
    return dict(ckpt.get("log_offsets") or {})


class VastExecutor:
    """Runs on Vast through the driver (the ``backend.executor.Executor`` protocol): one
    ``VastRun`` per job, polled together from one look at the account per driver poll."""

    def __init__(self, fleet: Fleet, ex: Verifier, matrix_id: str | None, wheel: Path, poll_s: float,
                 log: Callable[[str], None]):
        self.fleet, self.ex, self.matrix_id, self.wheel, self.poll_s, self.log = fleet, ex, matrix_id, wheel, poll_s, log
        self.runs: dict[str, VastRun] = {}
        self.rows: list[Instance] = []
        self.state = None
        self.guard: BudgetGuard | None = None

    def run(self, job: Job) -> VastRun:
        return self.runs[job.state_id]

    def begin(self, jobs: list[Job], results: dict[str, RunResult]) -> tuple[list[Job], list[Job]]:
        """One look at the account; the budget guard from here on; re-attach to trainers still
        running from an earlier executor, and adopt runs whose whole bundle is in the store."""
        self.runs = {j.state_id: VastRun(self.fleet, j, self.ex, self.matrix_id, self.wheel, self.log) for j in jobs}
        self.rows, self.state = self.fleet.poll()
        db_file = execution.db_file(self.fleet.db)
        if db_file:  # the cap is enforced on the guard's own timer from here on (backend/vast/guard.py)
            self.guard = self.fleet.guard = BudgetGuard(db_file, self.fleet.settings, self.fleet.ledger.budget,
                                                        self.fleet.provider, log=self.log,
                                                        clock=self.fleet.clock).start()
        by_id = {r.id: r for r in self.rows}
        pending, active = [], []
        for job in jobs:
            where = self._resume(self.run(job), by_id, results)
            if where == "active":
                active.append(job)
            elif where == "pending":
                pending.append(job)
        return pending, active

    def _resume(self, run: VastRun, by_id: dict[str, Instance], results: dict[str, RunResult]) -> str:
        """"active" (re-attached), "done" (adopted from the store) or "pending"."""
        row_db = store.get_run(self.fleet.db, run.run_id) or {}
        live = by_id.get(str(row_db.get("instance_id"))) if row_db.get("executor") == "vast" else None
        if row_db.get("status") == RunStatus.RUNNING and live and live.running:
            try:
                run.attach(live)
                self.log(f"{run.run_id}: re-attached to instance {run.iid}")
                return "active"
            except (SSHError, rmt.StageError) as e:
                self.log(f"{run.run_id}: cannot re-attach to instance {live.id} ({e})")
        if row_db.get("executor") == "vast" and row_db.get("status") in (RunStatus.RUNNING, RunStatus.FAILED,
                                                                         RunStatus.INTERRUPTED):
            r = run.adopt_from_store()
            if r is not None:
                results[run.job.state_id] = r
                self.log(str(r))
                return "done"
        return "pending"

    def launch(self, job: Job, slots: int) -> RunResult | None:
        run = self.run(job)
        try:
            run.launch(self.rows)
        except BudgetBlocked as e:
            execution.set_status(self.fleet.db, run.run_id, RunStatus.PLANNED, f"not launched: {e}", source="vast")
            return RunResult(run.run_id, Outcome.BLOCKED, "not started", str(job.out_dir), error=str(e))
        except (LaunchError, ProviderError, SSHError) as e:
            return run._failed(f"launch failed: {e}", 0.0)
        return None

    def poll(self, active: list[Job]) -> list[tuple[Job, RunResult]]:
        try:
            self.rows, self.state = _poll(self.fleet)
        except ProviderError as e:  # the API is unreachable for now: the trainers keep going
            self.log(f"cannot poll the Vast API ({e}); trying again in {self.poll_s:g} s")
            return []
        by_id = {r.id: r for r in self.rows}
        ended = []
        for job in active:
            r = self.run(job).step(by_id)
            if r is not None:
                ended.append((job, r))
        return ended

    def stop(self, job: Job, signum: int) -> RunResult:
        """The trainer keeps running on its instance: a later executor re-attaches to it."""
        run = self.run(job)
        execution.set_status(self.fleet.db, run.run_id, RunStatus.RUNNING,
                             f"executor stopped by signal {signum}; the trainer keeps running on instance "
                             f"{run.iid}: run the matrix again to re-attach, or `nko-ops vast kill-idle` once it "
                             "is done", source="vast")
        return RunResult(run.run_id, Outcome.INTERRUPTED, job.how, str(job.out_dir),
                         error=f"executor stopped; instance {run.iid} still running")

    def not_started(self, job: Job, signum: int) -> RunResult:
        return RunResult(job.run_id, Outcome.INTERRUPTED, "not started", str(job.out_dir))

    def halt(self) -> str | None:
        """Over the budget cap (``fleet.poll`` has already stopped the spend): why, else None."""
        return str(self.state) if self.state is not None and self.state.over else None

    def abort(self, job: Job, reason: str) -> RunResult:
        return self.run(job)._failed(f"stopped: budget cap reached ({reason})", 0.0)

    def detached(self, job: Job) -> RunResult:
        return RunResult(job.run_id, Outcome.RUNNING, job.how, str(job.out_dir),
                         error=f"detached: training on instance {self.run(job).iid}")

    def end(self, active: list[Job]) -> None:
        if self.guard is not None:
            self.guard.stop()
            self.fleet.guard = self.guard = None


def run_jobs(db, ex: Verifier, matrix_id: str | None, jobs: list[Job], parallel: int, stop: Stop,
             settings: VastSettings, budget: BudgetSettings, provider: Provider, poll_s: float = POLL_S,
             log: Callable[[str], None] = print, detach: bool = False) -> list[RunResult]:
    """Run ``jobs`` on Vast, at most ``parallel`` instances at a time (module docstring)."""
    fleet = Fleet(db, settings, budget, provider, log=log)
    try:
        wheel = rmt.build_wheel(settings.dist_dir)
        poll_s = min(poll_s, budget.poll_interval_s)
        return drive(VastExecutor(fleet, ex, matrix_id, wheel, poll_s, log), jobs, parallel, poll_s, stop, log,
                     detach=detach)
    finally:
        fleet.close()


def _poll(fleet: Fleet):
    """The executor's own poll. With a guard, the guard alone enforces the cap: this poll only
    observes, and when it sees the cap reached first it asks the guard for a tick now."""
    guard = fleet.guard
    if guard is None:
        return fleet.poll()
    rows, state = fleet.poll(enforce=False)
    if state.over and not guard.over.is_set():
        guard.tick()
    if guard.over.is_set() and guard.state is not None:
        state = guard.state
        rows = fleet.provider.instances()
    return rows, state


# --------------------------------------------------------------------------- one run, no matrix

class SingleRun:
    """What VastRun needs from an executor, for one run config outside a matrix."""

    def __init__(self, cfg: dict):
        self.ident = identity_of(cfg["snapshot"], cfg["split"], cfg["features"])
        self.test_ids = Split.load(Path(cfg["split"])).test

    def verify(self, d: Path, subset: bool = False) -> Bundle:
        return verify_bundle(d, self.ident.snapshot_sha256, self.ident.split_sha256, self.ident.recipe_hash,
                             self.test_ids, subset=subset)

    @staticmethod
    def job(cfg: dict) -> Job:
        """The job of a run config (``launch`` decides from the store whether it resumes)."""
        spec = RunSpec(run_id=cfg["run_id"], script=cfg["script"], mode=cfg["mode"], seed=cfg["seed"])
        return Job(spec, cfg, Path(cfg["out_dir"]))


def launch_config(config_path: str | Path, db_path: str | Path = "state.db", detach: bool = False,
                  poll_s: float = POLL_S, log: Callable[[str], None] = print,
                  settings: VastSettings | None = None, budget: BudgetSettings | None = None,
                  provider: Provider | None = None) -> RunResult:
    """Train one run config on Vast (`nko-ops vast launch --config run.json`)."""
    cfg = load_config(config_path).to_json()
    settings = settings or load_settings(state_dir=state_dir_for(db_path))
    budget = budget or load_budget()
    provider = provider or provider_from_settings(settings)
    db = store.open_db(db_path)
    try:
        ex = SingleRun(cfg)
        out = Path(cfg["out_dir"])
        if (out / "manifest.json").exists():
            raise LaunchError(f"{out} already holds a completed run (runs are immutable)")
        with catch_signals() as stop:
            results = run_jobs(db, ex, None, [SingleRun.job(cfg)], 1, stop, settings, budget, provider, poll_s, log,
                               detach=detach)
        return results[0]
    finally:
        db.close()
