"""Vast.ai through the real ``vastai`` SDK (``VastAI(api_key=..., server_url=...)``).

The SDK already retries 429 (honouring ``Retry-After``) and 502/503/504 a few times; this
layer adds bounded retries with backoff for other 5xx answers and for transport errors on
calls that are safe to repeat (searches, listings, destroy). Creating an instance is not
repeated blindly: after a failed create the instance list is checked for the label, so a
create that succeeded behind an error is adopted instead of paying for a second machine. Only
an instance that was not on the account before the first try is adopted: an older instance
with the same label (an earlier launch of the same run, lost or stopped, still holding its
files) is never taken for the new one.

Errors come out as ProviderError with the HTTP status and Vast's message, never with the
request headers (which carry the API key).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable

import requests
from models.errors import NkoOpsError

TRANSIENT = {429, 500, 502, 503, 504}
GONE_STATUSES = ("exited", "offline", "unknown")


class ProviderError(NkoOpsError, RuntimeError):
    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class InstanceNotFound(ProviderError):
    pass


def _message(e: requests.HTTPError) -> str:
    r = e.response
    try:
        body = r.json()
        msg = body.get("msg") or body.get("error") or ""
    except ValueError:
        msg = (r.text or "")[:200]
    return f"HTTP {r.status_code} from {r.request.method} {r.request.path_url.split('?')[0]}: {msg}"


def _succeeded(what: str, res) -> None:
    """Vast answers some refusals with HTTP 200 and ``{"success": false, "msg": ...}``."""
    if isinstance(res, dict) and res.get("success") is False:
        raise ProviderError(f"{what}: refused: {res.get('msg') or res.get('error') or res}")


@dataclass
class Offer:
    id: int
    machine_id: int
    gpu_name: str
    num_gpus: int
    dph_total: float
    reliability: float
    inet_down: float
    disk_space: float
    raw: dict

    @classmethod
    def from_row(cls, r: dict) -> "Offer":
        return cls(int(r["id"]), int(r.get("machine_id") or 0), str(r.get("gpu_name")), int(r.get("num_gpus") or 1),
                   float(r.get("dph_total") or 0.0), float(r.get("reliability2", r.get("reliability")) or 0.0),
                   float(r.get("inet_down") or 0.0), float(r.get("disk_space") or 0.0), r)


class VastProvider:
    def __init__(self, api_key: str, server_url: str | None = None, attempts: int = 5, backoff_s: float = 0.5,
                 sleep: Callable[[float], None] = time.sleep):
        from vastai import VastAI

        self.sdk = VastAI(api_key=api_key, server_url=server_url, raw=True, quiet=True)
        self.attempts, self.backoff_s, self.sleep = attempts, backoff_s, sleep

    def _call(self, what: str, fn: Callable, *args, retry: bool = True, **kwargs):
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                return fn(*args, **kwargs)
            except requests.HTTPError as e:
                status = e.response.status_code
                if status == 404:
                    raise InstanceNotFound(f"{what}: {_message(e)}", status) from None
                if not retry or status not in TRANSIENT or attempt == self.attempts:
                    raise ProviderError(f"{what}: {_message(e)}", status) from None
                wait = delay
                if status == 429:
                    try:
                        wait = max(delay, float(e.response.headers.get("Retry-After", delay)))
                    except ValueError:
                        pass
            except (requests.ConnectionError, requests.Timeout) as e:
                if not retry or attempt == self.attempts:
                    raise ProviderError(f"{what}: cannot reach the Vast API ({type(e).__name__})") from None
                wait = delay
            self.sleep(wait)
            delay = min(delay * 2, 30.0)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ offers

    def offers(self, query: str, order: str = "dph_total", limit: int | None = 20,
               storage_gb: float = 60.0) -> list[Offer]:
        """Offers matching a Vast query string (e.g. ``gpu_name=RTX_4090 reliability>0.98``),
        with live prices for ``storage_gb`` of disk."""
        try:
            rows = self._call("search offers", self.sdk.search_offers, query=query, order=order, limit=limit,
                              storage=storage_gb)
        except ValueError as e:  # the SDK's query parser
            raise ProviderError(f"offer query {query!r}: {e}") from None
        return [Offer.from_row(r) for r in rows]

    # ------------------------------------------------------------------ instances

    def create(self, offer_id: int, image: str, disk_gb: float, label: str, onstart: str | None = None,
               env: dict | None = None) -> int:
        """Rent ``offer_id``; returns the new instance id. ``label`` must be unique to this
        launch (the run id): after a failed call the account is searched for an instance with
        that label that was not there before the first try, so a create that succeeded behind
        an error is adopted, and one that did not is tried again."""
        existing = {int(i["id"]) for i in self.instances()}
        delay = self.backoff_s
        for attempt in range(1, self.attempts + 1):
            try:
                res = self._call("create instance", self.sdk.create_instance, offer_id, image=image, disk=disk_gb,
                                 label=label, onstart_cmd=onstart, env=env or {}, ssh=True, direct=True, retry=False)
                break
            except ProviderError as e:
                if e.status is not None and e.status not in TRANSIENT:
                    raise
                adopted = sorted(int(i["id"]) for i in self.instances()
                                 if i.get("label") == label and int(i["id"]) not in existing)
                if adopted:
                    return adopted[0]
                if attempt == self.attempts:
                    raise
                self.sleep(delay)
                delay = min(delay * 2, 30.0)
        if not res.get("success", True) or "new_contract" not in res:
            raise ProviderError(f"create instance on offer {offer_id}: {res.get('msg') or res}")
        return int(res["new_contract"])

    def instances(self) -> list[dict]:
        """Every instance of the account (all pages)."""
        return self._call("list instances", self.sdk.show_instances)

    def instance(self, iid: int | str) -> dict | None:
        """One instance, or None when Vast no longer knows it."""
        try:
            return self._call(f"show instance {iid}", self.sdk.show_instance, int(iid))
        except InstanceNotFound:
            return None

    def destroy(self, iid: int | str) -> bool:
        """Destroy; True when it is gone (also when it already was). An answer of
        ``success: false`` (the instance is still there) raises ProviderError."""
        try:
            res = self._call(f"destroy instance {iid}", self.sdk.destroy_instance, int(iid))
        except InstanceNotFound:
            return True
        _succeeded(f"destroy instance {iid}", res)
        return True

    def stop(self, iid: int | str) -> None:
        _succeeded(f"stop instance {iid}", self._call(f"stop instance {iid}", self.sdk.stop_instance, int(iid)))

    def label(self, iid: int | str, label: str) -> None:
        _succeeded(f"label instance {iid}",
                   self._call(f"label instance {iid}", self.sdk.label_instance, int(iid), label))

    def user(self) -> dict:
        return self._call("current user", self.sdk.show_user)


def provider_from_settings(settings, sleep: Callable[[float], None] = time.sleep) -> VastProvider:
    from backend.vast.config import api_key

    return VastProvider(api_key(), settings.server_url, sleep=sleep)
