"""The budget guard: polls the account and enforces the cap on its own timer, whatever the
executor is doing (a boot wait of up to ``boot_timeout_s``, a long sync, a relaunch), and
keeps each instance's lease (the server-side backstop) up to date.

Every ``poll_interval_s`` the guard charges the fleet (``Ledger.observe``, on its own state.db
connection) and, when the spend plus one poll interval of the fleet's rate reaches the cap,
stops spend at once: every instance still billing compute is stopped the way
``Fleet.stop_spend`` does it (trainers stopped, a final sync, destroyed when every file is
verified, else stopped), one worker per instance, each on its own connection. A stop that
has not finished within ``stop_deadline`` (half a poll interval) is cut short by stopping the
instance through the API: compute stops billing, its disk and files stay (they are synced
later, `nko-ops vast sync --instance ID`). So the account never bills more than the cap plus
about one poll interval of the fleet's hourly rate.

The lease: the guard writes to every instance on which a trainer runs the time at which the
budget would run out at the fleet's current rate (``runway_until``). The runner on the
instance stops its trainer, and asks Vast to stop the instance, once that time has passed
without a new lease: that holds with no executor running at all (``--detach``, Ctrl-C, a
crash), because the instance polices itself.
"""

from __future__ import annotations

import posixpath
import threading
import time
from typing import Callable

from state import store
from backend.vast.config import BudgetSettings, VastSettings
from backend.provider import Instance, Provider, ProviderError
from backend.vast.cost import BudgetState
from backend.vast.fleet import Fleet

MAX_LEASE_S = 30 * 86400.0


def stop_deadline(poll_interval_s: float) -> float:
    """How long the guard lets a budget stop sync before it stops the instance instead."""
    return max(1.0, 0.5 * poll_interval_s)


def runway_until(state: BudgetState, now: float) -> float:
    """When the budget runs out at the fleet's current rate: the spend plus one poll interval
    of the fleet reaches the cap (the same line the guard stops spend at)."""
    left = state.cap_usd - state.projected_usd
    if left <= 0:
        return now
    if state.fleet_usd_per_h <= 0:
        return now + MAX_LEASE_S
    return now + min(MAX_LEASE_S, left / state.fleet_usd_per_h * 3600.0)


def billing_compute(inst: Instance) -> bool:
    """Whether the instance bills more than its disk now (running, loading, starting)."""
    return inst.rate > inst.storage_usd_per_h


class BudgetGuard:
    """One background thread per executor session (``start`` / ``stop``); ``over`` is set once
    the cap has been reached, ``state`` is the last budget state seen."""

    def __init__(self, db_path: str, settings: VastSettings, budget: BudgetSettings, provider: Provider,
                 log: Callable[[str], None] = print, clock: Callable[[], float] = time.time):
        self.db_path, self.settings, self.budget, self.provider = str(db_path), settings, budget, provider
        self.log, self.clock = log, clock
        self.interval = budget.poll_interval_s
        self.stop_deadline = stop_deadline(self.interval)
        self.over = threading.Event()
        self.state: BudgetState | None = None
        self.error: str | None = None
        self._halt = threading.Event()
        self._thread: threading.Thread | None = None
        self._fleet = None
        self._launched = 0.0
        self._lock = threading.Lock()
        self._tick_lock = threading.Lock()

    # ------------------------------------------------------------------ thread

    def start(self) -> "BudgetGuard":
        self._thread = threading.Thread(target=self._run, name="vast-budget-guard", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._halt.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + self.stop_deadline + 30)
        if self._fleet is not None:
            self._fleet.close()
            self._fleet.db.close()
            self._fleet = None

    def _run(self) -> None:
        while not self._halt.wait(self.interval):
            try:
                self.tick()
            except ProviderError as e:  # the API is unreachable for now: try again at the next tick
                self.log(f"budget guard: cannot poll the Vast API ({e}); trying again in {self.interval:g} s")
            except Exception as e:  # never let the guard die silently: say so, keep polling
                self.error = f"{type(e).__name__}: {e}"
                self.log(f"budget guard: {self.error}")

    def launched(self, usd_per_h: float) -> None:
        """Count an instance just created in the fleet's rate until the next tick lists it."""
        with self._lock:
            self._launched += usd_per_h

    # ------------------------------------------------------------------ one tick

    def fleet(self) -> Fleet:
        if self._fleet is None:
            self._fleet = Fleet(store.open_db(self.db_path), self.settings, self.budget, self.provider,
                                clock=self.clock, log=self.log)
        return self._fleet

    def tick(self) -> BudgetState:
        """One poll: charge, then stop spend over the cap, else renew the leases (one tick at a
        time: the executor may ask for one between two timed ones)."""
        with self._tick_lock:
            return self._tick()

    def _tick(self) -> BudgetState:
        fleet = self.fleet()
        rows = self.provider.instances()
        with self._lock:
            fleet.ledger.unpolled_usd_per_h, self._launched = self._launched, 0.0
        state = fleet.ledger.observe(rows)
        self.state = state
        if state.over:
            self.over.set()
            targets = [r for r in rows if billing_compute(r)]
            if targets:
                self.log(f"budget guard: {state}; stopping spend on {len(targets)} instance(s)")
                self.stop_spend(targets)
        else:
            self.renew_leases(rows, state)
        return state

    def renew_leases(self, rows: list[Instance], state: BudgetState) -> None:
        fleet = self.fleet()
        until = runway_until(state, self.clock())
        for inst in rows:
            iid = inst.id
            if not inst.running or not fleet.is_ours(iid) or not fleet.trainer_started(iid):
                continue
            try:
                write_lease(fleet, inst, until)
            except Exception as e:  # SSH trouble: the old lease stands until it expires
                self.log(f"budget guard: lease of instance {iid} not renewed ({type(e).__name__}: {e})")

    def stop_spend(self, rows: list[Instance]) -> None:
        """Stop spend on ``rows`` within ``stop_deadline``: a worker per instance does what
        ``Fleet.stop_spend`` does; any instance whose worker is still busy at the deadline is
        stopped through the API (compute stops billing; its disk and files are kept)."""
        def work(inst: Instance) -> None:
            f = Fleet(store.open_db(self.db_path), self.settings, self.budget, self.provider, clock=self.clock,
                      log=self.log)
            try:
                for o in f.stop_spend([inst]):
                    self.log(f"budget guard: {o}")
            except Exception as e:
                self.log(f"budget guard: stopping spend on instance {inst.id}: {type(e).__name__}: {e}")
            finally:
                f.close()
                f.db.close()

        workers = [(row, threading.Thread(target=work, args=(row,), daemon=True)) for row in rows]
        for _, t in workers:
            t.start()
        end = time.monotonic() + self.stop_deadline
        for row, t in workers:
            t.join(max(0.0, end - time.monotonic()))
        for row, t in workers:
            if not t.is_alive():
                continue
            iid = row.id
            try:
                self.provider.stop(iid)
                msg = (f"budget cap: instance {iid} STOPPED after {self.stop_deadline:g} s (its final sync had not "
                       "finished): compute no longer bills, its disk and files are kept; save them with "
                       f"`vastai start instance {iid}`, `nko-ops vast sync --instance {iid}`, then "
                       f"`nko-ops vast destroy {iid}`")
                level = "warning"
            except ProviderError as e:
                msg, level = f"budget cap: instance {iid} could not be stopped ({e}): it still bills", "error"
            self.log(msg)
            store.add_event(self.fleet().db, msg, instance_id=iid, kind="budget-stop", level=level, source="vast")


def write_lease(fleet, inst: Instance, until: float) -> None:
    """Tell the runner(s) on the instance until when they may run without a new lease."""
    st = fleet.stager(inst)
    st.helper("lease", posixpath.join(st.layout.root, "ctl"), f"{until:.3f}", timeout=60)
