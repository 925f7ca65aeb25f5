"""A local Vast.ai API emulator: the endpoints the ``vastai`` SDK and CLI call, served over
HTTP on 127.0.0.1, so the lane can be exercised end to end without the cloud.

Endpoints (paths as the SDK builds them):

    POST /api/v0/bundles/                offer search (Vast query dict: {field: {op: value}})
    PUT  /api/v0/search/asks/            the newer offer search ({"q": query})
    PUT  /api/v0/asks/{offer}/           create an instance -> {"success", "new_contract"}
    GET  /api/v1/instances/              list, paginated (select_filters, order_by, limit, after_token)
    GET  /api/v0/instances/{id}/         one instance -> {"instances": row | null}
    PUT  /api/v0/instances/{id}/         {"label": ...} or {"state": "running" | "stopped"}
    DELETE /api/v0/instances/{id}/       destroy
    POST /api/v0/asks/bulk/              create on several offers ({"ids": [...], ...}: `vastai create instances`)
    DELETE /api/v0/instances/            destroy several ({"instance_ids": [...]}: `vastai destroy instances`)
    PUT  /api/v0/instances/              start / stop several ({"ids": [...], "state": ...})
    GET  /api/v0/instances/filters/      distinct filter values (the CLI's table view)
    GET  /api/v0/users/current           the account

Every call needs ``Authorization: Bearer <key>`` (the key the emulator was started with), or
an instance's own key (``Cloud.container_key(id)``, what Vast puts in an instance's
``CONTAINER_API_KEY``), which may only read, start and stop that one instance. A malformed
request (bad JSON, wrong types, a bad Content-Length) gets a 400 naming the problem, never a
dropped connection. Instance rows carry ``image_runtype`` (``vastai ssh-url`` reads it).

Billing follows Vast: ``dph_total`` per second while an instance runs (it includes its
disk), storage alone while it exists otherwise (loading or stopped), nothing once destroyed.
Each instance's ``ssh_host``/``ssh_port`` point at one real sshd (the one on this machine);
its disk is the directory ``workspace_base/<id>``: destroying or losing the instance kills
the processes working there and deletes it, as losing a machine would.

Fault knobs (``Cloud.faults``, or ``POST /_emulator/faults`` with the same JSON keys):
``rate_limit`` (next N calls answer 429 with ``Retry-After: retry_after``), ``server_errors``
(next N calls answer ``error_status``), ``slow_s`` (every answer waits), ``destroy_fail``
(next N destroys answer 500 and leave the instance running), ``destroy_unsuccessful`` (next N
destroys answer 200 with ``{"success": false}`` and leave it), ``create_reply_lost`` (next N
creates rent the instance but answer 500, as if the reply was lost). ``POST
/_emulator/vanish/{id}`` or ``Cloud.vanish(id)`` makes an instance disappear, like a host that
died; ``POST /_emulator/offline/{id}`` or ``Cloud.offline(id)`` takes its host down (status
``offline``, SSH unreachable, its disk kept and billed as storage), ``Cloud.online(id)`` brings
it back.
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import signal
import threading
import time
from dataclasses import asdict, dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable
from urllib.parse import parse_qs, urlsplit

HOURS_PER_MONTH = 30 * 24


@dataclass
class Faults:
    rate_limit: int = 0
    retry_after: float = 1.0
    server_errors: int = 0
    error_status: int = 500
    slow_s: float = 0.0
    destroy_fail: int = 0
    destroy_unsuccessful: int = 0
    create_reply_lost: int = 0


def default_offers() -> list[dict]:
    """A small catalogue shaped like Vast's offer rows."""
    specs = [  # gpu_name, num_gpus, gpu_ram MB, dph_base, reliability, inet_down, disk_space, cuda
        ("RTX 4090", 1, 24564, 0.34, 0.995, 850.0, 400.0, 12.4),
        ("RTX 4090", 1, 24564, 0.29, 0.97, 300.0, 120.0, 12.2),
        ("RTX 3090", 1, 24576, 0.18, 0.992, 600.0, 250.0, 12.2),
        ("A100 PCIE", 1, 40960, 0.72, 0.998, 1200.0, 800.0, 12.4),
        ("A100 SXM4", 1, 81920, 1.05, 0.999, 2000.0, 1000.0, 12.4),
        ("H100 SXM", 1, 81559, 2.10, 0.999, 4000.0, 1500.0, 12.6),
        ("A100 SXM4", 2, 81920, 2.02, 0.99, 2000.0, 1000.0, 12.4),
        ("RTX A6000", 1, 49140, 0.48, 0.985, 500.0, 300.0, 12.2),
    ]
    out = []
    for i, (name, n, ram, base, rel, down, disk, cuda) in enumerate(specs):
        out.append({
            "id": 1000 + i, "ask_contract_id": 1000 + i, "machine_id": 5000 + i, "host_id": 700 + i,
            "gpu_name": name, "num_gpus": n, "gpu_ram": ram, "gpu_total_ram": ram * n,
            "dph_base": base, "storage_cost": 0.15, "inet_up": down / 2, "inet_down": down,
            "inet_up_cost": 0.0, "inet_down_cost": 0.0, "disk_space": disk, "disk_bw": 2000.0,
            "reliability": rel, "reliability2": rel, "cuda_max_good": cuda, "driver_version": "550.54.15",
            "cpu_cores": 16, "cpu_cores_effective": 16.0, "cpu_ram": 64000, "cpu_name": "AMD EPYC 7543",
            "compute_cap": 890 if "40" in name else 800, "total_flops": 80.0 * n, "dlperf": 30.0 * n,
            "verified": True, "verification": "verified", "external": False, "rentable": True, "rented": False,
            "static_ip": True, "direct_port_count": 20, "geolocation": "Sweden, SE", "datacenter": True,
            "hosting_type": 1, "min_bid": round(base * 0.6, 4), "duration": 30 * 86400.0,
            "pci_gen": 4.0, "pcie_bw": 24.0, "has_avx": 1, "ubuntu_version": "22.04", "gpu_arch": "nvidia",
        })
    return out


class CloudError(Exception):
    def __init__(self, status: int, msg: str, error: str = "error"):
        super().__init__(msg)
        self.status, self.msg, self.error = status, msg, error


def _number(v):
    if isinstance(v, bool) or v is None:
        return v
    if isinstance(v, (int, float)):
        return float(v)
    try:
        return float(v)
    except (TypeError, ValueError):
        return v


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return str(a).lower() == str(b).lower()
    na, nb = _number(a), _number(b)
    if isinstance(na, float) and isinstance(nb, float):
        return na == nb
    return str(a).lower() == str(b).lower()


def matches(row: dict, query: dict) -> bool:
    """Vast query semantics: every {field: {op: value}} must hold (unknown fields: no match)."""
    for name, cond in query.items():
        if not isinstance(cond, dict):
            continue
        have = row.get(name)
        for op, want in cond.items():
            if op == "eq":
                ok = _same(have, want)
            elif op == "neq":
                ok = not _same(have, want)
            elif op in ("in", "notin"):
                values = want if isinstance(want, list) else [want]
                ok = any(_same(have, w) for w in values) == (op == "in")
            elif op in ("gt", "gte", "lt", "lte"):
                a, b = _number(have), _number(want)
                if not isinstance(a, float) or not isinstance(b, float):
                    return False
                ok = {"gt": a > b, "gte": a >= b, "lt": a < b, "lte": a <= b}[op]
            else:
                raise CloudError(400, f"unknown operator {op!r} for field {name!r}", "invalid_request")
            if not ok:
                return False
    return True


def _sort(rows: list[dict], order: list) -> list[dict]:
    for item in reversed(order or []):
        col, direction = (item.get("col"), item.get("dir", "asc")) if isinstance(item, dict) else (item[0], item[1])
        present = [r for r in rows if r.get(col) is not None]
        absent = [r for r in rows if r.get(col) is None]
        present.sort(key=lambda r: (_number(r[col]) if isinstance(_number(r[col]), float) else str(r[col])),
                     reverse=str(direction).lower().startswith("d"))
        rows = present + absent
    return rows


def _processes_in(path: Path) -> list[tuple[int, str]]:
    """(pid, command line) of processes whose working directory or command line is inside
    ``path`` (this process excluded)."""
    me = os.getpid()
    inside = re.compile(re.escape(str(path)) + r"(?=$|[/\s'\"])")
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            cwd = os.readlink(entry / "cwd")
        except OSError:
            continue
        if inside.match(cwd) or inside.search(cmd):
            found.append((int(entry.name), cmd))
    return found


def _kill_processes_in(path: Path) -> None:
    for pid, _ in _processes_in(path):
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _closed_port() -> int:
    """A local TCP port nothing listens on (an unreachable host's SSH port)."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _working_in(path: Path) -> bool:
    """A trainer runs on this instance (the emulator's stand-in for GPU utilisation)."""
    return any(" train " in f" {cmd} " for _, cmd in _processes_in(path))


class Cloud:
    """The emulated account: offers, instances, billing and fault knobs (thread-safe)."""

    def __init__(self, api_key: str | None = None, ssh_host: str = "127.0.0.1", ssh_port: int = 22,
                 workspace_base: str | Path | None = None, clock: Callable[[], float] = time.time,
                 boot_s: float = 0.0, offers: list[dict] | None = None, page_size: int = 25,
                 credit: float = 1000.0):
        self.api_key, self.ssh_host, self.ssh_port = api_key, ssh_host, ssh_port
        self.workspace_base = Path(workspace_base) if workspace_base else None
        self.clock, self.boot_s, self.page_size, self.credit = clock, boot_s, page_size, credit
        self.offers = offers if offers is not None else default_offers()
        self.instances: dict[int, dict] = {}
        self.faults = Faults()
        self.lock = threading.RLock()
        self.requests: list[tuple[str, str]] = []  # (method, path) of every call, for tests
        self._next_id = 31000000
        self._billed: dict[int, float] = {}  # instance id -> USD billed up to _billed_at
        self._billed_at: dict[int, float] = {}
        self.gone: dict[int, str] = {}  # id -> "destroyed" | "vanished"
        self._container_keys: dict[int, str] = {}  # id -> the instance's own API key

    def container_key(self, iid: int) -> str:
        """The instance's own API key (Vast's CONTAINER_API_KEY): it may read, start and stop
        that instance only."""
        with self.lock:
            return self._container_keys[int(iid)]

    def key_instance(self, key: str) -> int | None:
        with self.lock:
            return next((i for i, k in self._container_keys.items() if k == key), None)

    # ------------------------------------------------------------------ billing

    @staticmethod
    def rate(row: dict) -> float:
        """USD per hour the instance costs in its current state."""
        if row["actual_status"] == "running":
            return row["dph_total"]
        return row["storage_total_cost"]

    def _accrue(self, iid: int, now: float) -> None:
        row = self.instances[iid]
        dt = max(0.0, now - self._billed_at[iid])
        self._billed[iid] += self.rate(row) * dt / 3600.0
        self._billed_at[iid] = now

    def billed(self, iid: int | None = None) -> float:
        """Exact USD billed so far (one instance, or the whole account)."""
        with self.lock:
            now = self.clock()
            for i in self.instances:
                self._accrue(i, now)
            if iid is not None:
                return self._billed.get(iid, 0.0)
            return sum(self._billed.values())

    def _tick(self) -> None:
        now = self.clock()
        for iid, row in self.instances.items():
            if row["actual_status"] == "loading" and row["intended_status"] == "running" \
                    and now - row["start_date"] >= self.boot_s:
                self._accrue(iid, now)
                row.update(actual_status="running", cur_state="running", status_msg="success, running",
                           ssh_host=self.ssh_host, ssh_port=self.ssh_port)
            if row["actual_status"] == "running" and self.workspace_base is not None:
                row["gpu_util"] = 87.0 if _working_in(self.workspace(iid)) else 0.0
            else:
                row["gpu_util"] = 0.0

    def workspace(self, iid: int) -> Path:
        assert self.workspace_base is not None
        return self.workspace_base / str(iid)

    # ------------------------------------------------------------------ offers

    def search(self, q: dict) -> list[dict]:
        q = dict(q or {})
        order = q.pop("order", [["score", "desc"]])
        limit = q.pop("limit", None)
        storage = float(q.pop("allocated_storage", 5.0) or 5.0)
        for key in ("type", "disable_bundling"):
            q.pop(key, None)
        with self.lock:
            rows = []
            for offer in self.offers:
                o = dict(offer)
                o["rented"] = any(r["machine_id"] == o["machine_id"] for r in self.instances.values())
                o["rentable"] = not o["rented"]
                o["storage_total_cost"] = round(o["storage_cost"] * storage / HOURS_PER_MONTH, 6)
                o["dph_total"] = round(o["dph_base"] + o["storage_total_cost"], 6)
                o["dlperf_per_dphtotal"] = o["dlperf"] / o["dph_total"]
                o["flops_per_dphtotal"] = o["total_flops"] / o["dph_total"]
                o["score"] = o["dlperf_per_dphtotal"] * o["reliability"]
                if matches(o, q):
                    rows.append(o)
        rows = _sort(rows, [{"col": c, "dir": d} for c, d in order])
        return rows[: int(limit)] if limit else rows

    # ------------------------------------------------------------------ instances

    def create(self, ask_id: int, body: dict) -> int:
        with self.lock:
            offer = next((o for o in self.offers if o["id"] == ask_id), None)
            if offer is None:
                raise CloudError(404, f"no such ask {ask_id}", "invalid_args")
            if any(r["machine_id"] == offer["machine_id"] for r in self.instances.values()):
                raise CloudError(400, f"ask {ask_id} is no longer available", "no_such_ask")
            if not body.get("image") and not body.get("template_hash_id"):
                raise CloudError(400, "an image or a template is required", "invalid_args")
            self._next_id += 1
            iid = self._next_id
            now = self.clock()
            try:
                disk = float(body.get("disk") or 10)
            except (TypeError, ValueError):
                raise CloudError(400, f"field 'disk': must be a number, got {body.get('disk')!r}", "invalid_args") \
                    from None
            if not 0 < disk < 1e6:
                raise CloudError(400, f"field 'disk': must be a positive size in GB, got {disk!r}", "invalid_args")
            storage_total = round(offer["storage_cost"] * disk / HOURS_PER_MONTH, 6)
            env = body.get("env") or {}
            self.instances[iid] = {
                "id": iid, "machine_id": offer["machine_id"], "host_id": offer["host_id"],
                "actual_status": "loading", "cur_state": "running", "intended_status": "running",
                "next_state": "running", "status_msg": "pulling image", "start_date": now, "end_date": None,
                "dph_base": offer["dph_base"], "dph_total": round(offer["dph_base"] + storage_total, 6),
                "storage_cost": offer["storage_cost"], "storage_total_cost": storage_total,
                "disk_space": disk, "disk_util": 0.0, "gpu_name": offer["gpu_name"], "num_gpus": offer["num_gpus"],
                "gpu_ram": offer["gpu_ram"], "gpu_util": 0.0, "gpu_temp": 40.0, "cpu_util": 0.0,
                "cpu_cores": offer["cpu_cores"], "cpu_ram": offer["cpu_ram"], "cuda_max_good": offer["cuda_max_good"],
                "reliability2": offer["reliability2"], "geolocation": offer["geolocation"],
                "inet_up": offer["inet_up"], "inet_down": offer["inet_down"],
                "ssh_host": None, "ssh_port": None, "ssh_idx": "1", "public_ipaddr": self.ssh_host,
                "direct_port_start": -1, "direct_port_end": -1, "ports": {},
                "label": body.get("label"), "image_uuid": body.get("image"), "image_args": body.get("args") or [],
                "onstart": body.get("onstart"), "extra_env": [[k, str(v)] for k, v in env.items()],
                "image_runtype": str(body.get("runtype") or "ssh"),
                "template_hash_id": body.get("template_hash_id"), "is_bid": body.get("price") is not None,
                "min_bid": offer["min_bid"], "verification": "verified", "time_remaining": "",
            }
            self._billed[iid], self._billed_at[iid] = 0.0, now
            self._container_keys[iid] = "ck_" + secrets.token_hex(16)
            if self.workspace_base is not None:
                self.workspace(iid).mkdir(parents=True, exist_ok=True)
            self._tick()
            return iid

    def get(self, iid: int) -> dict | None:
        with self.lock:
            self._tick()
            row = self.instances.get(iid)
            return dict(row) if row else None

    def list(self, select_filters: dict, order_by: list, limit: int, after_token: str | None) -> dict:
        with self.lock:
            self._tick()
            rows = [dict(r) for r in self.instances.values() if matches(r, select_filters or {})]
        rows = _sort(rows, order_by or [{"col": "id", "dir": "asc"}])
        start = 0
        if after_token:
            try:
                start = int(json.loads(base64.urlsafe_b64decode(after_token.encode()))["offset"])
            except (ValueError, KeyError, TypeError):
                raise CloudError(400, "bad after_token", "invalid_args") from None
        limit = max(1, min(int(limit or self.page_size), self.page_size))
        page = rows[start:start + limit]
        more = start + limit < len(rows)
        token = base64.urlsafe_b64encode(json.dumps({"offset": start + limit}).encode()).decode() if more else None
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["label"] or ""] = counts.get(r["label"] or "", 0) + 1
        return {"instances": page, "next_token": token, "total_instances": len(rows), "label_counts": counts}

    def update(self, iid: int, body: dict) -> None:
        with self.lock:
            row = self.instances.get(iid)
            if row is None:
                raise CloudError(404, f"instance {iid} not found", "no_such_instance")
            if body.get("state") not in (None, "running", "stopped"):
                raise CloudError(400, f"field 'state': must be 'running' or 'stopped', got {body['state']!r}",
                                 "invalid_args")
            if "label" in body and not isinstance(body["label"], (str, type(None))):
                raise CloudError(400, f"field 'label': must be a string, got {body['label']!r}", "invalid_args")
            now = self.clock()
            self._accrue(iid, now)
            if "label" in body:
                row["label"] = body["label"]
            state = body.get("state")
            if state == "stopped":
                row.update(actual_status="stopped", cur_state="stopped", intended_status="stopped",
                           status_msg="stopped", gpu_util=0.0)
                if self.workspace_base is not None:
                    _kill_processes_in(self.workspace(iid))
            elif state == "running" and row["actual_status"] == "stopped":
                row.update(actual_status="running", cur_state="running", intended_status="running",
                           status_msg="success, running")

    def _remove(self, iid: int, how: str) -> None:
        self._accrue(iid, self.clock())
        del self.instances[iid]
        self.gone[iid] = how
        if self.workspace_base is not None:
            ws = self.workspace(iid)
            _kill_processes_in(ws)
            shutil.rmtree(ws, ignore_errors=True)

    def destroy(self, iid: int) -> bool:
        """False: the destroy was not carried out (``destroy_unsuccessful``)."""
        with self.lock:
            if iid not in self.instances:
                raise CloudError(404, f"instance {iid} not found", "no_such_instance")
            if self.faults.destroy_fail > 0:
                self.faults.destroy_fail -= 1
                raise CloudError(500, f"destroy of instance {iid} failed on the host; try again", "server_error")
            if self.faults.destroy_unsuccessful > 0:
                self.faults.destroy_unsuccessful -= 1
                return False
            self._remove(iid, "destroyed")
            return True

    def offline(self, iid: int) -> None:
        """The host goes down: the instance stays listed (``offline``), its processes stop,
        its disk is kept (billed as storage) and SSH no longer answers."""
        with self.lock:
            row = self.instances[iid]
            self._accrue(iid, self.clock())
            row.update(actual_status="offline", cur_state="stopped", status_msg="host offline", gpu_util=0.0,
                       ssh_port=_closed_port())
            if self.workspace_base is not None:
                _kill_processes_in(self.workspace(iid))

    def online(self, iid: int) -> None:
        """The host is back: the instance runs again (its trainer does not restart by itself)."""
        with self.lock:
            row = self.instances[iid]
            self._accrue(iid, self.clock())
            row.update(actual_status="running", cur_state="running", intended_status="running",
                       status_msg="success, running", ssh_host=self.ssh_host, ssh_port=self.ssh_port)

    def vanish(self, iid: int) -> None:
        """The host dies: the instance, its processes and its disk are gone, billing stops."""
        with self.lock:
            if iid in self.instances:
                self._remove(iid, "vanished")

    def user(self) -> dict:
        return {"id": 4242, "username": "emulated", "email": "user@example.invalid",
                "credit": round(self.credit - self.billed(), 4), "balance": 0.0,
                "host_agreement_accepted": False, "can_pay": True, "ssh_key": ""}

    def filters(self) -> list[dict]:
        with self.lock:
            return [{"actual_status": r["actual_status"], "verification": r["verification"],
                     "gpu_name": r["gpu_name"]} for r in self.instances.values()]


# --------------------------------------------------------------------------- HTTP

_ROUTES = [
    ("POST", re.compile(r"^/api/v0/bundles/?$"), "search"),
    ("PUT", re.compile(r"^/api/v0/search/asks/?$"), "search_asks"),
    ("PUT", re.compile(r"^/api/v0/asks/(\d+)/?$"), "create"),
    ("GET", re.compile(r"^/api/v1/instances/?$"), "list"),
    ("GET", re.compile(r"^/api/v0/instances/filters/?$"), "filters"),
    ("GET", re.compile(r"^/api/v0/instances/(\d+)/?$"), "get"),
    ("PUT", re.compile(r"^/api/v0/instances/(\d+)/?$"), "update"),
    ("DELETE", re.compile(r"^/api/v0/instances/(\d+)/?$"), "destroy"),
    ("POST", re.compile(r"^/api/v0/asks/bulk/?$"), "create_bulk"),
    ("DELETE", re.compile(r"^/api/v0/instances/?$"), "destroy_bulk"),
    ("PUT", re.compile(r"^/api/v0/instances/?$"), "update_bulk"),
    ("GET", re.compile(r"^/api/v0/users/current/?$"), "user"),
]


def _query_json(qs: dict, name: str, default):
    if name not in qs:
        return default
    try:
        return json.loads(qs[name][0])
    except ValueError:
        raise CloudError(400, f"query parameter {name!r} is not JSON", "invalid_args") from None


class _Handler(BaseHTTPRequestHandler):
    cloud: Cloud
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # no access log: requests carry the API key header
        pass

    def _send(self, status: int, obj, headers: dict | None = None) -> None:
        data = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        try:
            self.wfile.write(data)
        except (BrokenPipeError, ConnectionResetError):  # the client gave up: nothing to answer
            self.close_connection = True

    def _body(self) -> dict:
        if hasattr(self, "_read_body"):
            return self._read_body
        raw = self.headers.get("Content-Length")
        try:
            n = int(raw or 0)
        except ValueError:
            n = -1
        if n < 0 or n > 16 << 20:
            self.close_connection = True
            raise CloudError(400, f"bad Content-Length {raw!r}", "invalid_request")
        data = self.rfile.read(n) if n else b""
        if not data.strip():
            body = {}
        else:
            try:
                body = json.loads(data)
            except (ValueError, UnicodeDecodeError):
                raise CloudError(400, "request body is not JSON", "invalid_args") from None
        if not isinstance(body, dict):
            raise CloudError(400, f"request body must be a JSON object, got {type(body).__name__}", "invalid_args")
        self._read_body = body
        return body

    def _admin(self, method: str, path: str) -> None:
        c = self.cloud
        if method == "POST" and path == "/_emulator/faults":
            body = self._body()
            with c.lock:
                for k, v in body.items():
                    if not hasattr(c.faults, k):
                        raise CloudError(400, f"unknown fault knob {k!r}", "invalid_args")
                    setattr(c.faults, k, type(getattr(c.faults, k))(v))
            return self._send(200, asdict(c.faults))
        m = re.match(r"^/_emulator/(vanish|offline)/(\d+)$", path)
        if method == "POST" and m:
            getattr(c, m.group(1))(int(m.group(2)))
            return self._send(200, {"success": True})
        if method == "GET" and path == "/_emulator/billing":
            return self._send(200, {"total_usd": c.billed(),
                                    "instances": {str(i): c.billed(i) for i in list(c._billed)}})
        raise CloudError(404, f"no such emulator endpoint {path}", "not_found")

    def _handle(self, method: str) -> None:
        c = self.cloud
        url = urlsplit(self.path)
        path, qs = url.path, parse_qs(url.query)
        self.__dict__.pop("_read_body", None)  # one handler serves every request of a keep-alive connection
        try:
            self._body()  # read (and check) it now: an unread body would corrupt the next request
            if path.startswith("/_emulator/"):
                return self._admin(method, path)
            with c.lock:
                c.requests.append((method, path))
                f = c.faults
                slow = f.slow_s
                if f.rate_limit > 0:
                    f.rate_limit -= 1
                    return self._send(429, {"success": False, "error": "too_many_requests",
                                            "msg": "API requests too frequent"},
                                      {"Retry-After": f"{f.retry_after:g}"})
                if f.server_errors > 0:
                    f.server_errors -= 1
                    return self._send(f.error_status, {"success": False, "error": "server_error",
                                                       "msg": "internal error (emulated)"})
            if slow:
                time.sleep(slow)
            auth = self.headers.get("Authorization", "")
            own = c.key_instance(auth[7:]) if auth.startswith("Bearer ") else None
            if own is not None:  # an instance's own key: that instance only, read / start / stop
                m = re.match(r"^/api/v0/instances/(\d+)/?$", path)
                if not m or int(m.group(1)) != own or method not in ("GET", "PUT") or \
                        (method == "PUT" and set(self._body()) - {"state"}):
                    raise CloudError(403, "an instance's own key may only read, start and stop that instance",
                                     "forbidden")
            elif not auth.startswith("Bearer ") or (c.api_key is not None and auth[7:] != c.api_key):
                raise CloudError(401, "Invalid or missing API key", "invalid_api_key")
            for m, pattern, name in _ROUTES:
                match = pattern.match(path)
                if match and m == method:
                    return getattr(self, "_" + name)(*[int(g) for g in match.groups()], qs=qs)
            raise CloudError(404, f"{method} {path}: no such endpoint", "not_found")
        except CloudError as e:
            self._send(e.status, {"success": False, "error": e.error, "msg": e.msg})
        except (ValueError, TypeError, KeyError, AttributeError, IndexError, OverflowError) as e:
            # a request the emulator could not make sense of: say so instead of dropping it
            self._send(400, {"success": False, "error": "invalid_request",
                             "msg": f"malformed request ({type(e).__name__}: {e})"})
        except Exception as e:
            self._send(500, {"success": False, "error": "server_error", "msg": f"{type(e).__name__}: {e}"})

    def _search(self, qs):
        return self._send(200, {"offers": self.cloud.search(self._body())})

    def _search_asks(self, qs):
        return self._send(200, {"offers": self.cloud.search(self._body().get("q") or {})})

    def _create(self, ask_id, qs):
        iid = self.cloud.create(ask_id, self._body())
        with self.cloud.lock:
            lost = self.cloud.faults.create_reply_lost > 0
            self.cloud.faults.create_reply_lost -= lost
        if lost:
            raise CloudError(500, "internal error (emulated; the instance was created)", "server_error")
        return self._send(200, {"success": True, "new_contract": iid})

    def _list(self, qs):
        page = self.cloud.list(_query_json(qs, "select_filters", {}), _query_json(qs, "order_by", None),
                               _query_json(qs, "limit", 25), qs.get("after_token", [None])[0])
        return self._send(200, page)

    def _filters(self, qs):
        return self._send(200, {"filters": self.cloud.filters()})

    def _get(self, iid, qs):
        return self._send(200, {"instances": self.cloud.get(iid)})

    def _update(self, iid, qs):
        self.cloud.update(iid, self._body())
        return self._send(200, {"success": True})

    def _destroy(self, iid, qs):
        self._body()
        if not self.cloud.destroy(iid):
            return self._send(200, {"success": False, "error": "destroy_failed",
                                    "msg": f"instance {iid} could not be destroyed right now"})
        return self._send(200, {"success": True})

    def _ids(self, key: str) -> list[int]:
        ids = self._body().get(key)
        if not isinstance(ids, list) or not ids or not all(isinstance(i, int) and not isinstance(i, bool)
                                                           for i in ids):
            raise CloudError(400, f"field {key!r}: must be a non-empty list of integer ids, got {ids!r}",
                             "invalid_args")
        return ids

    def _create_bulk(self, qs):
        body = self._body()
        results = []
        for ask in self._ids("ids"):
            try:
                results.append({"id": ask, "success": True, "new_contract": self.cloud.create(ask, body)})
            except CloudError as e:
                results.append({"id": ask, "success": False, "error": e.error, "msg": e.msg})
        return self._send(200, {"success": all(r["success"] for r in results), "results": results,
                                "new_contracts": [r["new_contract"] for r in results if r["success"]]})

    def _destroy_bulk(self, qs):
        results = []
        for iid in self._ids("instance_ids"):
            try:
                ok = self.cloud.destroy(iid)
                results.append({"id": iid, "success": ok} if ok else
                               {"id": iid, "success": False, "msg": f"instance {iid} could not be destroyed right now"})
            except CloudError as e:
                results.append({"id": iid, "success": False, "error": e.error, "msg": e.msg})
        return self._send(200, {"success": all(r["success"] for r in results), "results": results})

    def _update_bulk(self, qs):
        body = self._body()
        if body.get("state") not in ("running", "stopped"):
            raise CloudError(400, f"field 'state': must be 'running' or 'stopped', got {body.get('state')!r}",
                             "invalid_args")
        results = []
        for iid in self._ids("ids"):
            try:
                self.cloud.update(iid, {"state": body["state"]})
                results.append({"id": iid, "success": True})
            except CloudError as e:
                results.append({"id": iid, "success": False, "error": e.error, "msg": e.msg})
        return self._send(200, {"success": all(r["success"] for r in results), "results": results})

    def _user(self, qs):
        return self._send(200, self.cloud.user())

    def do_GET(self):
        self._handle("GET")

    def do_POST(self):
        self._handle("POST")

    def do_PUT(self):
        self._handle("PUT")

    def do_DELETE(self):
        self._handle("DELETE")


class Emulator:
    """The HTTP server around a Cloud, in a background thread (``with Emulator(cloud) as e``)."""

    def __init__(self, cloud: Cloud, host: str = "127.0.0.1", port: int = 0):
        handler = type("Handler", (_Handler,), {"cloud": cloud})
        self.cloud = cloud
        self.server = ThreadingHTTPServer((host, port), handler)
        self.server.daemon_threads = True
        self.thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> "Emulator":
        self.thread = threading.Thread(target=self.server.serve_forever, name="vast-emulator", daemon=True)
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> "Emulator":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def serve(port: int = 8765, api_key: str | None = None, ssh_host: str = "127.0.0.1", ssh_port: int = 22,
          workspace_base: str | None = None, boot_s: float = 5.0, log: Callable[[str], None] = print) -> None:
    """Run the emulator in the foreground until interrupted (`nko-ops vast emulator`)."""
    cloud = Cloud(api_key=api_key, ssh_host=ssh_host, ssh_port=ssh_port, workspace_base=workspace_base,
                  boot_s=boot_s)
    emu = Emulator(cloud, port=port)
    log(f"Vast API emulator on {emu.url} (ssh -> {ssh_host}:{ssh_port}"
        + (f", disks under {workspace_base}" if workspace_base else "") + ")")
    log(f"try: VAST_API_KEY=... vastai --url {emu.url} --raw show instances")
    try:
        emu.server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        emu.server.server_close()
