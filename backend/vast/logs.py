"""Live logs of a run on an instance: read the new bytes of ``train.log`` and
``metrics.jsonl`` over SFTP and put them into state.db (train.log lines as events,
metrics records into ``metrics`` and the run row). Vast's own ``logs`` call returns a
snapshot, not a stream, so this is how a live tail works.

The byte offsets live in the run row (``log_offset``, ``metrics_offset``), so a follower
that reconnects, or a new process, resumes exactly after the last complete line it stored.
A file that became shorter was truncated by the trainer resuming from ``last.pt``: reading
restarts at its new end (metrics at 0: their upserts are idempotent). The offsets advance, in
memory as in the run row, only once the lines read are committed: a read that fails part way
(SSH drop) leaves them where they were, and the next poll reads the same lines again.
"""

from __future__ import annotations

import json
import posixpath
import time
from typing import Callable

import paramiko

from state import store
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

    def _read_new(self, remote: Remote, name: str) -> tuple[list[bytes], int]:
        """The complete lines after the stored offset of ``name``, and the offset after them."""
        path = posixpath.join(self.remote_dir, name)
        sftp = remote.sftp()
        off = self.offsets[name]
        try:
            size = sftp.stat(path).st_size
        except FileNotFoundError:
            return [], off
        except (OSError, paramiko.SSHException, EOFError) as e:
            remote.close()
            raise SSHError(f"{remote.target}: stat {path}: {e}") from None
        if size < off:
            off = 0 if name == "metrics.jsonl" else size
        if size == off:
            return [], off
        try:
            with sftp.open(path, "rb") as f:
                f.seek(off)
                chunk = f.read(min(size - off, MAX_READ))
        except (OSError, paramiko.SSHException, EOFError) as e:
            remote.close()
            raise SSHError(f"{remote.target}: read {path}: {e}") from None
        end = chunk.rfind(b"\n") + 1  # complete lines only
        return chunk[:end].splitlines(), off + end

    def poll(self, remote: Remote) -> int:
        """Ingest what is new; returns the number of lines stored."""
        log_lines, log_end = self._read_new(remote, "train.log")
        raw_metrics, metrics_end = self._read_new(remote, "metrics.jsonl")
        offsets = {"train.log": log_end, "metrics.jsonl": metrics_end}
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
        texts = [raw.decode("utf-8", errors="replace") for raw in log_lines]
        events += [{"run_id": self.run_id, "instance_id": self.instance_id, "source": "trainer", "kind": "log",
                    "message": text[:2000]} for text in texts]
        if records or events:
            with store.transaction(self.db):
                store.add_metrics(self.db, self.run_id, records, log_offset=offsets["train.log"],
                                  metrics_offset=offsets["metrics.jsonl"], **fields)
                store.add_events(self.db, events)
        self.offsets = offsets
        if self.echo:
            for text in texts:
                self.echo(text)
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
