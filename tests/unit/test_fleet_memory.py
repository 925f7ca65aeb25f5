"""Fleet, cost ledger, idle rule and budget policy on the in-memory provider
(backend/memory_provider.py), with an injected clock: no emulator, no SSH, no sleeps. The
emulator and sshd stay for the end-to-end tests (test_vast*.py)."""

from __future__ import annotations

import time

import pytest

from backend.memory_provider import MemoryProvider
from backend.provider import InstanceStatus, Offer, ProviderError
from backend.vast.config import BudgetSettings, IdleSettings, VastSettings
from backend.vast.cost import ts
from backend.vast.fleet import Fleet
from state import fleet as fleet_state
from state import store

HOUR = 3600.0
OFFERS = [Offer(1, 11, "RTX 4090", 1, 0.40, 0.99, 800.0, 200.0), Offer(2, 12, "RTX 4090", 1, 0.30, 0.95, 500.0, 200.0),
          Offer(3, 13, "A100 PCIE", 1, 1.20, 0.995, 900.0, 400.0)]


class Clock:
    def __init__(self, t: float | None = None):
        self.t = time.time() if t is None else t

    def __call__(self) -> float:
        return self.t

    def advance(self, s: float) -> None:
        self.t += s


@pytest.fixture
def env(tmp_path):
    clock = Clock()
    provider = MemoryProvider(OFFERS, clock=clock, boot_s=30.0, storage_usd_per_gb_month=0.072)  # 0.0001 $/GB/h
    settings = VastSettings(state_dir=tmp_path / ".nko-ops",
                            idle=IdleSettings(gpu_util_below=5.0, window_s=900.0, heartbeat_timeout_s=600.0))
    budget = BudgetSettings(cap_usd=10.0, warn_usd=8.0, poll_interval_s=60.0, source="test")
    db = store.open_db(tmp_path / "state.db")
    fleet = Fleet(db, settings, budget, provider, clock=clock, log=lambda s: None)
    yield fleet, provider, clock
    fleet.close()
    db.close()


def _rent(fleet: Fleet, provider: MemoryProvider, clock: Clock, offer_id: int, run_id: str | None) -> str:
    offer = next(o for o in OFFERS if o.id == offer_id)
    iid = provider.create(offer.id, "img", 100.0, label=run_id or "by hand")
    if run_id is not None:
        fleet.register(iid, run_id, run_id, offer)
    return iid


def test_offers_follow_the_query_and_the_order():
    p = MemoryProvider(OFFERS)
    assert [o.id for o in p.offers("gpu_name=RTX_4090")] == [2, 1]
    assert [o.id for o in p.offers("reliability>0.98", order="-dph_total")] == [3, 1]
    assert p.offers("num_gpus>=2") == []
    with pytest.raises(ProviderError, match="unknown field 'colour'"):
        p.offers("colour=red")


def test_an_instance_boots_then_runs_and_stop_keeps_only_its_disk_billing(env):
    fleet, p, clock = env
    iid = _rent(fleet, p, clock, 1, "run-a")
    inst = p.instance(iid)
    assert inst.status == InstanceStatus.LOADING and inst.billing_compute and inst.ssh is None
    assert inst.rate == pytest.approx(0.40 + 0.01)  # the offer plus 100 GB of disk
    clock.advance(30)
    assert p.instance(iid).running
    p.stop(iid)
    stopped = p.instance(iid)
    assert stopped.status == InstanceStatus.STOPPED and not stopped.billing_compute
    assert stopped.rate == pytest.approx(0.01)


def test_the_ledger_charges_each_poll_interval_at_the_higher_rate_and_records_samples(env):
    fleet, p, clock = env
    iid = _rent(fleet, p, clock, 1, "run-a")
    fleet.poll()
    clock.advance(HOUR)
    _, state = fleet.poll()
    assert state.spent_usd == pytest.approx(0.41, rel=1e-6)  # one hour at offer + disk
    p.stop(iid)
    clock.advance(HOUR)  # stopped somewhere in this hour: charged at the higher (running) rate
    _, state = fleet.poll()
    assert state.spent_usd == pytest.approx(0.82, rel=1e-6)
    clock.advance(HOUR)
    _, state = fleet.poll()
    assert state.spent_usd == pytest.approx(0.83, rel=1e-6)  # disk only now
    samples = fleet_state.cost_samples(fleet.db, iid)
    assert [round(s.total_usd, 6) for s in samples] == [0.41, 0.82, 0.83] and {s.run_id for s in samples} == {"run-a"}
    assert fleet.ledger.run_spend("run-a") == pytest.approx(0.83, rel=1e-6)


def test_an_instance_that_vanishes_is_charged_to_the_poll_that_notices_and_recorded_gone(env):
    fleet, p, clock = env
    iid = _rent(fleet, p, clock, 2, "run-b")
    clock.advance(30)
    fleet.poll()
    clock.advance(HOUR / 2)
    p.lose(iid)
    _, state = fleet.poll()
    rec = fleet_state.instance(fleet.db, iid)
    assert rec.actual_status == "gone" and rec.destroyed_at is not None and rec.data["gone"] == "vanished"
    assert state.spent_usd == pytest.approx(0.31 * (30 + HOUR / 2) / HOUR, rel=1e-6)
    assert fleet.db.execute("SELECT count(*) FROM events WHERE kind = 'instance-lost'").fetchone()[0] == 1


def test_a_launch_that_would_reach_the_cap_before_the_next_poll_is_refused(env):
    fleet, p, clock = env
    _rent(fleet, p, clock, 3, "run-c")
    rows, _ = fleet.poll()
    ok, _ = fleet.ledger.can_launch(rows, 1.0)
    assert ok
    fleet.ledger.budget = BudgetSettings(cap_usd=0.02, warn_usd=0.0, poll_interval_s=60.0)
    ok, why = fleet.ledger.can_launch(rows, 1.0)
    assert not ok and "would reach the $0.02 cap before the next poll" in why


def test_idle_needs_low_gpu_for_the_whole_window_and_no_heartbeat(env):
    fleet, p, clock = env
    iid = _rent(fleet, p, clock, 1, "run-i")
    clock.advance(30)
    p.set_gpu_util(iid, 90.0)
    assert fleet.idle_rows() == []
    p.set_gpu_util(iid, 1.0)
    fleet.poll()  # low from now
    clock.advance(600)
    assert fleet.idle_rows() == []  # low for 600 s only
    clock.advance(400)
    store.upsert_run(fleet.db, "run-i", instance_id=iid, heartbeat_at=ts(clock() - 10))
    assert fleet.idle_rows() == []  # low long enough, but the trainer's heartbeat is fresh
    store.upsert_run(fleet.db, "run-i", heartbeat_at="2000-01-01T00:00:00.000Z")
    ((inst, verdict),) = fleet.idle_rows()
    assert inst.id == iid and verdict.idle and "for 1000 s" in verdict.reason


def test_kill_idle_refuses_an_instance_whose_files_are_not_verified_locally(env):
    """The destroy rule holds whatever the provider: files state.db knows on the instance and
    not verified locally are named, nothing is destroyed, and --force needs the id typed again."""
    fleet, p, clock = env
    iid = _rent(fleet, p, clock, 1, "run-k")
    other = _rent(fleet, p, clock, 2, "run-o")
    fleet.mark_trainer(iid, "run-k")
    store.record_artifacts(fleet.db, "run-k", [
        {"name": "last.pt", "sha256": "a" * 64, "size": 10, "sync_state": "remote-only",
         "locations": [{"kind": "instance", "instance_id": iid, "path": "/w/runs/run-k/last.pt"}]},
        {"name": "best.pt", "sha256": "b" * 64, "size": 10, "sync_state": "verified",
         "locations": [{"kind": "instance", "instance_id": iid, "path": "/w/runs/run-k/best.pt"}]}])
    clock.advance(30)
    fleet.poll()
    clock.advance(1000)
    outcomes = fleet.kill_idle()
    by_id = {o.instance_id: o for o in outcomes}
    refused = by_id[iid]
    assert not refused.destroyed and "cannot reach the instance to verify its files" in refused.reason
    assert refused.would_lose == ["run-k/last.pt"]
    assert p.instance(iid) is not None and iid not in p.destroyed
    # ours, no trainer ever started, but its runs directory cannot be listed either: refused too
    assert not by_id[other].destroyed and by_id[other].would_lose == [] and p.instance(other) is not None

    o = fleet.kill_idle(force_ids={iid: "wrong"})
    assert not o[0].destroyed and "typed again" in o[0].reason
    o = fleet.kill_idle(force_ids={iid: iid})
    assert o[0].destroyed and o[0].forced and o[0].would_lose == ["run-k/last.pt"]
    assert fleet_state.artifact(fleet.db, "run-k", "last.pt")["sync_state"] == "missing"
    assert fleet_state.artifact(fleet.db, "run-k", "best.pt")["sync_state"] == "verified"


def test_over_the_cap_an_orphan_is_stopped_not_destroyed(env):
    fleet, p, clock = env
    orphan = _rent(fleet, p, clock, 3, None)
    clock.advance(30)
    fleet.ledger.budget = BudgetSettings(cap_usd=0.01, warn_usd=0.0, poll_interval_s=60.0)
    fleet.poll()
    assert p.instance(orphan).status == InstanceStatus.STOPPED and orphan not in p.destroyed
    assert [iid for iid, _ in fleet.over_cap_plan(p.instances())] == [orphan]
    assert fleet.sweep()[0].id == orphan


def test_a_provider_failure_while_destroying_keeps_the_instance_and_says_so(env):
    fleet, p, clock = env
    iid = _rent(fleet, p, clock, 1, "run-f")
    p.fail_next("destroy", ProviderError("HTTP 503 from DELETE /instances: busy", 503))
    o = fleet.discard(iid, "launch failed")
    assert not o.destroyed and "the provider refused the destroy" in o.reason and p.instance(iid) is not None
    assert fleet.discard(iid, "launch failed").destroyed


def test_the_budget_row_and_its_warning_are_recorded_once(env):
    fleet, p, clock = env
    _rent(fleet, p, clock, 3, "run-w")
    fleet.ledger.budget = BudgetSettings(cap_usd=100.0, warn_usd=0.5, poll_interval_s=60.0, name="default")
    fleet.poll()
    clock.advance(HOUR)
    fleet.poll()
    clock.advance(HOUR)
    fleet.poll()
    assert fleet_state.budget_alert_recorded(fleet.db, "budget-warn", "default")
    assert not fleet_state.budget_alert_recorded(fleet.db, "budget-warn", "other")
    assert fleet.db.execute("SELECT count(*) FROM events WHERE kind = 'budget-warn'").fetchone()[0] == 1


def test_the_budget_guard_stops_spend_on_its_own_tick(env, tmp_path):
    """Over the cap, one guard tick stops every instance billing compute: ours are synced and
    destroyed when nothing would be lost, else (here: no SSH to verify their files) stopped;
    an orphan is only stopped. Under the cap nothing is touched."""
    from backend.vast.guard import BudgetGuard

    fleet, p, clock = env
    ours = _rent(fleet, p, clock, 1, "run-g")
    orphan = _rent(fleet, p, clock, 2, None)
    clock.advance(30)
    guard = BudgetGuard(str(tmp_path / "state.db"), fleet.settings, BudgetSettings(cap_usd=5.0, warn_usd=0.0,
                        poll_interval_s=60.0), p, log=lambda s: None, clock=clock)
    try:
        state = guard.tick()
        assert not state.over and not guard.over.is_set() and p.stopped == []
        clock.advance(10 * HOUR)  # 0.71 $/h for 10 h: over the $5 cap
        state = guard.tick()
        assert state.over and guard.over.is_set()
        assert sorted(p.stopped) == sorted([ours, orphan]) and p.destroyed == []
        assert all(i.status == InstanceStatus.STOPPED for i in p.instances())
    finally:
        guard.stop()
