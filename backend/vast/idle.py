"""Idle instances: GPU utilisation below a threshold for a whole window AND no trainer
heartbeat for a while (``[idle]`` in configs/vast.toml). Either signal alone is not enough:
a trainer decoding on the CPU has a low GPU load but a heartbeat; a hung trainer may hold
the GPU busy without a heartbeat.

The low-utilisation start is kept in the instance's ``data`` JSON (``low_util_since``), updated
at every poll of the instance list. That only starts when this tool looks, so an instance on
which a trainer ran also brings its own evidence (``Fleet.idle_rows`` reads it over SSH): the
last time a trainer was seen active there (its runner's start, last heartbeat or exit). While
its GPU is low now, it counts as low since then if that is earlier: a kill-idle run for the
first time hours after a trainer exited sees those hours.
"""

from __future__ import annotations

from dataclasses import dataclass

from backend.provider import Instance
from backend.vast.config import IdleSettings
from state import fleet as fleet_state
from state import store


@dataclass
class IdleVerdict:
    instance_id: str
    idle: bool
    reason: str


def track(db, rows: list[Instance], settings: IdleSettings, now: float) -> None:
    """Update each live instance's ``low_util_since`` from one poll."""
    with store.transaction(db):
        for r in rows:
            iid = r.id
            old = fleet_state.instance(db, iid)
            if old is None:
                continue
            data = old.data
            low = r.gpu_util is None or r.gpu_util < settings.gpu_util_below
            if low and r.running:
                data.setdefault("low_util_since", now)
                if data["low_util_since"] is None:
                    data["low_util_since"] = now
            else:
                data["low_util_since"] = None
            fleet_state.set_instance_data(db, iid, data, touch=False)


def last_heartbeat(db, iid: str) -> float | None:
    """Unix time of the newest trainer heartbeat of any run on the instance."""
    beat = fleet_state.last_heartbeat(db, iid)
    return store.parse_ts(beat).timestamp() if beat else None


def verdict(db, iid: str, settings: IdleSettings, now: float, remote_heartbeat: float | None = None,
            trainer_last_seen: float | None = None) -> IdleVerdict:
    """``remote_heartbeat``: the newest heartbeat of a live trainer on the instance;
    ``trainer_last_seen``: when a trainer was last active there (module docstring)."""
    rec = fleet_state.instance(db, iid)
    if rec is None:
        return IdleVerdict(iid, False, "unknown to the state store")
    since = rec.data.get("low_util_since")
    if since is None:
        return IdleVerdict(iid, False, "GPU busy" if rec.actual_status == "running" else
                           f"not running ({rec.actual_status})")
    counted = ""
    if trainer_last_seen is not None and trainer_last_seen < since:
        since, counted = trainer_last_seen, " (counted from its trainer's last activity, per the instance)"
    low_for = now - since
    if low_for < settings.window_s:
        return IdleVerdict(iid, False, f"GPU low for {low_for:.0f} s only (window {settings.window_s:.0f} s)")
    beats = [b for b in (last_heartbeat(db, iid), remote_heartbeat) if b is not None]
    if beats and now - max(beats) < settings.heartbeat_timeout_s:
        return IdleVerdict(iid, False, f"GPU low for {low_for:.0f} s but the trainer's heartbeat is "
                                       f"{now - max(beats):.0f} s old")
    beat = f"last heartbeat {now - max(beats):.0f} s ago" if beats else "no heartbeat"
    return IdleVerdict(iid, True, f"GPU below {settings.gpu_util_below:g}% for {low_for:.0f} s{counted} and {beat}")

