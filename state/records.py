"""Typed records of state.db: what a row of each table means, as Python values."""

from __future__ import annotations

from enum import StrEnum


class RunStatus(StrEnum):
    PLANNED = "planned"
    QUEUED = "queued"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    INTERRUPTED = "interrupted"
    CANCELLED = "cancelled"


class SyncState(StrEnum):
    LOCAL = "local"
    REMOTE_ONLY = "remote-only"
    TRANSFERRING = "transferring"
    VERIFIED = "verified"
    MIRRORED = "mirrored"
    MISSING = "missing"
