"""Run configuration: one JSON file per training run (README "Acoustic model and trainer").

Every section forbids unknown keys, so a typo is an error, not a silently ignored setting.
Relative paths are resolved against the directory the command runs in.

    {"run_id": "demo-nko-baseline", "script": "nko", "mode": "baseline", "seed": 42,
     "snapshot": "data/sample", "split": "work/demo/split.json",
     "features": "work/demo/features", "out_dir": "work/demo/runs/demo-nko-baseline",
     "model": {"preset": "demo"}, "train": {"epochs": 30, "batch_size": 16, "lr": 1e-3}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator
from models.errors import NkoOpsError

MODES = ("baseline", "trajectory", "tar", "ttt")


class ConfigError(NkoOpsError, ValueError):
    pass


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelConfig(_Section):
    """A preset name plus optional overrides of any ``models.model.Dims`` field."""

    preset: Literal["v3", "demo", "tiny"] = "demo"
    n_input: int | None = Field(None, gt=0)
    d_model: int | None = Field(None, gt=0)
    conv_kernel: int | None = Field(None, gt=0)
    conv_stride: int | None = Field(None, gt=0)
    conv_padding: int | None = Field(None, ge=0)
    n_layers: int | None = Field(None, gt=0)
    n_heads: int | None = Field(None, gt=0)
    d_ff: int | None = Field(None, gt=0)
    dropout: float | None = Field(None, ge=0, lt=1)
    max_positions: int | None = Field(None, gt=0)
    traj_hidden: int | None = Field(None, gt=0)

    def overrides(self) -> dict:
        return {k: v for k, v in self.model_dump().items() if k != "preset" and v is not None}


class SpecAugmentConfig(_Section):
    """Per utterance: ``freq_masks`` bands of up to ``freq_width`` channels and ``time_masks``
    spans of up to ``time_width`` frames (at most ``time_max_fraction`` of the utterance)."""

    enabled: bool = True
    freq_masks: int = Field(2, ge=0)
    freq_width: int = Field(10, ge=0)
    time_masks: int = Field(2, ge=0)
    time_width: int = Field(20, ge=0)
    time_max_fraction: float = Field(0.2, ge=0, le=1)


class TrainConfig(_Section):
    epochs: int = Field(50, gt=0)
    batch_size: int = Field(32, gt=0)
    lr: float = Field(3e-4, gt=0)
    weight_decay: float = Field(0.01, ge=0)
    warmup_epochs: float = Field(5, ge=0)
    grad_clip: float = Field(1.0, gt=0)
    patience: int = Field(8, gt=0)
    specaugment: SpecAugmentConfig = SpecAugmentConfig()
    log_every: int = Field(50, gt=0)
    max_batch_frames: int | None = Field(None, gt=0)
    min_lr_ratio: float = Field(0.0, ge=0, le=1)

    @field_validator("specaugment", mode="before")
    @classmethod
    def _specaugment_flag(cls, v):
        return {"enabled": v} if isinstance(v, bool) else v  # "specaugment": false is shorthand


class TTTConfig(_Section):
    """Test-time training (mode "ttt", or any run at evaluation): see models/ttt.py."""

    steps: int = Field(1, ge=0)
    lr: float = Field(1e-3, ge=0)
    chunk_size: int = Field(64, gt=0)
    rank: int = Field(8, gt=0)
    method: Literal["adapter", "suta"] = "adapter"
    frames: Literal["nonblank", "all"] = "nonblank"
    guard: bool = True
    guard_ratio: float = Field(0.5, ge=0, le=1)
    layer: int = -1
    # A TTT run with both grids set decodes the validation split at every (lr, steps) of the
    # grid and decodes test with the setting of lowest validation CER (models/train.py
    # choose_ttt); results.json records the grid and the choice. Unset: ``lr``/``steps`` as given.
    grid_lr: list[float] | None = None
    grid_steps: list[int] | None = None

    @field_validator("grid_lr")
    @classmethod
    def _grid_lr(cls, v):
        if v is not None and (not v or any(x <= 0 for x in v)):
            raise ValueError("must be a non-empty list of learning rates > 0")
        return v

    @field_validator("grid_steps")
    @classmethod
    def _grid_steps(cls, v):
        if v is not None and (not v or any(x < 1 for x in v)):
            raise ValueError("must be a non-empty list of step counts >= 1")
        return v


class TARConfig(_Section):
    """Trajectory Anticipation Regulariser weights (mode "tar"): see models/trajectory.py."""

    weight: float = Field(0.1, ge=0)
    smooth_weight: float = Field(0.01, ge=0)


class SubsetConfig(_Section):
    train: int | None = Field(None, gt=0)
    val: int | None = Field(None, gt=0)
    test: int | None = Field(None, gt=0)


class RunConfig(_Section):
    run_id: str = Field(min_length=1)
    script: Literal["nko", "latin"]
    mode: Literal["baseline", "trajectory", "tar", "ttt"]
    seed: int = Field(42, ge=0, le=2**32 - 1)  # numpy and torch seeds: 0 .. 2^32-1
    snapshot: str
    snapshot_sha256: str | None = None
    split: str
    features: str
    out_dir: str
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    ttt: TTTConfig = TTTConfig()
    tar: TARConfig = TARConfig()
    subset: SubsetConfig = SubsetConfig()
    device: str = "auto"

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if v not in ("auto", "cpu", "cuda") and not v.startswith("cuda:"):
            raise ValueError("must be 'auto', 'cpu', 'cuda' or 'cuda:N'")
        return v

    @field_validator("run_id")
    @classmethod
    def _run_id(cls, v: str) -> str:
        from models.runid import run_id_problem

        why = run_id_problem(v)
        if why:
            raise ValueError(why)
        return v

    def to_json(self) -> dict:
        return self.model_dump(mode="json")


def _describe(errors: list[dict], source: str) -> str:
    lines = []
    for e in errors:
        field = ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "missing":
            lines.append(f"field '{field}' is required but missing")
        elif e["type"] == "extra_forbidden":
            lines.append(f"field '{field}' is not a known setting")
        else:
            lines.append(f"field '{field}': {e['msg']} (got {e.get('input')!r})")
    return f"{source}: invalid run config\n  " + "\n  ".join(lines)


def parse_config(data: dict, source: str = "run config") -> RunConfig:
    """Validate a config dict; ConfigError names every offending field."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a run config must be a JSON object")
    try:
        return RunConfig.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_describe(e.errors(), source)) from None


def load_config(path: str | Path, overrides: dict | None = None) -> RunConfig:
    """Read ``path`` and apply dotted-key ``overrides`` (e.g. {"ttt.lr": 1e-3}) before validation."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"run config not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON (line {e.lineno}: {e.msg})") from None
    for key, value in (overrides or {}).items():
        if value is None:
            continue
        node = data
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return parse_config(data, str(path))
