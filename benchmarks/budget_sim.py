"""Budget simulation (issue 11): does the account ever bill more than cap + one poll interval x
fleet $/h, whatever the executor is busy with?

Simulated clock, event driven. Real parts: the emulator's Cloud (its per-second billing is
what is measured), the Ledger (``observe``, ``can_launch``, ``BudgetState.over``: the same
code the guard and the executor run) on an in-memory state store, and the guard's stop
deadline. Randomised per case: the offers' prices, the fleet size (parallel runs), the number
of runs and their training lengths, the boot delay, the executor's staging and final-sync
durations (while it does those it polls nothing: it is "busy"), each instance's budget-stop
sync duration, the poll interval and the cap.

The guard ticks every poll interval whatever the executor does. Over the cap, each instance
still billing compute is destroyed when its sync finishes, or stopped (disk kept) at the
guard's stop deadline, whichever comes first. A case ends when nothing bills compute any
more; billed = the Cloud's exact bill then. The bound per case is cap + poll interval x the
largest fleet rate seen ($/h, the fleet's dph_total summed). ``ratio`` = billed / bound.

    .venv/bin/python benchmarks/budget_sim.py --cases 1000 --seed 11
"""

from __future__ import annotations

import argparse
import heapq
import json
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from state.store import open_db  # noqa: E402
from backend.vast.config import BudgetSettings  # noqa: E402
from backend.vast.cost import Ledger  # noqa: E402
from backend.vast.emulator import Cloud, default_offers  # noqa: E402
from backend.vast.guard import billing_compute, stop_deadline  # noqa: E402
from backend.vast.provider import instance_of  # noqa: E402


T0 = 1.7e9  # the simulated clock starts at a real epoch time (0 would read as "no start date")


@dataclass
class Clock:
    now: float = T0

    def __call__(self) -> float:
        return self.now


@dataclass
class Run:
    train_s: float
    final_sync_s: float
    iid: int | None = None
    exits_at: float | None = None
    done: bool = False


@dataclass
class Case:
    seed: int
    poll_s: float
    cap_usd: float
    parallel: int
    boot_s: float
    staging_s: tuple[float, float]
    runs: list[Run]
    stop_sync_s: tuple[float, float]
    price_scale: float
    billed: float = 0.0
    bound: float = 0.0
    fleet_max: float = 0.0
    over: bool = False
    launched: int = 0
    kept: int = 0
    events: list = field(default_factory=list)

    @property
    def ratio(self) -> float:
        return self.billed / self.bound


def make_case(rng: random.Random, seed: int) -> Case:
    """Durations are drawn in poll intervals (what matters to the guard), from well under one
    to many: boot waits and syncs longer than the poll interval are the cases that matter."""
    poll_s = rng.choice([1.0, 5.0, 15.0, 30.0, 60.0, 120.0, 300.0])
    n_runs = rng.randint(1, 12)
    runs = [Run(train_s=poll_s * rng.uniform(0.5, 60), final_sync_s=poll_s * rng.choice([0.1, 1, 5, 20]) * rng.random())
            for _ in range(n_runs)]
    return Case(seed=seed, poll_s=poll_s, cap_usd=rng.choice([0.01, 0.05, 0.2, 1.0, 5.0]) * rng.uniform(0.5, 2),
                parallel=rng.randint(1, 8), boot_s=poll_s * rng.choice([0, 0.5, 2, 10, 30]) * rng.random(),
                staging_s=(0.0, poll_s * rng.choice([0.2, 2, 10])), runs=runs,
                stop_sync_s=(0.0, poll_s * rng.choice([0.1, 0.5, 2, 10])), price_scale=rng.uniform(0.3, 4.0))


def simulate(case: Case) -> Case:
    rng = random.Random(case.seed)
    clock = Clock()
    offers = default_offers()
    for o in offers:
        o["dph_base"] = round(o["dph_base"] * case.price_scale * rng.uniform(0.8, 1.2), 4)
    cloud = Cloud(api_key=None, clock=clock, boot_s=case.boot_s, offers=offers)
    db = open_db(":memory:")
    budget = BudgetSettings(cap_usd=case.cap_usd, warn_usd=0.8 * case.cap_usd, poll_interval_s=case.poll_s,
                            source="sim")
    ledger = Ledger(db, budget, clock)
    deadline = stop_deadline(case.poll_s)
    queue: list[tuple[float, int, str, object]] = []
    seq = [0]

    def at(t: float, kind: str, arg: object = None) -> None:
        seq[0] += 1
        heapq.heappush(queue, (t, seq[0], kind, arg))

    def fleet_rate() -> float:
        return sum(Cloud.rate(r) for r in cloud.instances.values())

    def rows() -> list:  # the account as the provider interface shows it
        return [instance_of(r) for r in cloud.list({}, None, 1000, None)["instances"]]

    pending = list(case.runs)
    active: list[Run] = []
    stopping: set[int] = set()
    at(T0 + case.poll_s, "guard")
    at(T0, "exec")
    billed_at_stop = None
    while queue:
        t, _, kind, arg = heapq.heappop(queue)
        clock.now = t
        case.fleet_max = max(case.fleet_max, fleet_rate())
        if kind == "guard":
            live = rows()
            state = ledger.observe(live)
            if state.over:
                case.over = True
                for r in live:
                    if billing_compute(r) and int(r.id) not in stopping:
                        stopping.add(int(r.id))
                        sync = rng.uniform(*case.stop_sync_s)
                        if sync <= deadline:
                            at(t + sync, "destroy", int(r.id))
                        else:
                            at(t + deadline, "stop", int(r.id))
            if any(billing_compute(r) for r in rows()) or (pending and not case.over) or \
                    any(not r.done for r in active):
                at(t + case.poll_s, "guard")
        elif kind == "destroy":
            if arg in cloud.instances:
                cloud.destroy(arg)
        elif kind == "stop":
            if arg in cloud.instances:
                cloud.update(arg, {"state": "stopped"})
                case.kept += 1
        elif kind == "finish":  # the executor's final sync is done: destroy
            if arg in cloud.instances:
                cloud.destroy(arg)
        elif kind == "create":  # the executor rents the cheapest free offer the budget allows
            run = arg
            live = rows()
            used = {r.machine_id for r in live}
            free = [o for o in cloud.search({"limit": 50}) if o["machine_id"] not in used]
            ok = False
            if free and not case.over:
                offer = min(free, key=lambda o: o["dph_total"])
                ok, _ = ledger.can_launch(live, offer["dph_total"])
            if not ok:
                pending.clear()  # blocked: the executor launches nothing more
                active.remove(run)
                run.done = True
                continue
            run.iid = cloud.create(offer["id"], {"image": "sim", "disk": 60})
            ledger.launched(offer["dph_total"])
            case.launched += 1
            run.exits_at = t + case.boot_s + run.train_s
        elif kind == "exec":  # one pass of the executor's loop; each action keeps it busy
            busy = 0.0
            for run in list(active):
                if run.iid is None:
                    continue  # its create is scheduled
                if run.iid not in cloud.instances or cloud.instances[run.iid]["actual_status"] != "running" \
                        and cloud.instances[run.iid]["actual_status"] != "loading":
                    run.done = True
                    active.remove(run)
                elif run.exits_at is not None and t + busy >= run.exits_at:
                    busy += run.final_sync_s  # the final sync, then the destroy
                    at(t + busy, "finish", run.iid)
                    run.done = True
                    active.remove(run)
            while pending and len(active) < case.parallel and not case.over:
                run = pending.pop(0)
                active.append(run)
                at(t + busy, "create", run)
                busy += case.boot_s + rng.uniform(*case.staging_s)  # boot wait + staging: nothing polled
            if active or (pending and not case.over):
                at(t + max(busy, case.poll_s), "exec")
        if case.over and billed_at_stop is None and not any(billing_compute(r) for r in rows()):
            billed_at_stop = cloud.billed()  # spend stopped: what is kept from here bills storage only
            break
    case.billed = cloud.billed() if billed_at_stop is None else billed_at_stop
    case.bound = case.cap_usd + case.poll_s / 3600.0 * case.fleet_max
    db.close()
    return case


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--json", action="store_true")
    a = ap.parse_args(argv)
    rng = random.Random(a.seed)
    cases = [simulate(make_case(rng, rng.randrange(1 << 30))) for _ in range(a.cases)]
    over = [c for c in cases if c.over]
    worst = max(cases, key=lambda c: c.ratio)
    overshoot = [(c.billed - c.cap_usd) / (c.poll_s / 3600.0 * c.fleet_max) for c in over if c.fleet_max > 0]
    summary = {"cases": len(cases), "cap_reached": len(over), "violations": sum(c.billed > c.bound for c in cases),
               "worst_ratio_billed_to_bound": round(worst.ratio, 6), "worst_case_seed": worst.seed,
               "worst_overshoot_in_poll_intervals": round(max(overshoot, default=0.0), 4),
               "instances_launched": sum(c.launched for c in cases),
               "instances_stopped_at_deadline": sum(c.kept for c in cases)}
    if a.json:
        print(json.dumps(summary))
    else:
        for k, v in summary.items():
            print(f"{k:36} {v}")
    return 1 if summary["violations"] else 0


if __name__ == "__main__":
    sys.exit(main())
