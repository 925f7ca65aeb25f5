"""The instances of the account as one fleet: poll (ledger, idle tracking), sync, and the
only ways this project destroys an instance.

Destroy rule: an instance is destroyed only when every file under its runs directory is in
the local store with the exact sha256 it has on the instance, checked at that moment (a sync
runs first). If the sync fails or the instance cannot be reached, the destroy is refused and
the refusal names the files that would be lost. ``force`` skips the check only when the
instance id is typed a second time (``confirm``); the forced destroy is recorded as an event
with the files it gave up, and those artifacts are marked ``missing``.

The listing that decides "nothing left to lose" fails rather than shrinks: a file that cannot
be read or keeps changing while it is hashed, or a missing runs directory on an instance on
which a trainer was started, refuses the destroy. The runs directory is the one recorded for
the instance when it was registered, not the one the settings name today.

Only ``discard`` destroys without that check, and only an instance this Fleet registered as
new (created by this launch) on which no trainer was ever started; anything else it hands to
``destroy``. An instance the lane stops using (lost, abandoned) goes through ``retire``: if the
destroy is refused it stays recorded as ours and alive, with an error event, so it is neither
forgotten nor billed unseen; if it still runs it is stopped (compute stops billing, its disk
and files stay).
"""

from __future__ import annotations

import json
import posixpath
import time
from dataclasses import dataclass, field
from typing import Callable

from backend.vast import idle
from backend.vast.config import BudgetSettings, VastSettings
from backend.vast.cost import BudgetState, Ledger, police
from backend.provider import Instance, Offer, Provider, ProviderError
from backend.vast.remote import Layout, StageError, Stager
from backend.vast.ssh import HostKeyChanged, KnownHosts, Remote, SSHError, SSHTarget, fingerprint
from backend.vast.sync import CAS, Entry, Mirror, SyncError, SyncReport, Syncer, remote_entries
from state import fleet as fleet_state
from state import store


@dataclass
class DestroyOutcome:
    instance_id: str
    destroyed: bool
    reason: str
    would_lose: list[str] = field(default_factory=list)
    reports: list[SyncReport] = field(default_factory=list)
    forced: bool = False

    def __str__(self) -> str:
        if self.destroyed:
            return f"instance {self.instance_id}: destroyed ({self.reason})"
        s = f"instance {self.instance_id}: NOT destroyed: {self.reason}"
        if self.would_lose:
            s += "\n  files that would be lost:\n    " + "\n    ".join(self.would_lose)
        return s


class Fleet:
    def __init__(self, db, settings: VastSettings, budget: BudgetSettings, provider: Provider,
                 clock: Callable[[], float] = time.time, log: Callable[[str], None] = print):
        self.db, self.settings, self.provider, self.clock, self.log = db, settings, provider, clock, log
        self.known = KnownHosts(settings.known_hosts)
        self.cas = CAS(settings.cas_dir)
        mirror = None
        if settings.mirror is not None:
            m = settings.mirror
            mirror = Mirror(SSHTarget(m.host, m.port, m.user, m.key), m.path, self.known)
        self.syncer = Syncer(db, self.cas, log=log, mirror=mirror)
        self.ledger = Ledger(db, budget, clock)
        self._remotes: dict[str, Remote] = {}
        self._helpers: set[str] = set()
        self._created: set[str] = set()  # instances this Fleet registered as new (see discard)
        self.guard = None  # the BudgetGuard of the executor session driving this Fleet, if any

    # ------------------------------------------------------------------ polling

    def poll(self, enforce: bool = True) -> tuple[list[Instance], BudgetState]:
        """One look at the account: instance rows, cost ledger, idle tracking; over the
        budget cap (and ``enforce``), spend is stopped at once (``stop_spend``)."""
        rows = self.provider.instances()
        state = police(self.ledger, rows, self.stop_spend) if enforce else self.ledger.observe(rows)
        if enforce and state.over and rows:
            rows = self.provider.instances()  # after stop_spend
        idle.track(self.db, rows, self.settings.idle, self.clock())
        return rows, state

    def register(self, iid: int | str, run_id: str | None, label: str, offer: Offer | None = None,
                 since: float | None = None) -> None:
        """Record an instance we just created, with the run it is for: its offer (the rate the
        ledger charges until a poll sees it), ``since`` (when the create was sent; default
        now) and the remote root its files live under. An id already recorded as ours is not
        counted as new (``discard`` will not destroy it unchecked)."""
        iid = str(iid)
        with store.transaction(self.db):
            old = fleet_state.instance(self.db, iid)
            data = old.data if old else {}
            if old is None or old.run_id is None:
                self._created.add(iid)
            data.update(offer=offer.summary() if offer else data.get("offer") or {},
                        registered_at=self.clock() if since is None else since)
            data.setdefault("remote_root", Layout.for_instance(self.settings.remote_base, iid).root)
            fleet_state.register_instance(self.db, iid, label, run_id, data)
            store.add_event(self.db, f"instance {iid} created for {run_id!r}" + (
                f" on offer {offer.id} ({offer.gpu_name}, ${offer.dph_total or 0:.3f}/h)"
                if offer else ""), instance_id=iid, run_id=run_id, kind="instance-created", source="vast")

    def mark_trainer(self, iid: int | str, run_id: str) -> None:
        """Record, before it is started, that a trainer may run on the instance from now on:
        its files are then no longer only copies of local ones."""
        with store.transaction(self.db):
            data = fleet_state.instance_data(self.db, str(iid))
            fleet_state.ensure_instance(self.db, str(iid))
            data.setdefault("trainer_started_at", self.clock())
            data.setdefault("trainer_runs", [])
            if run_id not in data["trainer_runs"]:
                data["trainer_runs"].append(run_id)
            fleet_state.set_instance_data(self.db, str(iid), data)

    def trainer_started(self, iid: int | str) -> bool:
        """Whether state.db knows of a trainer started on the instance (ever)."""
        if fleet_state.instance_data(self.db, str(iid)).get("trainer_started_at") is not None:
            return True
        return fleet_state.trainer_start_recorded(self.db, str(iid))

    # ------------------------------------------------------------------ SSH

    def target(self, inst: Instance) -> SSHTarget:
        if inst.ssh is None:
            raise SSHError(f"instance {inst.id} has no SSH address yet (status {inst.status})")
        host, port = inst.ssh
        return SSHTarget(str(host), port, self.settings.ssh_user, self.settings.ssh_key)

    def remote(self, inst: Instance) -> Remote:
        iid = inst.id
        t = self.target(inst)
        r = self._remotes.get(iid)
        if r is None or r.target != t:
            if r is not None:
                r.close()
            r = Remote(t, self.known, timeout=self.settings.ssh_timeout_s, on_trust=self._trusted(iid))
            self._remotes[iid] = r
        return r

    def _trusted(self, iid: str):
        def note(hostport, key):
            store.add_event(self.db, f"trusted the host key of {hostport} on first use: {key.get_name()} "
                            f"{fingerprint(key)}", instance_id=iid, kind="host-key", source="vast")
        return note

    def forget_remote(self, iid: str, inst: Instance | None = None) -> None:
        self._helpers.discard(str(iid))
        r = self._remotes.pop(str(iid), None)
        if r is not None:
            r.close()
            self.known.forget(r.target.hostport)
        elif inst is not None and inst.ssh is not None:
            self.known.forget(self.target(inst).hostport)

    def layout(self, iid: int | str) -> Layout:
        """Where the instance's files are: the root recorded when it was registered (the
        settings' ``remote_base`` may have changed since), else the settings'."""
        root = fleet_state.instance_data(self.db, str(iid)).get("remote_root")
        return Layout(root) if root else Layout.for_instance(self.settings.remote_base, iid)

    def stager(self, inst: Instance) -> Stager:
        """A Stager for the instance, its helper installed (checked once per session)."""
        st = Stager(self.remote(inst), self.layout(inst.id), self.settings.remote_python)
        if inst.id not in self._helpers:
            st.install_helper()
            self._helpers.add(inst.id)
        return st

    # ------------------------------------------------------------------ sync

    def _listing(self, st: Stager, iid: str) -> dict[str, list[Entry]]:
        """run id -> its files on the instance (one hash pass over the runs directory)."""
        by_run: dict[str, list[Entry]] = {}
        for e in remote_entries(st.remote, st.python, st.layout.helper, st.layout.runs,
                                missing_ok=not self.trainer_started(iid)):
            rid, _, name = e.name.partition("/")
            if name:
                by_run.setdefault(rid, []).append(Entry(name, e.size, e.sha256))
        return by_run

    def run_ids_on(self, inst: Instance) -> list[str]:
        return sorted(self._listing(self.stager(inst), inst.id))

    def sync_instance(self, inst: Instance, run_ids: list[str] | None = None) -> list[SyncReport]:
        """Pull every run directory on the instance (or only ``run_ids``) into the store."""
        st = self.stager(inst)
        listing = self._listing(st, inst.id)
        reports = []
        for rid in (run_ids if run_ids is not None else sorted(listing)):
            rep = self.syncer.sync_dir(st.remote, st.python, st.layout.helper, rid, st.layout.run_dir(rid),
                                       inst.id, entries=listing.get(rid, []))
            reports.append(rep)
            store.add_event(self.db, f"sync from instance {inst.id}: {rep}", run_id=rid,
                            instance_id=inst.id, kind="sync", level="info" if rep.ok else "error",
                            source="vast", data={"verified": len(rep.verified), "pulled": len(rep.pulled),
                                                 "bytes": rep.bytes,
                                                 "failed": [[e.name, why] for e, why in rep.failed]})
        return reports

    def unsynced(self, inst: Instance) -> list[str]:
        """``run_id/file`` of every file on the instance whose content is not in the store."""
        st = self.stager(inst)
        return [e.name for e in self.syncer.unverified(st.remote, st.python, st.layout.helper, st.layout.runs,
                                                        missing_ok=not self.trainer_started(inst.id))]

    def known_unverified(self, iid: str) -> list[str]:
        """What state.db says the instance holds that is not verified locally."""
        return fleet_state.unverified_on_instance(self.db, iid)

    # ------------------------------------------------------------------ destroy

    def destroy(self, iid: int | str, force: bool = False, confirm: str | None = None,
                reason: str = "requested") -> DestroyOutcome:
        """Destroy one instance under the destroy rule (module docstring)."""
        iid = str(iid)
        if force and confirm != iid:
            return DestroyOutcome(iid, False, "--force needs the instance id typed again (confirm) and it "
                                              f"did not match ({confirm!r})")
        try:
            inst = self.provider.instance(iid)
        except ProviderError as e:
            return DestroyOutcome(iid, False, f"cannot look the instance up: {e}")
        if inst is None:
            self.ledger.destroyed(iid)
            self.forget_remote(iid)
            return DestroyOutcome(iid, True, "already gone")
        if not force and not self.is_ours(iid):
            return DestroyOutcome(iid, False, "not created by nko-ops (an orphan: `nko-ops vast sweep`): what its "
                                              "disk holds is unknown here; look at it, then use --force")
        if force:
            lose, reports = self._give_up(inst, reason), []
        else:
            refused, reports = self._verify_files(inst)
            if refused is not None:
                return refused
            lose = []
        return self._destroy_now(inst, reason, force, lose, reports)

    def _verify_files(self, inst: Instance) -> tuple[DestroyOutcome | None, list[SyncReport]]:
        """Stop the trainers, sync, and list what is still not in the store: (the refusal, or
        None when every file on the instance is verified locally; the sync reports)."""
        iid = inst.id
        try:
            stopped = self.stop_trainers(inst)
            if stopped is not None:
                return DestroyOutcome(iid, False, stopped, self.known_unverified(iid)), []
            reports = self.sync_instance(inst)
            lose = self.unsynced(inst)
        except HostKeyChanged as e:
            return DestroyOutcome(iid, False, str(e), self.known_unverified(iid)), []
        except (SSHError, SyncError, StageError) as e:
            what = "cannot reach the instance to verify its files" if isinstance(e, SSHError) else \
                "cannot verify the files on the instance"
            return DestroyOutcome(iid, False, f"{what} ({e}); use --force to destroy anyway",
                                  self.known_unverified(iid)), []
        except UnicodeError as e:  # a name that cannot be sent over SFTP: never a shorter listing
            return DestroyOutcome(iid, False, f"a file name on the instance cannot be encoded ({e}); rename "
                                              "it there or use --force", self.known_unverified(iid)), []
        if lose:
            why = "; ".join(f"{e.name}: {w}" for rep in reports for e, w in rep.failed) or "not in the local store"
            return DestroyOutcome(iid, False, f"sync failed, destroying would lose data ({why})", lose, reports), reports
        return None, reports

    def _give_up(self, inst: Instance, reason: str) -> list[str]:
        """A forced destroy: record (an event) the files without a verified local copy it gives up."""
        iid = inst.id
        try:
            lose = self.unsynced(inst)
        except (SSHError, SyncError, StageError):
            lose = self.known_unverified(iid)
        store.add_event(self.db, f"FORCED destroy of instance {iid} by {store.user()} ({reason}); "
                        f"{len(lose)} file(s) without a verified local copy given up",
                        instance_id=iid, kind="force-destroy", level="warning", source="vast",
                        data={"instance_id": iid, "files": lose, "user": store.user(), "reason": reason})
        return lose

    def _destroy_now(self, inst: Instance, reason: str, force: bool, lose: list[str],
                     reports: list[SyncReport]) -> DestroyOutcome:
        iid = inst.id
        try:
            self.provider.destroy(iid)
        except ProviderError as e:
            store.add_event(self.db, f"destroy of instance {iid} failed: {e}; it is still running (and billing)",
                            instance_id=iid, kind="destroy-failed", level="error", source="vast")
            return DestroyOutcome(iid, False, f"the provider refused the destroy: {e}", [], reports, force)
        self.ledger.destroyed(iid, inst=inst)
        self.forget_remote(iid, inst)
        if force and lose:
            fleet_state.mark_missing(self.db, lose)
        store.add_event(self.db, f"instance {iid} destroyed ({reason})" + (" with --force" if force else
                        ", every file verified locally"), instance_id=iid, run_id=inst.label,
                        kind="instance-destroyed", source="vast")
        return DestroyOutcome(iid, True, reason, lose if force else [], reports, force)

    def stop_trainers(self, inst: Instance) -> str | None:
        """Before the final sync of an instance about to be destroyed: stop every trainer on it
        (SIGTERM, ``stop_wait_s``, then SIGKILL) and confirm it exited, so no file changes
        between the last listing and the destroy. None when none runs any more; else why the
        destroy must be refused. Raises SSHError / StageError when the instance cannot be asked."""
        iid = inst.id
        if not inst.running or not self.trainer_started(iid):
            return None
        st = self.stager(inst)
        wait = self.settings.stop_wait_s
        r = st.helper("quiesce", posixpath.join(st.layout.root, "ctl"), f"{wait:g}", timeout=wait + 60, check=False)
        try:
            runs = json.loads(r.out)
        except ValueError:
            raise StageError(f"instance {iid}: stopping its trainers failed: {(r.err or r.out).strip()[-300:]}") \
                from None
        stopped = sorted(rid for rid, a in runs.items() if a.get("was_running"))
        if stopped:
            store.add_event(self.db, f"instance {iid}: trainer(s) of {', '.join(stopped)} stopped before the final "
                            "sync (exit confirmed)", instance_id=iid, kind="trainer-stopped", source="vast",
                            data={"runs": runs})
        if r.rc != 0:
            alive = sorted(rid for rid, a in runs.items() if not a.get("exited"))
            return (f"the trainer of {', '.join(alive) or '?'} on instance {iid} did not exit after SIGTERM and "
                    "SIGKILL: its files may still change, so they cannot be verified")
        return None

    def is_ours(self, iid: int | str) -> bool:
        """Whether this project created the instance (for a run)."""
        return fleet_state.is_ours(self.db, str(iid))

    def discard(self, iid: int | str, reason: str) -> DestroyOutcome:
        """Destroy an instance of a launch that failed part way, without a sync: only when this
        Fleet registered it as new (created by this launch) and no trainer was ever started on
        it, so it holds only copies of local files. Any other instance (an earlier one of the
        same run, one a trainer may have run on) goes through ``destroy``, which syncs and
        verifies first."""
        iid = str(iid)
        if iid not in self._created or self.trainer_started(iid):
            return self.destroy(iid, reason=reason)
        try:
            self.provider.destroy(iid)
        except ProviderError as e:
            store.add_event(self.db, f"destroy of instance {iid} failed: {e}; it is still running (and billing)",
                            instance_id=iid, kind="destroy-failed", level="error", source="vast")
            return DestroyOutcome(iid, False, f"the provider refused the destroy: {e}")
        self.ledger.destroyed(iid)
        self.forget_remote(iid)
        self._created.discard(iid)
        store.add_event(self.db, f"instance {iid} destroyed ({reason}); no trainer had started on it",
                        instance_id=iid, kind="instance-destroyed", source="vast")
        return DestroyOutcome(iid, True, reason)

    def retire(self, iid: int | str, reason: str, run_id: str | None = None) -> DestroyOutcome:
        """Destroy an instance the lane stops using (its run lost it, failed or finished) under
        the destroy rule. When that is refused, the instance stays recorded as ours and alive
        (the ledger keeps charging it; ``vast instances`` and ``vast destroy`` see it) and an
        error event says it is kept and why."""
        iid = str(iid)
        o = self.destroy(iid, reason=reason)
        if not o.destroyed:
            o.reason += self._stop_kept(iid, run_id)
            store.add_event(self.db, f"instance {iid} KEPT ({reason}): {o.reason}. It still bills (storage, or "
                            f"its full price if it runs again): save its files, then `nko-ops vast destroy {iid}` "
                            "(--force gives them up)", instance_id=iid, run_id=run_id, kind="instance-kept",
                            level="error", source="vast", data={"files": o.would_lose, "reason": reason})
        return o

    def _stop_kept(self, iid: str, run_id: str | None) -> str:
        """Stop a kept instance that still runs (nothing of the lane uses it any more): compute
        stops billing, its disk and files stay. Returns what to add to the refusal."""
        try:
            inst = self.provider.instance(iid)
            if inst is None or not inst.running:
                return ""
            self.provider.stop(iid)
        except ProviderError as e:
            store.add_event(self.db, f"instance {iid} could not be stopped ({e}): it bills its full price",
                            instance_id=iid, run_id=run_id, kind="stop-failed", level="error", source="vast")
            return f"; stopping it failed too: {e}"
        store.add_event(self.db, f"instance {iid} STOPPED: it could not be destroyed, so it is kept; compute no "
                        "longer bills, its disk (storage) does. To save its files: start it "
                        f"(`vastai start instance {iid}`), `nko-ops vast sync --instance {iid}`, then "
                        f"`nko-ops vast destroy {iid}`", instance_id=iid, run_id=run_id, kind="instance-stopped",
                        level="warning", source="vast")
        return "; stopped (compute no longer bills; its disk is kept)"

    def kill_idle(self, force_ids: dict[str, str] | None = None) -> list[DestroyOutcome]:
        """Destroy the idle instances (module docstring's rule; ``force_ids``: id -> the id
        typed again, for instances to destroy even without verified copies)."""
        out = []
        for inst, v in self.idle_rows(enforce=True):
            iid = inst.id
            confirm = (force_ids or {}).get(iid)
            out.append(self.destroy(iid, force=confirm is not None, confirm=confirm, reason=f"idle: {v.reason}"))
        return out

    def idle_rows(self, enforce: bool = True) -> list[tuple[Instance, idle.IdleVerdict]]:
        """Poll the account and return the instances idle now, each with its verdict
        (``enforce``: as ``poll``, stop spending when over the budget cap)."""
        rows, _ = self.poll(enforce=enforce)
        now = self.clock()
        out = []
        for inst in rows:
            iid = inst.id
            beat, last_seen = self._remote_activity(inst)
            v = idle.verdict(self.db, iid, self.settings.idle, now, beat, last_seen)
            self.log(f"instance {iid}: {'idle' if v.idle else 'not idle'} ({v.reason})")
            if v.idle:
                out.append((inst, v))
        return out

    def _remote_activity(self, inst: Instance) -> tuple[float | None, float | None]:
        """(newest heartbeat of a live trainer, last time any trainer was seen active: its
        runner's start, heartbeat or exit) on the instance, from its runners' files; (None,
        None) when it has none or cannot be reached."""
        if not inst.running:
            return None, None
        try:
            st = self.stager(inst)
            r = st.helper("activity", posixpath.join(st.layout.root, "ctl"), timeout=60)
            runs = json.loads(r.out).values()
            live = [float(a["beat"]) for a in runs if a["alive"] and a["beat"] is not None]
            seen = [float(t) for a in runs for t in (a["started"], a["beat"], a["exit"]) if t is not None]
        except (SSHError, StageError, ValueError, TypeError, AttributeError, KeyError):
            return None, None
        return max(live, default=None), max(seen, default=None)

    def stop_spend(self, rows: list[Instance]) -> list[DestroyOutcome]:
        """Over the budget cap: destroy every instance whose files are verified (after a
        sync); stop the others (compute stops billing; their disk is kept, and still bills
        storage, until their files are saved)."""
        out = []
        for inst in rows:
            iid = inst.id
            o = self.destroy(iid, reason="budget cap reached")
            if not o.destroyed and inst.running:
                try:
                    self.provider.stop(iid)
                    o.reason += "; stopped instead (its disk is kept and bills storage until its files are saved)"
                except ProviderError as e:
                    o.reason += f"; stopping it failed too: {e}"
                store.add_event(self.db, f"budget cap: instance {iid} NOT destroyed: {o.reason}", instance_id=iid,
                                kind="budget-stop", level="error", source="vast", data={"files": o.would_lose})
            out.append(o)
        return out

    def over_cap_plan(self, rows: list[Instance]) -> list[tuple[str, str]]:
        """(instance id, what ``stop_spend`` would do to it), without doing anything: what a
        listing shows when the budget is over its cap."""
        plan = []
        for inst in rows:
            iid, running = inst.id, inst.running
            if self.is_ours(iid):
                what = "sync, then destroy once every file on it is verified locally" + (
                    "; stop it instead if a file cannot be saved" if running else "; kept if a file cannot be saved")
            else:
                what = ("stop it (not created by nko-ops: never destroyed without --force)" if running else
                        "nothing (not created by nko-ops, not running)")
            plan.append((iid, what))
        return plan

    def sweep(self) -> list[Instance]:
        """Instances the account has that the state store does not know (orphans)."""
        return [i for i in self.provider.instances() if not self.is_ours(i.id)]

    def close(self) -> None:
        for r in self._remotes.values():
            r.close()
        self._remotes.clear()
