"""Live logs of a run on an instance: read the new bytes of ``train.log`` and
``metrics.jsonl`` over SFTP and put them into state.db (train.log lines as events,
metrics records into ``metrics`` and the run row). Vast's own ``logs`` call returns a
snapshot, not a stream, so this is how a live tail works.

The byte offsets live in the run row (``log_offset``, ``metrics_offset``), so a follower
that reconnects, or a new process, resumes exactly after the last complete line it stored.
A file that became shorter was truncated by the trainer resuming from ``last.pt``: reading
restarts at its new end (metrics at 0: their upserts are idempotent).
"""

from __future__ import annotations

import json
import posixpath
import time
from typing import Callable

import paramiko

from backend import store
from backend.vast.ssh import HostKeyChanged, Remote, SSHError

MAX_READ = 1 << 20
RUN_FIELDS = ("epoch", "step", "train_loss", "val_loss", "best_val_loss", "best_epoch")


class LogFollower:
    def __init__(self, db, run_id: str, remote_dir: str, instance_id: str | None = None,
                 echo: Callable[[str], None] | None = None):
        self.db, self.run_id, self.remote_dir, self.instance_id, self.echo = db, run_id, remote_dir, instance_id, echo
        row = store.get_run(db, run_id) or {}
        self.offsets = {"train.log": int(row.get("log_offset") or 0),
                        "metrics.jsonl": int(row.get("metrics_offset") or 0)}

    def _read_new(self, remote: Remote, name: str) -> list[bytes]:
        path = posixpath.join(self.remote_dir, name)
        sftp = remote.sftp()
        try:
            size = sftp.stat(path).st_size
        except FileNotFoundError:
            return []
        except (OSError, paramiko.SSHException, EOFError) as e:
            remote.close()
            raise SSHError(f"{remote.target}: stat {path}: {e}") from None
        off = self.offsets[name]
        if size < off:
            off = 0 if name == "metrics.jsonl" else size
        if size == off:
            self.offsets[name] = off
            return []
        try:
            with sftp.open(path, "rb") as f:
                f.seek(off)
                chunk = f.read(min(size - off, MAX_READ))
        except (OSError, paramiko.SSHException, EOFError) as e:
            remote.close()
            raise SSHError(f"{remote.target}: read {path}: {e}") from None
        end = chunk.rfind(b"\n") + 1  # complete lines only
        self.offsets[name] = off + end
        return chunk[:end].splitlines()

    def poll(self, remote: Remote) -> int:
        """Ingest what is new; returns the number of lines stored."""
        log_lines = self._read_new(remote, "train.log")
        raw_metrics = self._read_new(remote, "metrics.jsonl")
        records, fields, events = [], {}, []
        for raw in raw_metrics:
            try:
                rec = json.loads(raw)
            except (ValueError, UnicodeDecodeError):
                continue
            if not isinstance(rec, dict):
                continue
            records.append(rec)
            if rec.get("kind") in ("step", "epoch"):
                for k in RUN_FIELDS:
                    v = rec.get(k)
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        fields[k] = v
            elif rec.get("kind") == "status":
                events.append({"run_id": self.run_id, "instance_id": self.instance_id, "source": "trainer",
                               "kind": "trainer-status", "message": str(rec.get("status")), "data": rec,
                               "level": "error" if rec.get("status") == "failed" else "info"})
        for raw in log_lines:
            text = raw.decode("utf-8", errors="replace")
            events.append({"run_id": self.run_id, "instance_id": self.instance_id, "source": "trainer",
                           "kind": "log", "message": text[:2000]})
            if self.echo:
                self.echo(text)
        if not (records or events):
            return 0
        with store.transaction(self.db):
            store.add_metrics(self.db, self.run_id, records, log_offset=self.offsets["train.log"],
                              metrics_offset=self.offsets["metrics.jsonl"], **fields)
            store.add_events(self.db, events)
        return len(records) + len(log_lines)

    def follow(self, connect: Callable[[], Remote], done: Callable[[], bool], interval: float = 2.0,
               max_backoff: float = 60.0, on_error: Callable[[str], None] | None = None) -> None:
        """Poll until ``done()``; on a connection error reconnect with backoff and resume
        from the stored offsets."""
        backoff = interval
        remote = None
        while True:
            try:
                if remote is None:
                    remote = connect()
                self.poll(remote)
                backoff = interval
            except HostKeyChanged:
                raise
            except SSHError as e:
                if on_error:
                    on_error(f"{e}; reconnecting in {backoff:.0f} s")
                if remote is not None:
                    remote.close()
                remote = None
                time.sleep(backoff)
                backoff = min(backoff * 2, max_backoff)
                continue
            if done():
                if remote is not None:
                    remote.close()
                return
            time.sleep(interval)
