"""A GPU cloud account held in memory: the ``backend.provider.Provider`` interface without a
network, for unit tests of the fleet, the cost ledger, the idle rule and the budget guard.

It keeps its own clock (``clock``), so a test moves time instead of sleeping. An instance
boots for ``boot_s``, then runs; it has no SSH address unless one is given (``set_ssh``), so
nothing that needs its files can be verified (the destroy rule then refuses). What happens on
the provider's side is driven by the test: ``set_gpu_util``, ``lose`` (the machine goes away
without a destroy) and ``fail_next`` (the next call of a kind fails).
"""

from __future__ import annotations

import dataclasses
import operator
import time
from typing import Callable

from backend.provider import Instance, InstanceStatus, Offer, ProviderError

_OPS = {"<=": operator.le, ">=": operator.ge, "!=": operator.ne, "=": operator.eq, "<": operator.lt, ">": operator.gt}


def _condition(term: str) -> tuple[str, Callable, str]:
    for sym in ("<=", ">=", "!=", "=", "<", ">"):  # two-character operators first
        field, found, value = term.partition(sym)
        if found:
            if field not in Offer.__dataclass_fields__ or field == "raw":
                raise ProviderError(f"offer query: unknown field {field!r}")
            return field, _OPS[sym], value
    raise ProviderError(f"offer query: cannot read {term!r} (field, operator, value)")


def _matches(offer: Offer, conditions: list[tuple[str, Callable, str]]) -> bool:
    for field, op, raw in conditions:
        have = getattr(offer, field)
        want: object = raw.replace("_", " ") if isinstance(have, str) else float(raw)
        if not op(have, want):
            return False
    return True


class MemoryProvider:
    """``offers``: the machines for rent; ``storage_usd_per_gb_month``: the disk price."""

    def __init__(self, offers: list[Offer], clock: Callable[[], float] = time.time, boot_s: float = 0.0,
                 storage_usd_per_gb_month: float = 0.1, first_id: int = 1000):
        self.offer_list, self.clock, self.boot_s = list(offers), clock, boot_s
        self.storage_usd_per_gb_month = storage_usd_per_gb_month
        self._next_id = first_id
        self._instances: dict[str, Instance] = {}
        self._booted_at: dict[str, float] = {}
        self._failures: dict[str, ProviderError] = {}
        self.destroyed: list[str] = []
        self.stopped: list[str] = []

    # ------------------------------------------------------------------ the Provider interface

    def offers(self, query: str, order: str = "dph_total", limit: int | None = 20,
               storage_gb: float = 60.0) -> list[Offer]:
        self._maybe_fail("offers")
        conditions = [_condition(t) for t in query.split()]
        found = [o for o in self.offer_list if _matches(o, conditions)]
        found.sort(key=lambda o: getattr(o, order.lstrip("-")), reverse=order.startswith("-"))
        return found[:limit] if limit else found

    def create(self, offer_id: int, image: str, disk_gb: float, label: str, onstart: str | None = None,
               env: dict | None = None) -> str:
        self._maybe_fail("create")
        offer = next((o for o in self.offer_list if o.id == offer_id), None)
        if offer is None:
            raise ProviderError(f"create instance on offer {offer_id}: no such offer", 404)
        iid = str(self._next_id)
        self._next_id += 1
        storage = self.storage_usd_per_gb_month * disk_gb / (30 * 24)
        now = self.clock()
        self._instances[iid] = Instance(
            iid, InstanceStatus.LOADING, label=label, usd_per_h=offer.dph_total + storage, storage_usd_per_h=storage,
            gpu_util=0.0, machine_id=offer.machine_id, gpu_name=offer.gpu_name, num_gpus=offer.num_gpus,
            cur_state="running", status_msg="loading", start_date=now,
            storage_cost=self.storage_usd_per_gb_month)
        self._booted_at[iid] = now + self.boot_s
        return iid

    def instances(self) -> list[Instance]:
        self._maybe_fail("instances")
        return [self._now(iid) for iid in sorted(self._instances, key=int)]

    def instance(self, iid: str) -> Instance | None:
        self._maybe_fail("instance")
        return self._now(str(iid)) if str(iid) in self._instances else None

    def destroy(self, iid: str) -> bool:
        self._maybe_fail("destroy")
        if self._instances.pop(str(iid), None) is not None:
            self.destroyed.append(str(iid))
        return True

    def stop(self, iid: str) -> None:
        self._maybe_fail("stop")
        inst = self._instances.get(str(iid))
        if inst is None:
            raise ProviderError(f"stop instance {iid}: no such instance", 404)
        self._instances[str(iid)] = dataclasses.replace(inst, status=InstanceStatus.STOPPED, intended_status="stopped",
                                                        cur_state="stopped", gpu_util=0.0)
        self.stopped.append(str(iid))

    # ------------------------------------------------------------------ the provider's side

    def set_gpu_util(self, iid: str, util: float) -> None:
        self._instances[str(iid)] = dataclasses.replace(self._instances[str(iid)], gpu_util=util)

    def set_ssh(self, iid: str, host: str, port: int) -> None:
        self._instances[str(iid)] = dataclasses.replace(self._instances[str(iid)], ssh_host=host, ssh_port=port)

    def lose(self, iid: str) -> None:
        """The machine goes away (no destroy): the account no longer lists it."""
        del self._instances[str(iid)]

    def fail_next(self, call: str, error: ProviderError) -> None:
        """The next call of ``call`` (offers, create, instances, instance, destroy, stop) raises."""
        self._failures[call] = error

    def _maybe_fail(self, call: str) -> None:
        error = self._failures.pop(call, None)
        if error is not None:
            raise error

    def _now(self, iid: str) -> Instance:
        """The instance as of the clock: booted once its boot time has passed."""
        inst = self._instances[iid]
        if inst.status == InstanceStatus.LOADING and self.clock() >= self._booted_at[iid]:
            inst = self._instances[iid] = dataclasses.replace(inst, status=InstanceStatus.RUNNING,
                                                              status_msg="success, running")
        return inst
