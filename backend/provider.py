"""The provider interface, in the way of skypilot's ``sky/provision``: the narrow set of calls
the fleet, the cost ledger, the idle rule, the budget guard and the executor make to a GPU
cloud, and the ``Instance`` / ``Offer`` values they get back. Nothing above this interface
sees a provider's own records (Vast's JSON rows stay inside backend/vast/provider.py).

Implementations: ``backend.vast.provider.VastProvider`` (the real ``vastai`` SDK) and
``backend.memory_provider.MemoryProvider`` (an account held in memory, for unit tests).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol

from models.errors import NkoOpsError


class ProviderError(NkoOpsError, RuntimeError):
    """A provider call failed (``status``: the HTTP status, when there was one)."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class InstanceNotFound(ProviderError):
    pass


class InstanceStatus(StrEnum):
    """Where an instance is in its life (Vast's ``actual_status``)."""

    CREATED = "created"
    LOADING = "loading"
    RUNNING = "running"
    STOPPED = "stopped"
    EXITED = "exited"
    OFFLINE = "offline"
    UNKNOWN = "unknown"

    @classmethod
    def parse(cls, value: str | None) -> "InstanceStatus | None":
        """None while the provider reports none yet; an unfamiliar word is UNKNOWN."""
        if value is None:
            return None
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN


# An instance the provider no longer runs for us: its machine is lost (recover the run elsewhere).
LOST_STATUSES = (InstanceStatus.EXITED, InstanceStatus.OFFLINE)
# Billed at the full hourly price (compute and disk) in these states, when meant to run.
COMPUTE_STATUSES = (None, InstanceStatus.CREATED, InstanceStatus.LOADING, InstanceStatus.RUNNING)


@dataclass(frozen=True)
class Instance:
    """One rented machine as the provider shows it now."""

    id: str
    status: InstanceStatus | None
    label: str | None = None
    usd_per_h: float = 0.0  # the full hourly price (compute, and disk while it runs)
    storage_usd_per_h: float = 0.0  # what its disk alone costs per hour
    gpu_util: float | None = None  # percent
    ssh_host: str | None = None
    ssh_port: int | None = None
    machine_id: int = 0
    gpu_name: str | None = None
    num_gpus: int | None = None
    intended_status: str | None = "running"
    cur_state: str | None = None
    status_msg: str | None = None
    start_date: float | None = None  # unix time it started billing
    storage_cost: float | None = None  # $/GB/month, as the provider quotes it

    @property
    def running(self) -> bool:
        return self.status == InstanceStatus.RUNNING

    @property
    def ssh(self) -> tuple[str, int] | None:
        """(host, port) once it can be reached over SSH."""
        return (self.ssh_host, int(self.ssh_port)) if self.ssh_host and self.ssh_port else None

    @property
    def billing_compute(self) -> bool:
        """Whether it bills its full price now (else only its disk)."""
        return self.status in COMPUTE_STATUSES and self.intended_status == "running"

    @property
    def rate(self) -> float:
        """USD per hour it costs in the state it is in."""
        return max(self.usd_per_h, self.storage_usd_per_h) if self.billing_compute else self.storage_usd_per_h


@dataclass(frozen=True)
class Offer:
    """A machine for rent."""

    id: int
    machine_id: int
    gpu_name: str
    num_gpus: int
    dph_total: float
    reliability: float
    inet_down: float
    disk_space: float
    geolocation: str | None = None
    raw: dict = field(default_factory=dict, compare=False, repr=False)  # the provider's record, for display only

    def summary(self) -> dict:
        """What is recorded of the offer an instance was created on."""
        return {"id": self.id, "machine_id": self.machine_id, "gpu_name": self.gpu_name, "num_gpus": self.num_gpus,
                "dph_total": self.dph_total, "reliability": self.reliability, "inet_down": self.inet_down,
                "geolocation": self.geolocation}


class Provider(Protocol):
    """What this project asks of a GPU cloud. Calls raise ProviderError when they fail."""

    def offers(self, query: str, order: str = "dph_total", limit: int | None = 20,
               storage_gb: float = 60.0) -> list[Offer]: ...

    def create(self, offer_id: int, image: str, disk_gb: float, label: str, onstart: str | None = None,
               env: dict | None = None) -> str: ...

    def instances(self) -> list[Instance]: ...

    def instance(self, iid: str) -> Instance | None: ...

    def destroy(self, iid: str) -> bool: ...

    def stop(self, iid: str) -> None: ...
