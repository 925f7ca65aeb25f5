"""Typed records of state.db: what a row of each table means, as Python values."""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields
from enum import StrEnum
from typing import Any, Mapping


class RunStatus(StrEnum):
    PLANNED = "planned"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"


class AdapterStatus(StrEnum):
    """Status of a Thunder adapter run (``hung``: the watchdog stopped it)."""

    PLANNED = "planned"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    HUNG = "hung"
    CANCELLED = "cancelled"


class SyncState(StrEnum):
    LOCAL = "local"
    REMOTE_ONLY = "remote-only"
    TRANSFERRING = "transferring"
    VERIFIED = "verified"
    MIRRORED = "mirrored"
    MISSING = "missing"


def _loads(text: Any, default: Any) -> Any:
    """A JSON column's value (``default`` for NULL or text that is not JSON)."""
    if text is None or not isinstance(text, str):
        return default if text is None else text
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return default


def _pick(cls: type, row: Mapping[str, Any]) -> dict[str, Any]:
    return {f.name: row[f.name] for f in fields(cls) if f.name in row.keys()}


@dataclass(frozen=True)
class Run:
    """A row of ``runs``: one training run (``flags`` and ``config`` decoded from JSON)."""

    id: str
    matrix_id: str | None = None
    script: str | None = None
    mode: str | None = None
    seed: int | None = None
    status: RunStatus = RunStatus.PLANNED
    flags: dict = field(default_factory=dict)
    config: dict | None = None
    out_dir: str | None = None
    executor: str | None = None
    instance_id: str | None = None
    heartbeat_at: str | None = None
    epoch: int | None = None
    best_val_loss: float | None = None
    best_epoch: int | None = None
    test_cer: float | None = None
    test_cer_toneless: float | None = None
    snapshot_sha256: str | None = None
    split_sha256: str | None = None
    recipe_hash: str | None = None
    error: str | None = None
    started_at: str | None = None
    finished_at: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Run":
        values = _pick(cls, row)
        values["status"] = RunStatus(values.get("status") or RunStatus.PLANNED)
        values["flags"] = _loads(values.get("flags"), {})
        values["config"] = _loads(values.get("config"), None)
        return cls(**values)


@dataclass(frozen=True)
class Artifact:
    """A row of ``artifacts``: one file of a run (or adapter run) and where its copies are."""

    run_id: str
    name: str
    owner_kind: str = "run"
    path: str | None = None
    sha256: str | None = None
    size: int | None = None
    locations: tuple[dict, ...] = ()
    sync_state: SyncState = SyncState.LOCAL
    verified_at: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Artifact":
        values = _pick(cls, row)
        values["locations"] = tuple(_loads(values.get("locations"), []))
        values["sync_state"] = SyncState(values.get("sync_state") or SyncState.LOCAL)
        return cls(**values)


@dataclass(frozen=True)
class AdapterRun:
    """A row of ``adapter_runs``: one Thunder (MLX LoRA) run across its hosts."""

    id: str
    name: str | None = None
    status: AdapterStatus = AdapterStatus.PLANNED
    hosts: Any = None
    model: str | None = None
    world_size: int | None = None
    iteration: int | None = None
    heartbeat_at: str | None = None
    adapter_path: str | None = None
    error: str | None = None
    error_kind: str | None = None
    attempt: int = 0
    launcher_pid: int | None = None
    run_dir: str | None = None
    local_dir: str | None = None
    offsets: dict = field(default_factory=dict)
    agp_eval: dict | None = None
    started_at: str | None = None
    finished_at: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "AdapterRun":
        values = _pick(cls, row)
        values["status"] = AdapterStatus(values.get("status") or AdapterStatus.PLANNED)
        values["hosts"] = _loads(values.get("hosts"), None)
        values["offsets"] = _loads(values.get("offsets"), {})
        values["agp_eval"] = _loads(values.get("agp_eval"), None)
        return cls(**values)


@dataclass(frozen=True)
class Proposal:
    """A row of ``proposals``: a correction as a proposer submitted it."""

    feat_id: str
    proposal: str
    run_id: str | None = None
    proposer: str = "file"
    id: int | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Proposal":
        return cls(**_pick(cls, row))


@dataclass(frozen=True)
class GateDecision:
    """A row of ``gate_decisions``: the gate's verdict on one proposal, with the texts a
    reviewer needs (the reference was never read by the gate)."""

    feat_id: str
    accepted: bool
    run_id: str | None = None
    partition: str | None = None
    rules: tuple[str, ...] = ()
    edit_distance: int | None = None
    policy_hash: str | None = None
    witness: str | None = None
    asr_text: str | None = None
    proposal: str | None = None
    reference_text: str | None = None
    acoustic_delta: float | None = None
    acoustic_margin: float | None = None
    ref_edit_change: int | None = None
    proposal_id: int | None = None
    id: int | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "GateDecision":
        values = _pick(cls, row)
        values["accepted"] = bool(values.get("accepted"))
        rules = _loads(values.get("rules"), [])
        values["rules"] = tuple(str(r) for r in rules) if isinstance(rules, list) else (str(rules),)
        return cls(**values)


@dataclass(frozen=True)
class Review:
    """A row of ``reviews``: a person's verdict on a gate decision. ``note`` and ``reviewer``
    are None when not given (never an empty or blank string)."""

    decision_id: int
    verdict: str
    note: str | None = None
    reviewer: str | None = None
    id: int | None = None
    created_at: str | None = None

    @classmethod
    def from_row(cls, row: Mapping[str, Any]) -> "Review":
        return cls(**_pick(cls, row))
