"""The sandbox's record of what it started (``sandbox.json`` beside its state.db) and how it
stops it: by pid, each one checked to still be the process it started (its start time in
/proc), so a recycled pid is never signalled."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
from pathlib import Path

from backend.sandbox import MARKER
from models.files import atomic_write_text


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat field 22), or None."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat[stat.rindex(")") + 2:].split()
    return int(fields[19])


def alive(pid: int, started: int | None = None) -> bool:
    """The process runs (not a zombie) and, when ``started`` is given, is the one started then."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    if stat[stat.rindex(")") + 2:].split()[0] == "Z":
        return False
    return started is None or start_time(pid) == started


class Record:
    """``sandbox.json``: processes (name -> pid, start time), ports, paths; rewritten whole
    after each change so a crash mid-start still leaves every started pid recorded."""

    def __init__(self, root: Path) -> None:
        self.path = root / MARKER
        self.data: dict = json.loads(self.path.read_text()) if self.path.exists() else \
            {"kind": "nko-ops sandbox", "created_at": time.time(), "processes": {}, "ports": {}}

    def save(self) -> None:
        atomic_write_text(self.path, json.dumps(self.data, indent=1))

    def add_process(self, name: str, pid: int, port: int | None = None) -> None:
        self.data["processes"][name] = {"pid": pid, "started": start_time(pid)}
        if port is not None:
            self.data["ports"][name] = port
        self.save()

    def running(self) -> dict[str, int]:
        return {name: p["pid"] for name, p in self.data["processes"].items() if alive(p["pid"], p.get("started"))}

    def stop_all(self, grace_s: float = 5.0, only: list[str] | None = None) -> list[str]:
        """SIGTERM every recorded process (of ``only``, when given) still alive, and their
        descendants, SIGKILL what is left after ``grace_s``; returns what was stopped, as
        'name (pid N)'."""
        procs = [(n, p) for n, p in self.data["processes"].items()
                 if (only is None or n in only) and alive(p["pid"], p.get("started"))]
        for name, p in list(procs):  # e.g. sshd's per-connection processes
            procs += [(f"{name} child", {"pid": c, "started": start_time(c)}) for c in descendants(p["pid"])]
        for _, p in procs:
            _signal(p["pid"], signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline and any(alive(p["pid"], p.get("started")) for _, p in procs):
            time.sleep(0.05)
        for _, p in procs:
            if alive(p["pid"], p.get("started")):
                _signal(p["pid"], signal.SIGKILL)
        for _, p in procs:
            _reap(p["pid"])
        self.data["processes"] = {n: p for n, p in self.data["processes"].items() if only is not None and n not in only}
        self.save()
        return [f"{n} (pid {p['pid']})" for n, p in procs]


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children, their children, ...), from /proc."""
    parents: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2:].split()[1])
        parents.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [pid]
    while todo:
        for child in parents.get(todo.pop(), []):
            out.append(child)
            todo.append(child)
    return out


def _signal(pid: int, sig: int) -> None:
    try:
        os.kill(pid, sig)
    except OSError:
        pass


def _reap(pid: int) -> None:
    """Collect a child's exit status (a process this one started), so it leaves no zombie."""
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    except OSError:
        pass


def listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.3):
            return True
    except OSError:
        return False
