"""Checks before a Thunder launch, each one row of a pass/fail table:

* ssh          each host answers over ssh and runs its python
* python       one python path and one workdir for all hosts (mlx.launch passes one of each)
* code         the code the ranks and rank 0's AGP eval run (``CODE``: backend/thunder,
               agp and models python files, configs/agp) is in the workdir and the same on
               every host
* mlx, mlx-lm  the same versions on every host
* listen       each host can listen on its Thunderbolt IP at its ring port
* reach        each host reaches every *other* host's Thunderbolt IP at that port, checked
               from the hosts themselves (a TCP connect answered by the listener above)
* model, data, eval rows   present at the same path on every host with the same sha256

Everything runs on the hosts through ``Host`` (ssh, or locally for a ``local`` host)."""

from __future__ import annotations

import hashlib
import json
import select
import subprocess
import time
from dataclasses import asdict, dataclass

from backend.thunder.config import ClusterConfig
from backend.thunder.hosts import Host, cluster_hosts

# (directory under the workdir, file suffix or "" for every file): what the ranks run
# (backend/thunder) and what rank 0's AGP eval imports and reads (agp, models, configs/agp).
# Python files only where a checkout also holds __pycache__ (bytecode stamps differ per host).
CODE = (("backend/thunder", ".py"), ("agp", ".py"), ("models", ".py"), ("configs/agp", ""))

# Run on each host as `python - WORKDIR CODE_JSON NAME=PATH...`; prints one JSON object.
PROBE = r'''
import hashlib, json, os, platform, sys
workdir, code_dirs, specs = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3:]
out = {"hostname": platform.node(), "python": sys.executable, "python_version": platform.python_version()}
try:
    import mlx.core as mx
    out["mlx"] = mx.__version__
except Exception as e:
    out["mlx_error"] = f"{type(e).__name__}: {e}"
try:
    from importlib.metadata import version
    out["mlx_lm"] = version("mlx-lm")
except Exception as e:
    out["mlx_lm_error"] = f"{type(e).__name__}: {e}"

def sha(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()

def files(root, suffix=""):
    if os.path.isfile(root):
        return {os.path.basename(root): [os.path.getsize(root), sha(root)]}
    found = {}
    for d, dirs, names in os.walk(root):
        dirs[:] = sorted(x for x in dirs if not x.startswith(".") and x != "__pycache__")
        for n in sorted(names):
            if n.startswith(".") or not n.endswith(suffix):
                continue
            p = os.path.join(d, n)
            found[os.path.relpath(p, root)] = [os.path.getsize(p), sha(p)]
    return found

out["code"] = {}
for rel, suffix in code_dirs:
    d = os.path.join(workdir, rel)
    out["code"][rel] = files(d, suffix) if os.path.isdir(d) else None
out["paths"] = {}
for spec in specs:
    name, path = spec.split("=", 1)
    if not os.path.exists(path):
        out["paths"][name] = {"path": path, "exists": False}
    else:
        try:
            out["paths"][name] = {"path": path, "exists": True, "files": files(path)}
        except OSError as e:
            out["paths"][name] = {"path": path, "exists": False, "error": str(e)}
print(json.dumps(out))
'''

# `python - IP PORT SECONDS EXPECTED`: listen, answer EXPECTED connections with a banner, exit.
LISTENER = r'''
import socket, sys, time
ip, port, secs, expected = sys.argv[1], int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
s = socket.socket(socket.AF_INET6 if ":" in ip else socket.AF_INET, socket.SOCK_STREAM)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind((ip, port))
    s.listen(8)
except OSError as e:
    print("BINDFAIL", e, flush=True)
    sys.exit(0)
print("LISTENING", flush=True)
s.settimeout(0.5)
end, seen = time.time() + secs, 0
while seen < expected and time.time() < end:
    try:
        c, _ = s.accept()
    except socket.timeout:
        continue
    c.sendall(b"nko-ops-thunder\n")
    c.close()
    seen += 1
'''

# `python - IP PORT TIMEOUT`: connect and read the listener's banner.
CONNECT = r'''
import socket, sys
ip, port, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    with socket.create_connection((ip, port), timeout=timeout) as c:
        c.settimeout(timeout)
        banner = c.recv(64)
    print("OK" if banner.startswith(b"nko-ops-thunder") else f"FAIL unexpected answer {banner[:32]!r}")
except OSError as e:
    print(f"FAIL {type(e).__name__}: {e}")
'''


@dataclass
class Check:
    check: str
    host: str
    ok: bool | None  # None: skipped (an earlier check failed)
    detail: str

    @property
    def status(self) -> str:
        return "PASS" if self.ok else ("SKIP" if self.ok is None else "FAIL")


@dataclass
class PreflightResult:
    checks: list[Check]
    probes: dict[str, dict]

    @property
    def ok(self) -> bool:
        return all(c.ok is not False for c in self.checks) and any(c.ok for c in self.checks)

    def failed(self) -> list[Check]:
        return [c for c in self.checks if c.ok is False]

    def find(self, check: str, host: str | None = None) -> list[Check]:
        return [c for c in self.checks if c.check == check and (host is None or c.host == host)]

    def as_dict(self) -> dict:
        return {"ok": self.ok, "checks": [asdict(c) | {"status": c.status} for c in self.checks]}

    def table(self) -> str:
        rows = [("STATUS", "CHECK", "HOST", "DETAIL")] + [(c.status, c.check, c.host, c.detail) for c in self.checks]
        w = [max(len(r[i]) for r in rows) for i in range(3)]
        lines = [f"{r[0]:<{w[0]}}  {r[1]:<{w[1]}}  {r[2]:<{w[2]}}  {r[3]}" for r in rows]
        verdict = "preflight PASSED" if self.ok else f"preflight FAILED ({len(self.failed())} failing check(s))"
        return "\n".join(lines + ["", verdict])


def ring_port(cluster: ClusterConfig, rank: int) -> int:
    """The port rank ``rank`` listens on in the ring (mlx.launch: starting port + 1 per rank and IP)."""
    return cluster.starting_port + rank


def _short(text: str, n: int = 160) -> str:
    lines = [ln for ln in text.strip().splitlines() if ln.strip()]
    s = lines[-1] if lines else ""
    return s if len(s) <= n else s[: n - 1] + "…"


def _path_specs(cluster: ClusterConfig) -> dict[str, str]:
    specs = {"model": cluster.model, "data": cluster.data}
    if cluster.eval.enabled and cluster.eval.rows:
        specs["eval rows"] = cluster.eval.rows
    return specs


def _digest(files: dict) -> str:
    return hashlib.sha256("\n".join(f"{k}\t{v[1]}" for k, v in sorted(files.items())).encode()).hexdigest()


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _compare_versions(checks: list[Check], probes: dict[str, dict], key: str, label: str) -> None:
    got = {h: p.get(key) for h, p in probes.items()}
    broken = {h: p.get(f"{key}_error") for h, p in probes.items() if p.get(key) is None}
    if broken:
        checks.append(Check(label, ",".join(broken), False,
                            "; ".join(f"{h}: not importable ({e})" for h, e in broken.items())))
        return
    versions = sorted(set(got.values()))
    detail = ", ".join(f"{h} {v}" for h, v in got.items())
    if len(versions) == 1:
        checks.append(Check(label, "all", True, f"{versions[0]} on every host"))
    else:
        checks.append(Check(label, "all", False, f"versions differ: {detail}"))


def _compare_paths(checks: list[Check], probes: dict[str, dict], name: str, path: str) -> None:
    entries = {h: p["paths"].get(name, {}) for h, p in probes.items()}
    missing = [h for h, e in entries.items() if not e.get("exists")]
    if missing:
        checks.append(Check(name, ",".join(missing), False, f"{path} missing on {', '.join(missing)}"))
        return
    empty = [h for h, e in entries.items() if not e["files"]]
    if empty:
        checks.append(Check(name, ",".join(empty), False, f"{path} has no files on {', '.join(empty)}"))
        return
    digests = {h: _digest(e["files"]) for h, e in entries.items()}
    if len(set(digests.values())) == 1:
        files = next(iter(entries.values()))["files"]
        size = sum(v[0] for v in files.values())
        checks.append(Check(name, "all", True, f"{path}: sha256 {next(iter(digests.values()))[:16]} "
                                              f"({len(files)} file(s), {_size(size)}) on every host"))
        return
    checks.append(Check(name, "all", False, f"{path} differs between hosts: "
                                            + _file_diffs({h: e["files"] for h, e in entries.items()})))


def _file_diffs(listings: dict[str, dict]) -> str:
    """The first files that differ from the first host's listing, with their short hashes."""
    ref_host, ref = next(iter(listings.items()))
    diffs = []
    for h, files in listings.items():
        if h == ref_host:
            continue
        for rel in sorted(set(ref) | set(files)):
            a, b = ref.get(rel), files.get(rel)
            if a != b:
                diffs.append(f"{rel}: {ref_host} {a[1][:12] if a else 'absent'}, {h} {b[1][:12] if b else 'absent'}")
    more = f" (+{len(diffs) - 3} more)" if len(diffs) > 3 else ""
    return "; ".join(diffs[:3]) + more


def _compare_code(checks: list[Check], probes: dict[str, dict], workdir: str) -> None:
    codes = {h: p.get("code") or {} for h, p in probes.items()}
    missing = {h: [d for d, _ in CODE if c.get(d) is None] for h, c in codes.items()}
    missing = {h: dirs for h, dirs in missing.items() if dirs}
    if missing:
        checks.append(Check("code", ",".join(missing), False, "; ".join(
            f"{h}: {', '.join(f'{workdir}/{d}' for d in dirs)} missing" for h, dirs in missing.items())))
        return
    listings = {h: {f"{d}/{rel}": v for d, files in c.items() for rel, v in files.items()} for h, c in codes.items()}
    digests = {h: _digest(files) for h, files in listings.items()}
    names = ", ".join(d for d, _ in CODE)
    if len(set(digests.values())) == 1:
        files = next(iter(listings.values()))
        checks.append(Check("code", "all", True, f"{names} identical on every host ({len(files)} files in "
                                                 f"{workdir}, sha256 {next(iter(digests.values()))[:16]})"))
    else:
        checks.append(Check("code", "all", False, "code differs between hosts (update the checkouts): "
                                                  + _file_diffs(listings)))


def _read_line(proc, timeout: float) -> str:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        r, _, _ = select.select([proc.stdout], [], [], 0.2)
        if r:
            return proc.stdout.readline().strip()
        if proc.poll() is not None:
            return proc.stdout.readline().strip()
    return ""


def check_reach(cluster: ClusterConfig, hosts: list[Host], usable: list[str], timeout: float = 5.0) -> list[Check]:
    """Listen on each host's Thunderbolt IP at its ring port; connect to it from every other host."""
    checks: list[Check] = []
    for rank, target in enumerate(hosts):
        ip, port = target.cfg.ip, ring_port(cluster, rank)
        peers = [h for h in hosts if h is not target]
        if target.name not in usable:
            checks.append(Check("listen", target.name, None, f"{ip}:{port}: host not reachable over ssh"))
            checks += [Check("reach", f"{p.name}->{target.name}", None, f"{ip}:{port}: {target.name} not usable")
                       for p in peers]
            continue
        listen_s = timeout * (len(peers) + 2) + 10
        proc = target.popen(target.python_command([ip, str(port), str(listen_s), str(len(peers))]),
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            proc.stdin.write(LISTENER)
            proc.stdin.close()
            first = _read_line(proc, timeout + 10)
            listening = first == "LISTENING"
            if listening:
                checks.append(Check("listen", target.name, True, f"listens on {ip}:{port}"))
            else:
                why = first.removeprefix("BINDFAIL").strip() or "no answer from the listener"
                checks.append(Check("listen", target.name, False,
                                    f"cannot listen on {ip}:{port} ({why}); is {ip} this host's Thunderbolt IP "
                                    "and the port free?"))
            for peer in peers:
                label = f"{peer.name}->{target.name}"
                if peer.name not in usable:
                    checks.append(Check("reach", label, None, f"{peer.name} not reachable over ssh"))
                    continue
                r = peer.run_python(CONNECT, [ip, str(port), str(timeout)], timeout=timeout + 30)
                answer = r.stdout.strip()
                if answer == "OK":
                    checks.append(Check("reach", label, True, f"{peer.name} reaches {ip}:{port}"))
                else:
                    why = answer.removeprefix("FAIL").strip() or _short(r.stderr) or f"exit {r.returncode}"
                    checks.append(Check("reach", label, False, f"{peer.name} cannot reach {ip}:{port}: {why}"))
        finally:
            try:
                proc.wait(timeout=timeout + 5)
            except Exception:
                proc.kill()
                proc.wait()
    return checks


def run_preflight(cluster: ClusterConfig, reach_timeout: float = 5.0) -> PreflightResult:
    hosts = cluster_hosts(cluster)
    checks: list[Check] = []
    probes: dict[str, dict] = {}
    specs = _path_specs(cluster)
    spec_args = [f"{k}={v}" for k, v in specs.items()]
    for h in hosts:
        r = h.run_python(PROBE, [cluster.workdir, json.dumps(CODE), *spec_args], timeout=3600)
        try:
            probe = json.loads(r.stdout.strip().splitlines()[-1]) if r.returncode == 0 else None
        except (json.JSONDecodeError, IndexError):
            probe = None
        how = "locally" if h.is_local else f"over ssh as {h.cfg.ssh}"
        if probe is None:
            why = _short(r.stderr) or f"exit {r.returncode}"
            checks.append(Check("ssh", h.name, False, f"cannot run {h.python} {how}: {why}"))
        else:
            probes[h.name] = probe
            checks.append(Check("ssh", h.name, True, f"{probe['hostname']}: runs {h.python} {how}"))
    usable = list(probes)

    pythons = {h.name: h.python for h in hosts}
    unprobed = [h.name for h in hosts if h.name not in probes]
    if len(set(pythons.values())) == 1 and unprobed:  # nothing ran there: no PASS for what was not seen
        checks.append(Check("python", "all", None, f"{cluster.python} not run on {', '.join(unprobed)} "
                                                   "(not reachable over ssh)"))
    elif len(set(pythons.values())) == 1:
        checks.append(Check("python", "all", True, f"{cluster.python} and workdir {cluster.workdir} on every host"))
    else:
        checks.append(Check("python", "all", False, "mlx.launch starts every rank with one --python; hosts differ: "
                            + ", ".join(f"{k} {v}" for k, v in pythons.items())))

    if len(probes) == len(hosts):
        _compare_code(checks, probes, cluster.workdir)
        _compare_versions(checks, probes, "mlx", "mlx")
        _compare_versions(checks, probes, "mlx_lm", "mlx-lm")
    else:
        for label in ("code", "mlx", "mlx-lm"):
            checks.append(Check(label, "all", None, "not every host could be probed"))

    checks += check_reach(cluster, hosts, usable, timeout=reach_timeout)

    for name, path in specs.items():
        if len(probes) == len(hosts):
            _compare_paths(checks, probes, name, path)
        else:
            checks.append(Check(name, "all", None, f"{path}: not every host could be probed"))
    return PreflightResult(checks, probes)
