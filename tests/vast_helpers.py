"""Helpers for the Vast lane tests, whose fixtures (tests/conftest.py) are a real OpenSSH sshd
on 127.0.0.1 (its own host and client keys under a temp dir, running as the current user)
and the Vast API emulator whose instances map to it, driven through the real ``vastai`` SDK.

The "remote" side of every instance is this machine: each instance's disk is
``<tmp>/remote/<instance id>`` and its trainer runs with this checkout's .venv Python.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from backend.localssh import SSHD, LocalSSHError, free_port, new_sshd  # noqa: F401 (free_port: re-exported to tests)


def _skip(reason: str) -> None:
    """Skip on a developer machine without OpenSSH; under CI (which installs it) that is a failure."""
    if os.environ.get("CI"):
        pytest.fail(f"{reason} (CI installs openssh-server through bootstrap.sh)")
    pytest.skip(reason)


def _start_sshd(root: Path) -> SSHD:
    try:
        return new_sshd(root).start()
    except LocalSSHError as e:  # no OpenSSH here, or it cannot start
        _skip(str(e))


@dataclass
class VastEnv:
    tmp: Path
    cloud: object
    emulator: object
    settings: object
    budget: object
    provider: object
    db: object
    fleet: object
    api_key: str
    remote_base: Path
    logs: list

    def fresh_fleet(self, clock=None, **budget):
        """Another Fleet on the same state.db (as after an executor restart)."""
        from backend.vast.config import BudgetSettings
        from backend.vast.fleet import Fleet

        b = BudgetSettings(**{**vars(self.budget), **budget}) if budget else self.budget
        return Fleet(self.db, self.settings, b, self.provider, clock=clock or time.time, log=self.logs.append)

    def vast_run(self, fleet, run_id: str):
        """A VastRun for a real tiny run config (train_helpers.build), driven by ``fleet``."""
        from train_helpers import build

        from backend.vast.executor import SingleRun, VastRun

        cfg = build(self.tmp / "data", n=40)
        cfg.update(run_id=run_id, out_dir=str(self.tmp / "runs" / run_id))
        job = SingleRun.job(cfg)
        # the wheel is only uploaded once an instance runs with SSH; these tests stop before
        return VastRun(fleet, job, SingleRun(cfg), None, self.tmp / "no-wheel.whl", self.logs.append)

    def instance_dir(self, iid) -> Path:
        return self.remote_base / str(iid)

    def new_instance(self, label: str = "run-x", run_id: str | None = "run-x") -> dict:
        """Create an instance through the SDK, register it and wait until it runs."""
        offer = self.provider.offers("num_gpus=1", "dph_total", limit=50, storage_gb=self.settings.disk_gb)
        used = {r.machine_id for r in self.provider.instances()}
        offer = next(o for o in offer if o.machine_id not in used)
        iid = self.provider.create(offer.id, "pytorch/pytorch", self.settings.disk_gb, label=label)
        if run_id is not None:
            self.fleet.register(iid, run_id, label, offer)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            row = self.provider.instance(iid)
            if row and row.status == "running":
                return row
            time.sleep(0.05)
        raise AssertionError("instance did not start")


def write_remote(env: VastEnv, iid, rel: str, data: bytes) -> Path:
    p = env.instance_dir(iid) / "runs" / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_bytes(data)
    return p


def tree_contains(root: Path, needle: bytes) -> list[Path]:
    """Files under ``root`` whose bytes contain ``needle``."""
    hits = []
    for p in Path(root).rglob("*"):
        if p.is_file() and not p.is_symlink():
            try:
                if needle in p.read_bytes():
                    hits.append(p)
            except OSError:
                continue
    return hits




def write_user_configs(env, folder: Path, extra: str = "", budget: str = "cap_usd = 50.0\nwarn_usd = 40.0\n"
                       "poll_interval_s = 5.0") -> tuple[Path, Path]:
    """configs/vast.toml (for the emulator and this sshd, plus ``extra`` TOML lines) and
    configs/budget.toml (its ``[budget]`` body), as a user writes them, under ``folder``."""
    s = env.settings
    settings = folder / "vast.toml"
    settings.write_text("\n".join([
        f'server_url = "{s.server_url}"', f'query = "{s.query}"', f'remote_base = "{s.remote_base}"',
        f'remote_python = "{s.remote_python}"', f'ssh_key = "{s.ssh_key}"', extra, ""]))
    budget_path = folder / "budget.toml"
    budget_path.write_text(f"[budget]\n{budget}\n")
    return settings, budget_path
