"""Cost ledger and budget, from polling the instance list.

Each poll charges every instance for the time since it was last charged, at the higher of
the rates seen at the two ends of the interval (``dph_total`` while running, which includes
its disk; the disk's ``storage_total_cost`` otherwise). The ledger therefore never charges
less than Vast bills, only up to one poll interval more for a state change it did not see.
An instance seen for the first time is charged from its ``start_date`` (also one that
existed before the lane started watching: it spends the same account's money). One that
disappears between polls is charged up to the poll that notices it; one we destroy
ourselves up to the moment the destroy returned. One destroyed (or gone) before any poll saw
it is charged from its ``start_date`` (from the row read just before the destroy), else from
when it was registered, at its offer's ``dph_total``.

Per-instance totals are cumulative in ``cost_samples`` (one row per poll) and mirrored in the
instance's ``data`` JSON; ``budgets.spent_usd`` is the total over all instances.

Budget (``configs/budget.toml``): at ``warn_usd`` a warning event; when the spend plus what
the fleet will cost until the next poll reaches ``cap_usd``, no new launch is allowed and
the policy stops spend (sync, then destroy; ``Fleet.stop_spend``). So the money spent never
exceeds the cap by more than one poll interval of the fleet's hourly rate.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

from backend.provider import Instance
from backend.vast.config import BudgetSettings
from state import fleet as fleet_state
from state import store
from state.fleet import CostSample



def ts(t: float) -> str:
    return datetime.fromtimestamp(t, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def instance_columns(inst: Instance) -> dict:
    """What a poll saw of an instance, as the ``instances`` table's columns."""
    return {"label": inst.label, "gpu_name": inst.gpu_name, "num_gpus": inst.num_gpus, "dph_total": inst.usd_per_h,
            "storage_cost": inst.storage_cost, "actual_status": inst.status, "intended_status": inst.intended_status,
            "cur_state": inst.cur_state, "status_msg": inst.status_msg, "ssh_host": inst.ssh_host,
            "ssh_port": inst.ssh_port, "gpu_util": inst.gpu_util, "start_date": inst.start_date}


@dataclass
class BudgetState:
    spent_usd: float
    fleet_usd_per_h: float
    cap_usd: float
    warn_usd: float
    poll_interval_s: float

    @property
    def projected_usd(self) -> float:
        return self.spent_usd + self.fleet_usd_per_h * self.poll_interval_s / 3600.0

    @property
    def over(self) -> bool:
        return self.projected_usd >= self.cap_usd

    @property
    def warn(self) -> bool:
        return self.spent_usd >= self.warn_usd

    def __str__(self) -> str:
        return (f"${self.spent_usd:.4f} spent of ${self.cap_usd:.2f} (warn at ${self.warn_usd:.2f}); fleet "
                f"${self.fleet_usd_per_h:.3f}/h"
                + ("; OVER CAP: no launches; an enforcing poll stops spend" if self.over else ""))


class Ledger:
    def __init__(self, db, budget: BudgetSettings, clock: Callable[[], float] = time.time):
        self.db, self.budget, self.clock = db, budget, clock
        self.unpolled_usd_per_h = 0.0  # instances launched since the last poll
        fleet_state.upsert_budget(db, budget.name, budget.cap_usd, budget.warn_usd, budget.poll_interval_s,
                                  budget.source)

    # ------------------------------------------------------------------ instances table

    def _charge(self, iid: str, data: dict, until: float, usd_per_h: float, storage_per_h: float,
                running: bool, run_id: str | None) -> None:
        since = data.get("billed_until")
        if since is None or until <= since:
            data.setdefault("billed_until", until)
            return
        dt = until - since
        total = usd_per_h * dt / 3600.0
        storage = min(total, storage_per_h * dt / 3600.0)
        data["compute_usd"] = data.get("compute_usd", 0.0) + (total - storage)
        data["storage_usd"] = data.get("storage_usd", 0.0) + storage
        data["running_s"] = data.get("running_s", 0.0) + (dt if running else 0.0)
        data["billed_until"] = until
        fleet_state.add_cost_sample(self.db, CostSample(iid, run_id, ts(until), usd_per_h, storage_per_h,
                                                        data["running_s"], data["compute_usd"], data["storage_usd"]))
        fleet_state.add_spend(self.db, self.budget.name, total)

    @staticmethod
    def _unobserved(data: dict, inst: Instance | None = None) -> None:
        """An instance no poll has seen yet: start charging it from its start (``inst``'s
        ``start_date``, else when it was registered) at its rate (``inst``'s, else its offer's
        ``dph_total``), so destroying it before the first poll is not free."""
        if data.get("billed_until") is not None:
            return
        since = (inst.start_date if inst else None) or data.get("registered_at")
        usd_per_h = inst.rate if inst else float((data.get("offer") or {}).get("dph_total") or 0.0)
        if since is not None:
            data["billed_until"] = float(since)
            data["rate"] = max(float(data.get("rate") or 0.0), usd_per_h)
            if inst:
                data["storage_rate"] = inst.storage_usd_per_h

    def observe(self, rows: list[Instance], now: float | None = None) -> BudgetState:
        """Record one poll of the provider's instance list: instance rows, charges, and the
        instances that disappeared."""
        now = self.clock() if now is None else now
        seen = set()
        with store.transaction(self.db):
            for r in rows:
                iid = r.id
                seen.add(iid)
                old = fleet_state.instance(self.db, iid)
                data = old.data if old else {}
                cur_rate, st_rate = r.rate, r.storage_usd_per_h
                if old is None or data.get("billed_until") is None:
                    start = float(r.start_date or now)
                    data["billed_until"] = min(start, now)
                    prev_rate = cur_rate
                else:
                    prev_rate = data.get("rate", cur_rate)
                run_id = old.run_id if old else None
                self._charge(iid, data, now, max(prev_rate, cur_rate), st_rate,
                             r.running, run_id)
                data.update(rate=cur_rate, storage_rate=st_rate)
                values = instance_columns(r)
                values.update(last_seen_at=ts(now), data=json.dumps(data))
                if old is None:
                    fleet_state.ensure_instance(self.db, iid)
                fleet_state.update_instance(self.db, iid, values)
            for old in fleet_state.live_instances(self.db):
                if old.id in seen:
                    continue
                data = old.data
                self._unobserved(data)
                self._charge(old.id, data, now, data.get("rate", 0.0), data.get("storage_rate", 0.0),
                             old.actual_status == "running", old.run_id)
                data["gone"] = "vanished"
                fleet_state.mark_instance_gone(self.db, old.id, ts(now), "gone", data)
                store.add_event(self.db, f"instance {old.id} is gone: Vast no longer lists it "
                                f"(lost, preempted or destroyed elsewhere)", instance_id=old.id,
                                run_id=old.run_id, kind="instance-lost", level="error", source="vast")
        self.unpolled_usd_per_h = 0.0
        state = self.state(rows)
        self._warn(state)
        return state

    def destroyed(self, iid: str, now: float | None = None, inst: Instance | None = None) -> None:
        """Final charge for an instance we destroyed (up to now) and its destroyed_at;
        ``inst``: the instance as the provider showed it just before the destroy."""
        now = self.clock() if now is None else now
        with store.transaction(self.db):
            old = fleet_state.instance(self.db, str(iid))
            if old is None or old.destroyed_at:
                return
            data = old.data
            self._unobserved(data, inst)
            self._charge(str(iid), data, now, data.get("rate", 0.0), data.get("storage_rate", 0.0),
                         old.actual_status == "running", old.run_id)
            data["gone"] = "destroyed"
            fleet_state.mark_instance_gone(self.db, str(iid), ts(now), "destroyed", data)

    # ------------------------------------------------------------------ budget

    def spent(self) -> float:
        return fleet_state.spent(self.db, self.budget.name)

    def state(self, rows: list[Instance]) -> BudgetState:
        fleet = sum(r.rate for r in rows) + self.unpolled_usd_per_h
        return BudgetState(self.spent(), fleet, self.budget.cap_usd, self.budget.warn_usd,
                           self.budget.poll_interval_s)

    def can_launch(self, rows: list[Instance], usd_per_h: float) -> tuple[bool, str]:
        """Whether one more instance at ``usd_per_h`` keeps the projection under the cap."""
        s = self.state(rows)
        after = s.projected_usd + usd_per_h * s.poll_interval_s / 3600.0
        if after >= s.cap_usd:
            return False, (f"budget: ${s.spent_usd:.2f} spent, fleet ${s.fleet_usd_per_h:.3f}/h; launching "
                           f"${usd_per_h:.3f}/h more would reach the ${s.cap_usd:.2f} cap before the next poll")
        return True, ""

    def launched(self, usd_per_h: float) -> None:
        """Count a new instance in the fleet's rate until the next poll lists it."""
        self.unpolled_usd_per_h += usd_per_h

    def _warn(self, s: BudgetState) -> None:
        if not s.warn:
            return
        kind = "budget-over" if s.over else "budget-warn"
        if not fleet_state.budget_alert_recorded(self.db, kind, self.budget.name):
            store.add_event(self.db, f"budget {self.budget.name}: {s}", kind=kind,
                            level="error" if s.over else "warning", source="vast",
                            data={"budget": self.budget.name, "spent_usd": s.spent_usd, "cap_usd": s.cap_usd})

    def run_spend(self, run_id: str) -> float:
        """USD charged to instances that ran ``run_id`` (latest cumulative total per instance)."""
        return fleet_state.run_spend(self.db, run_id)


def police(ledger: Ledger, rows: list[Instance], stop_spend: Callable[[list[Instance]], object]) -> BudgetState:
    """One budget poll: charge the instances, and stop spend when the projection reaches
    the cap (``stop_spend`` gets the live instances)."""
    state = ledger.observe(rows)
    if state.over and rows:
        stop_spend(rows)
    return state
