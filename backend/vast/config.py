"""Settings of the Vast lane: ``configs/vast.toml`` (where and how to launch, SSH, sync, idle)
and ``configs/budget.toml`` (cap, warn level, poll interval), plus the API key and the
lane's state directory.

The API key comes from ``VAST_API_KEY`` or vastai's own key file, exactly as the SDK finds
it. It is held in memory only: never written to state.db, logs, artifacts or a command line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from models.tomlfile import read_toml

DEFAULT_QUERY = ("num_gpus=1 gpu_ram>=24 reliability>0.98 inet_down>200 disk_space>=60 "
                 "cuda_max_good>=12.1 rented=False")


class VastConfigError(ValueError):
    pass


@dataclass
class IdleSettings:
    """Idle = GPU utilisation below ``gpu_util_below`` (percent) for ``window_s`` AND no
    trainer heartbeat for ``heartbeat_timeout_s``."""

    gpu_util_below: float = 5.0
    window_s: float = 900.0
    heartbeat_timeout_s: float = 600.0


@dataclass
class MirrorSettings:
    """A second SSH remote that receives a copy of every verified artifact."""

    host: str
    path: str
    port: int = 22
    user: str = "root"
    key: str = "~/.ssh/id_ed25519"


@dataclass
class VastSettings:
    server_url: str | None = None  # None: the SDK's default (VAST_URL or https://console.vast.ai)
    query: str = DEFAULT_QUERY
    order: str = "dph_total"
    image: str = "pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime"
    disk_gb: float = 60.0
    remote_base: str = "/workspace/nko-ops"
    remote_python: str = "python3"
    remote_env: dict[str, str] = field(default_factory=dict)
    ssh_user: str = "root"
    ssh_key: str = "~/.ssh/id_ed25519"
    ssh_timeout_s: float = 20.0
    boot_timeout_s: float = 900.0
    heartbeat_s: float = 15.0
    sync_every_s: float = 300.0
    max_recoveries: int = 2
    idle: IdleSettings = field(default_factory=IdleSettings)
    mirror: MirrorSettings | None = None
    state_dir: Path = Path(".nko-ops")

    @property
    def known_hosts(self) -> Path:
        return self.state_dir / "vast" / "known_hosts"

    @property
    def cas_dir(self) -> Path:
        return self.state_dir / "vast" / "cas"

    @property
    def dist_dir(self) -> Path:
        return self.state_dir / "vast" / "dist"


@dataclass
class BudgetSettings:
    cap_usd: float = 100.0
    warn_usd: float = 80.0
    poll_interval_s: float = 60.0
    name: str = "default"
    source: str = ""

    def __post_init__(self) -> None:
        if self.cap_usd <= 0:
            raise VastConfigError(f"budget: field 'cap_usd' must be positive (got {self.cap_usd})")
        if not 0 <= self.warn_usd <= self.cap_usd:
            raise VastConfigError(f"budget: field 'warn_usd' must be between 0 and cap_usd (got {self.warn_usd})")
        if self.poll_interval_s <= 0:
            raise VastConfigError(f"budget: field 'poll_interval_s' must be positive (got {self.poll_interval_s})")


def _build(cls, data: dict, where: str):
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise VastConfigError(f"{where}: unknown field(s) {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    try:
        return cls(**data)
    except TypeError as e:
        raise VastConfigError(f"{where}: {e}") from None


def load_settings(path: str | Path | None = "configs/vast.toml", state_dir: str | Path | None = None,
                  **overrides: Any) -> VastSettings:
    """Settings from ``path`` (absent file: defaults), then ``overrides``. The state dir
    defaults to ``.nko-ops`` next to the state store (callers pass the db's directory)."""
    data: dict = {}
    if path is not None and Path(path).exists():
        data = read_toml(path, VastConfigError, "Vast config")
    idle = _build(IdleSettings, data.pop("idle", {}), f"{path} [idle]")
    mirror = data.pop("mirror", None)
    mirror = _build(MirrorSettings, mirror, f"{path} [mirror]") if mirror else None
    s = _build(VastSettings, {**data, "idle": idle, "mirror": mirror}, str(path))
    for k, v in overrides.items():
        if v is not None:
            setattr(s, k, v)
    if state_dir is not None:
        s.state_dir = Path(state_dir)
    s.state_dir = Path(s.state_dir)
    return s


def load_budget(path: str | Path | None = "configs/budget.toml") -> BudgetSettings:
    if path is None or not Path(path).exists():
        return BudgetSettings(source="defaults")
    data = read_toml(path, VastConfigError, "Vast config")
    return _build(BudgetSettings, {**data.get("budget", {}), "source": str(path)}, f"{path} [budget]")


def state_dir_for(db_path: str | Path) -> Path:
    """The project's state directory: ``.nko-ops`` beside the state store."""
    return Path(db_path).resolve().parent / ".nko-ops"


def api_key() -> str:
    """The Vast API key, resolved the way the SDK does (``VAST_API_KEY``, then vastai's key
    file). Raises VastConfigError naming both places when neither has one."""
    from vastai._base import _APIKEY_SENTINEL, _resolve_api_key

    try:
        key = _resolve_api_key(_APIKEY_SENTINEL)
    except RuntimeError:
        raise VastConfigError("no Vast API key: set VAST_API_KEY or save it with `vastai set api-key` "
                              "(~/.config/vastai/vast_api_key)") from None
    if not key:
        raise VastConfigError("the Vast API key is empty (VAST_API_KEY or ~/.config/vastai/vast_api_key)")
    return key


def expand(path: str) -> str:
    return os.path.expanduser(path)
