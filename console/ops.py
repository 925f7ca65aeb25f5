"""The console's cloud actions: poll, kill idle, destroy, orphan sweep and sync, all through
the Vast lane's ``Fleet`` (backend/vast/fleet.py), so the console and ``nko-ops vast``
apply the same rules.

Configured like the CLI: ``configs/vast.toml`` (server_url, SSH, idle rule), ``configs/budget.toml``
and the API key from ``VAST_API_KEY`` or vastai's key file; the lane's state directory is
``.nko-ops`` beside the state store. Nothing is loaded until the first action, and an
action without a configured provider raises ``OpsUnavailable`` saying what to set.

Every method blocks (HTTP, SSH): call them from thread workers. One action runs at a time
(``OpsBusy`` otherwise) because a Fleet holds one SSH session per instance. The Fleet gets
its own state.db connection, so a long sync never holds the console's read lock.

Kill idle and destroy are two steps: ``preview_*`` says, per instance, which files on its
disk have no verified copy in the local store (hashed on the instance now, compared with
the store), and ``destroy`` acts only on a preview with nothing at risk; ``Fleet.destroy``
then syncs and verifies once more at that moment and refuses if anything changed.

``train_log_tail`` opens the Logs pane's SSH reading of a live run's ``train.log``: the
pane asks for it here and only shows the lines (no SSH session is built in the panes).
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import vastai  # noqa: F401  (see _quiet_sdk)

from state import store
from backend.vast.config import VastConfigError, VastSettings, load_budget, load_settings, state_dir_for
from backend.vast.fleet import DestroyOutcome, Fleet
from backend.provider import Instance, ProviderError
from backend.vast.logs import LogFollower
from backend.vast.provider import provider_from_settings
from backend.vast.remote import Layout, StageError
from backend.vast.ssh import HostKeyChanged, KnownHosts, Remote, SSHError, SSHTarget
from backend.vast.sync import SyncError, SyncReport, remote_entries
from models.errors import NkoOpsError

# What a cloud action can fail with; each is shown as one line, the console keeps running.
ERRORS = (VastConfigError, ProviderError, SSHError, SyncError, StageError)


# A poll is one API call plus one heartbeat read per instance; a user's action waits that long.
BACKGROUND_WAIT_S = 120.0


class _ToMessages(logging.Handler):
    def __init__(self, messages: deque) -> None:
        super().__init__(logging.INFO)
        self.messages = messages

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(f"vastai: {record.getMessage()}")


def _quiet_sdk(messages: deque) -> None:
    """Nothing from the vastai SDK reaches the terminal while the UI runs. It is imported
    above, at module load, because its import reads ``sys.stdout.encoding``, which Textual's
    print capture lacks (an SDK first imported inside the running app fails with
    AttributeError); its logger writes to the stderr of import time, so its records go to
    the action messages instead."""
    log = logging.getLogger("vastai")
    for h in list(log.handlers):
        log.removeHandler(h)
    log.addHandler(_ToMessages(messages))
    log.propagate = False


class OpsUnavailable(RuntimeError):
    """No provider configured (no API key, or a bad configs/vast.toml)."""


class OpsBusy(RuntimeError):
    pass


class OpsError(NkoOpsError, RuntimeError):
    pass


def explain(e: BaseException) -> tuple[str, str]:
    """(message, notification severity) for an action that failed."""
    if isinstance(e, (OpsUnavailable, OpsBusy)):
        return str(e), "warning"
    if isinstance(e, (OpsError, *ERRORS)):
        return str(e), "error"
    return f"{type(e).__name__}: {e}", "error"


@dataclass(frozen=True)
class AtRisk:
    name: str  # run_id/path inside the run directory
    size: int | None


@dataclass(frozen=True)
class Candidate:
    """One instance a destroy would remove, and what its disk holds right now."""

    instance_id: str
    label: str
    run_id: str
    gpu: str
    dph: float | None
    reason: str  # why it is up for destruction (the idle verdict, or 'requested')
    ours: bool  # created by nko-ops for a run (orphans are never destroyed from here)
    files: int  # files under its runs directory (0 when it could not be checked)
    at_risk: tuple[AtRisk, ...]  # files without a verified copy in the local store
    error: str = ""  # why its files could not be checked

    @property
    def refusal(self) -> str:
        """Why this instance must not be destroyed now ('' when it may be)."""
        if not self.ours:
            return ("not created by nko-ops (an orphan): what its disk holds is unknown here; look at it, "
                    "then `nko-ops vast destroy ID --force`")
        if self.error:
            return self.error
        if self.at_risk:
            return f"{len(self.at_risk)} file(s) without a verified local copy: sync first"
        return ""


class ScreenTail(LogFollower):
    """train.log's new complete lines for the screen, from the offset the lane stored: the
    follower's reading (offsets, truncation after a resume, partial lines) without its
    writing into state.db."""

    def lines(self, remote: Remote) -> list[str]:
        raw, end = self._read_new(remote, "train.log")
        self.offsets["train.log"] = end  # shown, not stored: nothing to commit first
        return [line.decode("utf-8", errors="replace") for line in raw]


class TrainLogTail:
    """A live run's ``train.log`` on its instance, read over SSH for the Logs pane. Blocking
    (SSH): call ``lines`` from a thread worker; it raises ``SSHError`` (``HostKeyChanged``
    when the host key changed: never retry that one) and the caller closes it when done."""

    def __init__(self, follower: ScreenTail, remote: Remote) -> None:
        self.follower, self.remote = follower, remote
        self.where = f"SSH {remote.target} {follower.remote_dir}/train.log"

    def lines(self) -> list[str]:
        return self.follower.lines(self.remote)

    def close(self) -> None:
        self.remote.close()


class Ops:
    def __init__(self, db_path: str | Path, settings_path: str | Path | None = "configs/vast.toml",
                 budget_path: str | Path | None = "configs/budget.toml") -> None:
        self.db_path = str(db_path)
        self.settings_path, self.budget_path = settings_path, budget_path
        self.lock = threading.Lock()
        self.doing = ""
        self.messages: deque[str] = deque(maxlen=200)  # the Fleet's progress lines
        _quiet_sdk(self.messages)
        self._background = False  # the action holding the lock is the console's own poll
        self._setup = threading.Lock()
        self._closing = False
        self._settings: VastSettings | None = None
        self._fleet: Fleet | None = None

    # ------------------------------------------------------------------ configuration

    def settings(self) -> VastSettings:
        """configs/vast.toml as the CLI reads it (no API key needed: SSH and paths only)."""
        if self._settings is None:
            self._settings = load_settings(self.settings_path, state_dir=state_dir_for(self.db_path))
        return self._settings

    def fleet(self) -> Fleet:
        with self._setup:  # the background poll and a key press may both get here first
            return self._make_fleet()

    def _make_fleet(self) -> Fleet:
        if self._fleet is None:
            try:
                settings = self.settings()
                provider = provider_from_settings(settings)
                budget = load_budget(self.budget_path)
            except VastConfigError as e:
                raise OpsUnavailable(f"no Vast provider configured: {e}. For the local emulator, run "
                                     "`nko-ops vast emulator` and set server_url in configs/vast.toml") from None
            self._fleet = Fleet(store.open_db(self.db_path), settings, budget, provider, log=self.messages.append)
        return self._fleet

    @contextlib.contextmanager
    def action(self, what: str, background: bool = False) -> Iterator[Fleet]:
        """Run one cloud action at a time. A user's action waits for a background poll to
        finish; a second user action, or a background poll while anything else runs, gets
        ``OpsBusy`` naming the one already running."""
        got = self.lock.acquire(blocking=False)
        if not got and not background and self._background:
            got = self.lock.acquire(timeout=BACKGROUND_WAIT_S)
        if not got:
            raise OpsBusy(f"busy: {self.doing} is still running")
        self.doing, self._background = what, background
        try:
            if self._closing:
                raise OpsBusy("the console is closing")
            yield self.fleet()
        finally:
            self.doing, self._background = "", False
            if self._closing:
                self._close_fleet()
            self.lock.release()

    def background_interval(self) -> float:
        """Seconds between the console's own account polls: the budget's poll_interval_s
        (``OpsUnavailable`` when no provider is configured)."""
        return self.fleet().ledger.budget.poll_interval_s

    def train_log_tail(self, db, run_id: str, instance_id: str, ssh_host: str, ssh_port: int) -> TrainLogTail:
        """The SSH tail of ``run_id``'s train.log on instance ``instance_id`` (at
        ``ssh_host:ssh_port``), from the log offset ``db`` holds. Connects lazily (on the first
        ``lines``); ``OpsUnavailable`` when configs/vast.toml cannot be read."""
        try:
            settings = self.settings()
        except VastConfigError as e:
            raise OpsUnavailable(f"VastConfigError: {e}") from None
        layout = Layout.for_instance(settings.remote_base, instance_id)
        follower = ScreenTail(db, run_id, layout.run_dir(run_id), instance_id)
        target = SSHTarget(ssh_host, ssh_port, settings.ssh_user, settings.ssh_key)
        return TrainLogTail(follower, Remote(target, KnownHosts(settings.known_hosts), timeout=settings.ssh_timeout_s))

    # ------------------------------------------------------------------ actions

    def poll(self, background: bool = False) -> str:
        """One look at the account: instance rows, cost ledger and idle tracking updated.
        Observe only: over the cap, stopping spend stays with the lane's own poll."""
        with self.action("poll", background) as fleet:
            rows, state = fleet.poll(enforce=False)
            return f"{len(rows)} instance(s) on the account; budget {state}"

    def preview_kill_idle(self) -> list[Candidate]:
        """The instances ``nko-ops vast kill-idle`` would destroy now, each with its files at risk."""
        with self.action("kill-idle check") as fleet:
            return [self._candidate(fleet, row, f"idle: {v.reason}") for row, v in fleet.idle_rows(enforce=False)]

    def preview_destroy(self, iid: str) -> Candidate:
        with self.action("destroy check") as fleet:
            row = fleet.provider.instance(iid)
            if row is None:
                raise OpsError(f"instance {iid} is not on the account (already destroyed or lost)")
            return self._candidate(fleet, row, "requested from the console")

    def _candidate(self, fleet: Fleet, row: Instance, reason: str) -> Candidate:
        iid = row.id
        rec = next(iter(fleet.db.query("SELECT label, run_id FROM instances WHERE id = ?", [iid])), {})
        gpu = f"{row.num_gpus or 1}× {row.gpu_name or '?'}"
        base = dict(instance_id=iid, label=row.label or rec.get("label") or "", run_id=rec.get("run_id") or "",
                    gpu=gpu, dph=row.usd_per_h, reason=reason)
        if not fleet.is_ours(iid):
            return Candidate(**base, ours=False, files=0, at_risk=())
        try:  # the same check as Fleet.unsynced: hashed on the instance, looked up in the store
            st = fleet.stager(row)
            entries = remote_entries(st.remote, st.python, st.layout.helper, st.layout.runs,
                                     missing_ok=not fleet.trainer_started(iid))
        except (SSHError, SyncError, StageError) as e:
            known = tuple(AtRisk(name, None) for name in fleet.known_unverified(iid))
            what = "cannot verify the files on the instance" if isinstance(e, SyncError) else \
                "cannot reach the instance to check its files"
            why = str(e) if isinstance(e, HostKeyChanged) else f"{what} ({e})"
            return Candidate(**base, ours=True, files=0, at_risk=known, error=why)
        at_risk = tuple(AtRisk(e.name, e.size) for e in entries if not fleet.cas.has(e.sha256))
        return Candidate(**base, ours=True, files=len(entries), at_risk=at_risk)

    def destroy(self, candidates: list[Candidate]) -> list[DestroyOutcome]:
        """Destroy the previewed instances that nothing keeps alive (``Fleet.destroy`` syncs and
        verifies again first); the others get a refusal without being touched."""
        with self.action("destroy") as fleet:
            out = []
            for c in candidates:
                if c.refusal:
                    out.append(DestroyOutcome(c.instance_id, False, c.refusal, [a.name for a in c.at_risk]))
                else:
                    out.append(fleet.destroy(c.instance_id, reason=c.reason))
            return out

    def sync_instances(self, ids: list[str]) -> list[SyncReport]:
        with self.action("sync") as fleet:
            reports = []
            for iid in ids:
                row = fleet.provider.instance(iid)
                if row is None:
                    raise OpsError(f"instance {iid} is gone: files on it without a verified copy are lost")
                reports += fleet.sync_instance(row)
            return reports

    def sync_run(self, run_id: str) -> list[SyncReport]:
        """Pull one run's directory from its instance into the local store (verified by sha256)."""
        with self.action(f"sync of {run_id}") as fleet:
            run = store.get_run(fleet.db, run_id)
            if not run or not run.get("instance_id"):
                raise OpsError(f"run {run_id} has no Vast instance recorded: its files are local, nothing to pull")
            row = fleet.provider.instance(run["instance_id"])
            if row is None:
                raise OpsError(f"run {run_id}: its instance {run['instance_id']} is gone; what was not verified "
                               "before is lost")
            return fleet.sync_instance(row, [run_id])

    def sweep(self) -> list[Instance]:
        """Instances on the account that state.db does not know (``nko-ops vast sweep``)."""
        with self.action("orphan sweep") as fleet:
            return fleet.sweep()

    def close(self) -> None:
        """Close the Fleet (SSH sessions, its connection) now, or, while an action still runs
        in a worker, when that action ends: quitting never waits long for the cloud."""
        self._closing = True
        if not self.lock.acquire(timeout=2):
            return
        try:
            self._close_fleet()
        finally:
            self.lock.release()

    def _close_fleet(self) -> None:
        if self._fleet is not None:
            self._fleet.close()
            self._fleet.db.close()
            self._fleet = None
