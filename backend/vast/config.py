"""Settings of the Vast lane: ``configs/vast.toml`` (where and how to launch, SSH, sync, idle)
and ``configs/budget.toml`` (cap, warn level, poll interval), plus the API key and the
lane's state directory.

The API key comes from ``VAST_API_KEY`` or vastai's own key file, exactly as the SDK finds
it. It is held in memory only: never written to state.db, logs, artifacts or a command line.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Any

from pydantic import ConfigDict, Field, ValidationInfo, field_validator, model_validator

from models.errors import NkoOpsError
from models.tomlfile import read_toml
from models.validation import ConfigModel, validate

DEFAULT_QUERY = ("num_gpus=1 gpu_ram>=24 reliability>0.98 inet_down>200 disk_space>=60 "
                 "cuda_max_good>=12.1 rented=False")


class VastConfigError(NkoOpsError, ValueError):
    pass


class _Settings(ConfigModel):
    """A settings table: strict types, finite numbers. Read from a file, a problem is a
    VastConfigError naming the file and field; built in code, pydantic's ValidationError."""

    model_config = ConfigDict(allow_inf_nan=False)


def _positive(v: float) -> float:
    if not v > 0:
        raise ValueError("must be positive")
    return v


def _not_negative(v: float) -> float:
    if v < 0:
        raise ValueError("must not be negative")
    return v


class IdleSettings(_Settings):
    """Idle = GPU utilisation below ``gpu_util_below`` (percent) for ``window_s`` AND no
    trainer heartbeat for ``heartbeat_timeout_s``."""

    gpu_util_below: float = 5.0
    window_s: float = 900.0
    heartbeat_timeout_s: float = 600.0

    @field_validator("gpu_util_below")
    @classmethod
    def _percent(cls, v: float) -> float:
        if not 0 <= v <= 100:
            raise ValueError("must be between 0 and 100")
        return v

    _not_negative = field_validator("window_s", "heartbeat_timeout_s")(_not_negative)


class MirrorSettings(_Settings):
    """A second SSH remote that receives a copy of every verified artifact."""

    host: str
    path: str
    port: int = 22
    user: str = "root"
    key: str = "~/.ssh/id_ed25519"

    @field_validator("port")
    @classmethod
    def _port(cls, v: int) -> int:
        if not 0 < v < 65536:
            raise ValueError("must be a TCP port (1-65535)")
        return v


class VastSettings(_Settings):
    server_url: str | None = None  # None: the SDK's default (VAST_URL or https://console.vast.ai)
    query: str = DEFAULT_QUERY
    order: str = "dph_total"
    image: str = "pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime"
    disk_gb: float = 60.0
    remote_base: str = "/workspace/nko-ops"
    remote_python: str = "python3"
    remote_env: dict[str, str] = {}
    ssh_user: str = "root"
    ssh_key: str = "~/.ssh/id_ed25519"
    ssh_timeout_s: float = 20.0
    boot_timeout_s: float = 900.0
    heartbeat_s: float = 15.0
    sync_every_s: float = 300.0
    max_recoveries: int = 2
    stop_wait_s: float = 60.0  # before a destroy: how long a trainer gets to exit after SIGTERM
    idle: IdleSettings = IdleSettings()
    mirror: MirrorSettings | None = None
    state_dir: Annotated[Path, Field(strict=False)] = Path(".nko-ops")

    _positive = field_validator("disk_gb", "ssh_timeout_s", "boot_timeout_s", "heartbeat_s", "sync_every_s",
                                "stop_wait_s")(_positive)
    _not_negative = field_validator("max_recoveries")(_not_negative)

    @property
    def known_hosts(self) -> Path:
        return self.state_dir / "vast" / "known_hosts"

    @property
    def cas_dir(self) -> Path:
        return self.state_dir / "vast" / "cas"

    @property
    def dist_dir(self) -> Path:
        return self.state_dir / "vast" / "dist"


class _BudgetTable(_Settings):
    """The ``[budget]`` table of a budget file."""

    cap_usd: float = 100.0
    warn_usd: float | None = None  # None: 80% of the cap
    poll_interval_s: float = 60.0
    name: str = "default"

    _positive = field_validator("cap_usd", "poll_interval_s")(_positive)

    @field_validator("warn_usd")
    @classmethod
    def _warn(cls, v: float | None, info: ValidationInfo) -> float | None:
        cap = info.data.get("cap_usd")
        if v is not None and cap is not None and not 0 <= v <= cap:
            raise ValueError(f"must be between 0 and cap_usd ({cap:g})")
        return v

    @model_validator(mode="after")
    def _default_warn(self) -> "_BudgetTable":
        if self.warn_usd is None:
            self.warn_usd = 0.8 * self.cap_usd
        return self


class BudgetSettings(_BudgetTable):
    source: str = ""  # the file it came from (not a key of the file)


class _BudgetFile(ConfigModel):
    budget: _BudgetTable


def load_settings(path: str | Path | None = "configs/vast.toml", state_dir: str | Path | None = None,
                  **overrides: Any) -> VastSettings:
    """Settings from ``path`` (absent file: defaults), then ``overrides``. The state dir
    defaults to ``.nko-ops`` next to the state store (callers pass the db's directory)."""
    data: dict = {}
    if path is not None and Path(path).exists():
        data = read_toml(path, VastConfigError, "Vast config")
    s = validate(VastSettings, data, str(path), VastConfigError)
    for k, v in overrides.items():
        if v is not None:
            setattr(s, k, v)
    if state_dir is not None:
        s.state_dir = Path(state_dir)
    s.state_dir = Path(s.state_dir)
    return s


def load_budget(path: str | Path = "configs/budget.toml") -> BudgetSettings:
    """The budget from ``path``, strictly: the file must exist and hold exactly one
    ``[budget]`` table with a finite positive ``cap_usd`` (and optionally ``warn_usd``,
    default 80% of the cap, ``poll_interval_s`` and ``name``); anything else is an error
    naming the file, never a silent default cap."""
    if path is None:
        raise VastConfigError("no budget file given: the Vast lane needs a cap (configs/budget.toml)")
    if not Path(path).exists():
        raise VastConfigError(f"{path}: budget file not found; the Vast lane spends money only under a cap "
                              "(a [budget] table with cap_usd)")
    data = read_toml(path, VastConfigError, "budget file")
    if isinstance(data.get("budget"), dict) and "cap_usd" not in data["budget"]:  # no silent default cap
        raise VastConfigError(f"{path}: field 'budget.cap_usd': required (the most this budget may spend, USD)")
    table = validate(_BudgetFile, data, str(path), VastConfigError).budget
    return BudgetSettings(**table.model_dump(), source=str(path))


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
