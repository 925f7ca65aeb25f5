"""Fixtures shared by the three kinds of test (unit/, functional/, e2e/).

* ``clock``: a fake clock for code that takes one (``Fleet(clock=...)``, the console's
  ``clock=``): it starts at the real time (so heartbeats and start times written with the
  real clock compare with it) and only moves when a test calls ``advance``; idle windows and
  heartbeat staleness are crossed by advancing it, not by sleeping.
* ``agp_home`` (autouse): every test gets its own ``NKO_OPS_HOME``, so the AGP witness key
  lives outside the repository.
* ``sshd`` (one per session), ``own_sshd`` (one per test, for tests that restart it) and
  ``vast_env``: a real OpenSSH sshd on 127.0.0.1 and the Vast API emulator whose instances
  map to it, driven through the real ``vastai`` SDK. Used by the console's functional tests
  (tests/functional/test_console_ops.py) and the end-to-end Vast tests (tests/e2e/).

Plain builders stay in the ``*_helpers.py`` modules next to this file (imported normally;
this conftest puts tests/ on sys.path, pytest's default "prepend" import mode)."""

from __future__ import annotations

import secrets
import sys
import time

import pytest

from vast_helpers import VastEnv, _start_sshd


class FakeClock:
    """A wall clock (Unix seconds) that moves only when told to."""

    def __init__(self, start: float) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> float:
        self.now += seconds
        return self.now


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(time.time())


@pytest.fixture(autouse=True)
def agp_home(tmp_path_factory, monkeypatch):
    """Every test gets its own NKO_OPS_HOME, so the witness key lives outside the repo."""
    home = tmp_path_factory.mktemp("nko_ops_home")
    monkeypatch.setenv("NKO_OPS_HOME", str(home))
    return home


@pytest.fixture(scope="session")
def sshd(tmp_path_factory):
    d = _start_sshd(tmp_path_factory.mktemp("sshd"))
    yield d
    d.stop()


@pytest.fixture
def own_sshd(tmp_path):
    """A private sshd (for tests that restart it with another host key)."""
    d = _start_sshd(tmp_path / "sshd")
    yield d
    d.stop()


@pytest.fixture
def vast_env(sshd, tmp_path, monkeypatch):
    from state.store import open_db
    from backend.vast.config import BudgetSettings, IdleSettings, VastSettings
    from backend.vast.emulator import Cloud, Emulator
    from backend.vast.fleet import Fleet
    from backend.vast.provider import VastProvider

    key = "vk_" + secrets.token_hex(20)
    monkeypatch.setenv("VAST_API_KEY", key)
    monkeypatch.setenv("VASTAI_NO_UPDATE_CHECK", "1")
    remote_base = tmp_path / "remote"
    cloud = Cloud(api_key=key, ssh_host="127.0.0.1", ssh_port=sshd.port, workspace_base=remote_base)
    emu = Emulator(cloud).start()
    settings = VastSettings(server_url=emu.url, query="num_gpus=1 reliability>0.98", remote_base=str(remote_base),
                            remote_python=sys.executable, remote_env={"OMP_NUM_THREADS": "1"},
                            ssh_key=str(sshd.client_key), state_dir=tmp_path / "state" / ".nko-ops",
                            heartbeat_s=0.5, sync_every_s=3.0, boot_timeout_s=30.0, ssh_timeout_s=10.0,
                            idle=IdleSettings(gpu_util_below=5.0, window_s=0.3, heartbeat_timeout_s=2.0))
    budget = BudgetSettings(cap_usd=50.0, warn_usd=40.0, poll_interval_s=1.0, source="test")
    provider = VastProvider(key, emu.url, backoff_s=0.05)
    db = open_db(tmp_path / "state" / "state.db")
    logs: list[str] = []
    fleet = Fleet(db, settings, budget, provider, log=logs.append)
    env = VastEnv(tmp_path, cloud, emu, settings, budget, provider, db, fleet, key, remote_base, logs)
    yield env
    fleet.close()
    for iid in list(cloud.instances):
        cloud.vanish(iid)  # kill anything still working in an instance's disk
    emu.stop()
    db.close()
