"""Settings of the Vast lane: ``configs/vast.toml`` (where and how to launch, SSH, sync, idle)
and ``configs/budget.toml`` (cap, warn level, poll interval), plus the API key and the
lane's state directory.

The API key comes from ``VAST_API_KEY`` or vastai's own key file, exactly as the SDK finds
it. It is held in memory only: never written to state.db, logs, artifacts or a command line.
"""

from __future__ import annotations

import math
import os
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar, get_type_hints

from models.errors import NkoOpsError
from models.tomlfile import read_toml

DEFAULT_QUERY = ("num_gpus=1 gpu_ram>=24 reliability>0.98 inet_down>200 disk_space>=60 "
                 "cuda_max_good>=12.1 rented=False")


class VastConfigError(NkoOpsError, ValueError):
    pass


@dataclass
class IdleSettings:
    """Idle = GPU utilisation below ``gpu_util_below`` (percent) for ``window_s`` AND no
    trainer heartbeat for ``heartbeat_timeout_s``."""

    gpu_util_below: float = 5.0
    window_s: float = 900.0
    heartbeat_timeout_s: float = 600.0
    section: ClassVar[str] = "idle."

    def __post_init__(self) -> None:
        _check(self, "gpu_util_below", 0 <= self.gpu_util_below <= 100, "must be between 0 and 100")
        _check(self, "window_s", self.window_s >= 0, "must not be negative")
        _check(self, "heartbeat_timeout_s", self.heartbeat_timeout_s >= 0, "must not be negative")


@dataclass
class MirrorSettings:
    """A second SSH remote that receives a copy of every verified artifact."""

    host: str
    path: str
    port: int = 22
    user: str = "root"
    key: str = "~/.ssh/id_ed25519"
    section: ClassVar[str] = "mirror."

    def __post_init__(self) -> None:
        _check(self, "port", 0 < self.port < 65536, "must be a TCP port (1-65535)")


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
    stop_wait_s: float = 60.0  # before a destroy: how long a trainer gets to exit after SIGTERM
    idle: IdleSettings = field(default_factory=IdleSettings)
    mirror: MirrorSettings | None = None
    state_dir: Path = Path(".nko-ops")
    section: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for name in ("disk_gb", "ssh_timeout_s", "boot_timeout_s", "heartbeat_s", "sync_every_s", "stop_wait_s"):
            _check(self, name, getattr(self, name) > 0, "must be positive")
        _check(self, "max_recoveries", self.max_recoveries >= 0, "must not be negative")

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
    warn_usd: float | None = None  # None: 80% of the cap
    poll_interval_s: float = 60.0
    name: str = "default"
    source: str = ""
    section: ClassVar[str] = "budget."

    def __post_init__(self) -> None:
        for name in ("cap_usd", "warn_usd", "poll_interval_s"):
            v = getattr(self, name)
            _check(self, name, v is None or (isinstance(v, (int, float)) and not isinstance(v, bool)
                                             and math.isfinite(v)), "must be a finite number")
        _check(self, "cap_usd", self.cap_usd > 0, "must be positive")
        if self.warn_usd is None:
            self.warn_usd = 0.8 * self.cap_usd
        _check(self, "warn_usd", 0 <= self.warn_usd <= self.cap_usd, f"must be between 0 and cap_usd ({self.cap_usd})")
        _check(self, "poll_interval_s", self.poll_interval_s > 0, "must be positive")


def _check(obj, name: str, ok: bool, why: str) -> None:
    if not ok:
        raise VastConfigError(f"field '{obj.section}{name}': {why}, got {getattr(obj, name)!r}")


def _type_problem(kind: Any, value: Any) -> str | None:
    """Why ``value`` (as read from TOML) does not fit the annotation ``kind``; None if it does."""
    if kind in (float, float | None):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        if ok and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        return None if ok else f"must be a number, got {value!r}"
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else f"must be an integer, got {value!r}"
    if kind in (str, Path, str | None):
        return None if isinstance(value, str) else f"must be a string, got {value!r}"
    if kind == dict[str, str]:
        if not isinstance(value, dict):
            return f"must be a table of strings, got {value!r}"
        bad = next((k for k, v in value.items() if not isinstance(v, str)), None)
        return None if bad is None else f"must be a table of strings ({bad!r} is {value[bad]!r})"
    return None


def _build(cls, data: Any, where: str, section: str = ""):
    """``cls`` from one table of a settings file; every error names the file and the field."""
    if not isinstance(data, dict):
        raise VastConfigError(f"{where}: field '{section.rstrip('.')}': must be a table, got {data!r}")
    hints = get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise VastConfigError(f"{where}: unknown field(s) {', '.join(section + u for u in unknown)} "
                              f"(known: {', '.join(sorted(known))})")
    for f in fields(cls):
        if f.name not in data and f.default is MISSING and f.default_factory is MISSING:
            raise VastConfigError(f"{where}: field '{section}{f.name}': required")
    for name, value in data.items():
        why = _type_problem(hints[name], value)
        if why:
            raise VastConfigError(f"{where}: field '{section}{name}': {why}")
    try:
        return cls(**data)
    except VastConfigError as e:
        raise VastConfigError(f"{where}: {e}") from None


def load_settings(path: str | Path | None = "configs/vast.toml", state_dir: str | Path | None = None,
                  **overrides: Any) -> VastSettings:
    """Settings from ``path`` (absent file: defaults), then ``overrides``. The state dir
    defaults to ``.nko-ops`` next to the state store (callers pass the db's directory)."""
    data: dict = {}
    if path is not None and Path(path).exists():
        data = read_toml(path, VastConfigError, "Vast config")
    idle = _build(IdleSettings, data.pop("idle", {}), str(path), "idle.")
    mirror = data.pop("mirror", None)
    mirror = _build(MirrorSettings, mirror, str(path), "mirror.") if mirror is not None else None
    s = _build(VastSettings, {**data, "idle": idle, "mirror": mirror}, str(path))
    for k, v in overrides.items():
        if v is not None:
            setattr(s, k, v)
    if state_dir is not None:
        s.state_dir = Path(state_dir)
    s.state_dir = Path(s.state_dir)
    return s


BUDGET_FIELDS = ("cap_usd", "warn_usd", "poll_interval_s", "name")


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
    unknown = sorted(set(data) - {"budget"})
    if unknown:
        raise VastConfigError(f"{path}: unknown table(s) or key(s) {', '.join(unknown)} (only [budget])")
    if "budget" not in data:
        raise VastConfigError(f"{path}: no [budget] table (it must set cap_usd)")
    budget = data["budget"]
    if not isinstance(budget, dict):
        raise VastConfigError(f"{path}: field 'budget': must be a table, got {budget!r}")
    extra = sorted(set(budget) - set(BUDGET_FIELDS))
    if extra:
        raise VastConfigError(f"{path}: unknown field(s) {', '.join('budget.' + k for k in extra)} "
                              f"(known: {', '.join(BUDGET_FIELDS)})")
    if "cap_usd" not in budget:
        raise VastConfigError(f"{path}: field 'budget.cap_usd': required (the most this budget may spend, USD)")
    return _build(BudgetSettings, {**budget, "source": str(path)}, str(path), "budget.")


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
