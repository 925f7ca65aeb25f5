"""Checkpoint and artifact sync: pull every file of a run directory on an instance over
SFTP into a content-addressed local store, and optionally push the verified blobs to a
second SSH remote.

The store (``.nko-ops/vast/cas/sha256/ab/<sha256>``) never trusts a transfer: the sha256 is
computed on the instance, the bytes are hashed again while they arrive, and a blob enters
the store only when the two agree. Blobs are read-only and an existing hash is never
overwritten. A transfer that breaks off (SSH drop) resumes from the bytes already received;
one whose bytes disagree (file changed or truncated on the instance, corruption) is
discarded and retried from a fresh hash (the files listed after it take their fresh hashes
too: logs are listed after the checkpoints that record their offsets); a local write error
(disk full) removes the partial file. In every failure the artifact stays ``remote-only``,
so kill-idle refuses to destroy the instance holding it.

Per-artifact state in state.db ``artifacts`` (owner_kind 'run', name = path in the run dir):
remote-only -> transferring -> verified (-> mirrored), with its locations. One row per file:
when the file changes on the instance (a new ``last.pt``) the row takes the new hash before
the new bytes are verified, so the last verified version stays in its locations as a
``{"kind": "previous-verified", "sha256", "size", "path"}`` entry until the new one is
verified (``Syncer.last_verified``): a transfer cut off by a dying instance never leaves the
run without a verified checkpoint.
"""

from __future__ import annotations

import errno
import json
import os
import posixpath
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import paramiko

from models.files import sha256_file
from backend.vast.ssh import KnownHosts, Remote, SSHError, SSHTarget
from state import fleet as fleet_state
from state import store
from models.errors import NkoOpsError

CHUNK = 1 << 20


class SyncError(NkoOpsError, RuntimeError):
    pass


class IntegrityError(SyncError):
    """The bytes received do not hash to what the instance reported."""


class Gone(SyncError):
    """The file was deleted on the instance after it was listed (a temporary file): nothing
    of it is left to lose."""


class LocalStoreError(SyncError):
    """The local store cannot take the file (disk full, quota, read-only)."""


class _Dropped(Exception):
    def __init__(self, err: BaseException):
        self.err = err


class CAS:
    """Content-addressed store: ``root/sha256/<2 hex>/<sha256>``, blobs read-only."""

    def __init__(self, root: str | Path, reserve_bytes: int = 0):
        self.root = Path(root)
        self.reserve_bytes = reserve_bytes
        self.tmp = self.root / "tmp"

    def path(self, sha: str) -> Path:
        return self.root / "sha256" / sha[:2] / sha

    def has(self, sha: str, verify: bool = False) -> bool:
        p = self.path(sha)
        if not p.is_file():
            return False
        return not verify or sha256_file(p) == sha

    def partial(self, sha: str) -> Path:
        return self.tmp / f"{sha}.part"

    def check_space(self, need: int) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        free = os.statvfs(self.root)
        avail = free.f_bavail * free.f_frsize
        if avail - need < self.reserve_bytes:
            raise OSError(errno.ENOSPC, f"not enough space in {self.root}: {avail} bytes free, "
                                        f"{need} needed + {self.reserve_bytes} reserve")

    def commit(self, part: Path, sha: str) -> Path:
        """Move a fully received, already verified partial file into place (never over an
        existing blob) and make it read-only."""
        dest = self.path(sha)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if dest.exists():
            part.unlink()
            return dest
        os.chmod(part, 0o444)
        try:
            os.link(part, dest)  # fails if dest appeared meanwhile: the existing blob wins
        except FileExistsError:
            pass
        part.unlink()
        dirfd = os.open(dest.parent, os.O_RDONLY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
        return dest

    def put_file(self, src: Path) -> tuple[str, Path]:
        """Add a local file (used for inputs and tests); returns (sha256, blob path)."""
        sha = sha256_file(src)
        if not self.has(sha):
            self.tmp.mkdir(parents=True, exist_ok=True)
            part = self.tmp / f"{sha}.local.part"
            with open(src, "rb") as a, open(part, "wb") as b:
                for block in iter(lambda: a.read(CHUNK), b""):
                    b.write(block)
                b.flush()
                os.fsync(b.fileno())
            self.commit(part, sha)
        return sha, self.path(sha)


@dataclass
class Entry:
    name: str
    size: int
    sha256: str


@dataclass
class SyncReport:
    run_id: str
    verified: list[Entry] = field(default_factory=list)
    pulled: list[Entry] = field(default_factory=list)
    failed: list[tuple[Entry, str]] = field(default_factory=list)
    mirrored: list[Entry] = field(default_factory=list)
    bytes: int = 0

    @property
    def ok(self) -> bool:
        return not self.failed

    def __str__(self) -> str:
        s = (f"{self.run_id}: {len(self.verified)} file(s) verified locally ({len(self.pulled)} pulled, "
             f"{self.bytes} bytes)")
        if self.mirrored:
            s += f", {len(self.mirrored)} mirrored"
        if self.failed:
            s += f"; {len(self.failed)} NOT synced: " + "; ".join(f"{e.name} ({why})" for e, why in self.failed)
        return s


HASH_REFUSED = 3  # the helper's exit status when it cannot vouch for every file
PREVIOUS = "previous-verified"  # location kind: the last verified version of a changed file


def remote_entries(remote: Remote, python: str, helper: str, directory: str,
                   missing_ok: bool = True) -> list[Entry]:
    """Files under ``directory`` on the instance with their sizes and sha256 (computed there).
    A file that cannot be read or keeps changing raises SyncError, never a shorter listing;
    so does a missing ``directory`` unless ``missing_ok`` (then it lists as [])."""
    r = remote.run([python, helper, "hash", *(["--missing-ok"] if missing_ok else []), directory], timeout=1800)
    if r.rc == HASH_REFUSED:
        raise SyncError(f"{remote.target}: cannot vouch for the files under {directory}: {r.err.strip()[-500:]}")
    r.check("hashing on the instance")
    try:
        return [Entry(e["name"], int(e["size"]), e["sha256"]) for e in json.loads(r.out or "[]")]
    except (ValueError, KeyError, TypeError):
        raise SyncError(f"{remote.target}: unreadable hash listing of {directory}") from None


class Syncer:
    def __init__(self, db, cas: CAS, log: Callable[[str], None] = lambda s: None,
                 attempts: int = 3, mirror: "Mirror | None" = None):
        self.db, self.cas, self.log, self.attempts, self.mirror = db, cas, log, attempts, mirror
        # Test seams: how a block is read from the instance and written locally.
        self.read_block: Callable[[paramiko.SFTPFile, int], bytes] = lambda f, n: f.read(n)
        self.write_block: Callable[[object, bytes], None] = lambda f, b: f.write(b)

    # ------------------------------------------------------------------ state.db

    def _row(self, run_id: str, name: str) -> dict | None:
        return fleet_state.artifact(self.db, run_id, name)

    def record(self, run_id: str, e: Entry, state: str, instance_id: str | None, remote_path: str | None,
                extra_locations: list[dict] = (), path: str | None = None) -> None:
        row = self._row(run_id, e.name)
        old = json.loads(row["locations"] or "[]") if row else []
        if row and row["sha256"] == e.sha256:
            locations = [loc for loc in old
                         if loc.get("kind") != "instance" or loc.get("instance_id") != str(instance_id)]
        else:  # another version: the last verified one stays known until this one is verified
            locations = [loc for loc in old if loc.get("kind") == PREVIOUS]
            if row and row["sync_state"] in ("verified", "mirrored") and self.cas.has(row["sha256"]):
                locations = [{"kind": PREVIOUS, "sha256": row["sha256"], "size": row["size"],
                              "path": str(self.cas.path(row["sha256"])), "verified_at": row["verified_at"]}]
        if state in ("verified", "mirrored"):
            locations = [loc for loc in locations if loc.get("kind") != PREVIOUS]
        if instance_id is not None and remote_path is not None:
            locations.append({"kind": "instance", "instance_id": str(instance_id), "path": remote_path})
        if state in ("verified", "mirrored"):
            blob = str(self.cas.path(e.sha256))
            if not any(loc.get("kind") == "cas" for loc in locations):
                locations.append({"kind": "cas", "path": blob})
        for loc in extra_locations:
            if loc not in locations:
                locations.append(loc)
        if path is None and row and row["sha256"] == e.sha256 and row["path"]:
            path = row["path"]
        stamp = store.now()
        verified_at = stamp if state in ("verified", "mirrored") else None
        if row and row["sha256"] == e.sha256 and state == "verified" and row["sync_state"] == "mirrored":
            state = "mirrored"
        store.record_artifacts(self.db, run_id, [{
            "name": e.name, "path": path or (str(self.cas.path(e.sha256)) if verified_at else None), "sha256": e.sha256,
            "size": e.size, "locations": locations, "sync_state": state, "verified_at": verified_at}])

    def _forget_unverified(self, run_id: str, name: str) -> None:
        """Drop the row of a file that vanished from the instance before any version of it
        was verified (a listing of a temporary file); a row with a verified version stays."""
        if self.last_verified(run_id, name) is None:
            fleet_state.forget_unverified(self.db, run_id, name)

    def last_verified(self, run_id: str, name: str) -> Entry | None:
        """The newest version of a run's file that was verified into the store (the current
        one, or the one before a change not verified yet); None if none is in the store."""
        row = self._row(run_id, name)
        if row is None:
            return None
        if row["sync_state"] in ("verified", "mirrored") and self.cas.has(row["sha256"]):
            return Entry(name, row["size"], row["sha256"])
        prev = next((loc for loc in json.loads(row["locations"] or "[]") if loc.get("kind") == PREVIOUS), None)
        if prev and self.cas.has(prev["sha256"]):
            return Entry(name, int(prev["size"]), prev["sha256"])
        return None

    # ------------------------------------------------------------------ pulling

    def pull(self, remote: Remote, remote_path: str, e: Entry) -> int:
        """Bring one file into the store; returns bytes transferred. Resumes a partial
        transfer after an SSH drop (reconnecting); raises IntegrityError (bytes differ),
        LocalStoreError (cannot write here: the partial file is removed) or SyncError."""
        self.cas.tmp.mkdir(parents=True, exist_ok=True)
        part = self.cas.partial(e.sha256)
        sent, drops = 0, 0
        while True:
            have = part.stat().st_size if part.exists() else 0
            if have > e.size:
                part.unlink()
                have = 0
            try:
                f_remote = self._open(remote, remote_path, e, part, have)
            except _Dropped as d:
                drops = self._dropped(remote, e, part, drops, d.err)
                continue
            try:
                self._append(f_remote, part, e, have)
            except _Dropped as d:
                sent += part.stat().st_size - have  # what arrived before the drop stays
                drops = self._dropped(remote, e, part, drops, d.err)
                continue
            except LocalStoreError:
                part.unlink(missing_ok=True)
                raise
            finally:
                try:
                    f_remote.close()
                except Exception:
                    pass
            sent += part.stat().st_size - have
            break
        self._commit_verified(part, e)
        return sent

    def _open(self, remote: Remote, remote_path: str, e: Entry, part: Path, have: int) -> paramiko.SFTPFile:
        """The file on the instance, open for reading, once the store has room for the rest of
        it; _Dropped when the connection failed (reconnect and resume)."""
        try:
            self.cas.check_space(e.size - have)
            return remote.sftp().open(remote_path, "rb")
        except OSError as err:
            if err.errno in (errno.ENOSPC, errno.EDQUOT):
                part.unlink(missing_ok=True)
                raise LocalStoreError(f"{e.name}: {err.strerror or err}") from None
            if err.errno == errno.ENOENT:
                raise Gone(f"{e.name}: gone from the instance") from None
            raise _Dropped(err) from None
        except (SSHError, paramiko.SSHException, EOFError) as err:
            raise _Dropped(err) from None

    def _append(self, f_remote: paramiko.SFTPFile, part: Path, e: Entry, have: int) -> None:
        """Copy the rest of the file (from byte ``have``) to the end of ``part``, synced to disk."""
        with open(part, "ab") as out:
            f_remote.seek(have)
            if e.size - have > 4 * CHUNK:
                f_remote.prefetch(e.size)  # pipelined reads: latency, not bandwidth, bounds SFTP
            left = e.size - have
            while left > 0:
                try:
                    block = self.read_block(f_remote, min(CHUNK, left))
                except (paramiko.SSHException, EOFError, OSError) as err:
                    raise _Dropped(err) from None
                if not block:
                    part.unlink()
                    raise IntegrityError(f"{e.name}: the file on the instance is shorter than the "
                                         f"{e.size} bytes it was hashed at (truncated or replaced)")
                try:
                    self.write_block(out, block)
                except OSError as err:
                    raise LocalStoreError(f"{e.name}: cannot write to {self.cas.root}: "
                                          f"{err.strerror or err}") from None
                left -= len(block)
            try:
                out.flush()
                os.fsync(out.fileno())
            except OSError as err:
                raise LocalStoreError(f"{e.name}: cannot write to {self.cas.root}: {err.strerror or err}") from None

    def _commit_verified(self, part: Path, e: Entry) -> None:
        """Move a complete transfer into the store once its bytes hash as the instance said."""
        got = sha256_file(part)
        if got != e.sha256:
            part.unlink()
            raise IntegrityError(f"{e.name}: received bytes hash to {got[:12]}…, the instance reported "
                                 f"{e.sha256[:12]}…")
        self.cas.commit(part, e.sha256)

    def _dropped(self, remote: Remote, e: Entry, part: Path, drops: int, err: BaseException) -> int:
        drops += 1
        kept = part.stat().st_size if part.exists() else 0
        if drops > self.attempts:
            raise SyncError(f"{e.name}: connection kept dropping ({type(err).__name__}: {err}); {kept} of "
                            f"{e.size} bytes kept for resuming") from None
        self.log(f"{e.name}: transfer interrupted ({type(err).__name__}); reconnecting to resume at {kept} bytes")
        remote.close()
        time.sleep(min(0.5 * drops, 5))
        return drops

    def sync_dir(self, remote: Remote, python: str, helper: str, run_id: str, remote_dir: str,
                 instance_id: str | None, entries: list[Entry] | None = None) -> SyncReport:
        """Pull every file of ``remote_dir`` (a run directory on the instance); ``entries``:
        its listing when the caller just hashed it."""
        rep = SyncReport(run_id)
        if entries is None:
            try:
                entries = remote_entries(remote, python, helper, remote_dir)
            except SSHError as err:
                raise SyncError(f"{run_id}: cannot list {remote_dir} on {remote.target}: {err}") from None
        queue = list(entries)
        for i in range(len(queue)):
            e = queue[i]
            rpath = posixpath.join(remote_dir, e.name)
            if self.cas.has(e.sha256):
                self.record(run_id, e, "verified", instance_id, rpath)
                rep.verified.append(e)
                continue
            self.record(run_id, e, "remote-only", instance_id, rpath)
            cur = e
            for attempt in range(1, self.attempts + 1):
                self.record(run_id, cur, "transferring", instance_id, rpath)
                try:
                    rep.bytes += self.pull(remote, rpath, cur)
                except IntegrityError as err:
                    self.record(run_id, cur, "remote-only", instance_id, rpath)
                    if attempt == self.attempts:
                        rep.failed.append((cur, str(err)))
                        break
                    self.log(f"{err}; hashing it again")
                    try:
                        fresh = {x.name: x for x in remote_entries(remote, python, helper, remote_dir)}
                    except (SSHError, SyncError) as again:
                        rep.failed.append((cur, f"{err}; hashing it again failed: {again}"))
                        break
                    # the files after it too: a log must not be older than the checkpoint (listed
                    # first) that records its offset, or resuming from that checkpoint fails
                    queue[i + 1:] = [fresh.get(x.name, x) for x in queue[i + 1:]]
                    if cur.name not in fresh:
                        rep.failed.append((cur, "gone from the instance"))
                        break
                    cur = fresh[cur.name]
                    if self.cas.has(cur.sha256):
                        break
                    continue
                except Gone:  # deleted since it was listed (a .tmp renamed into place): not a loss
                    self._forget_unverified(run_id, cur.name)
                    break
                except SyncError as err:
                    self.record(run_id, cur, "remote-only", instance_id, rpath)
                    rep.failed.append((cur, str(err)))
                    break
                rep.pulled.append(cur)
                break
            if self.cas.has(cur.sha256):
                self.record(run_id, cur, "verified", instance_id, rpath)
                rep.verified.append(cur)
        if self.mirror is not None:
            for e in rep.verified:
                try:
                    if self.mirror.push(self.cas, e.sha256):
                        self.record(run_id, e, "mirrored", None, None,
                                     [{"kind": "mirror", "path": self.mirror.blob_path(e.sha256),
                                       "host": str(self.mirror.remote.target)}])
                        rep.mirrored.append(e)
                except (SSHError, SyncError, OSError) as err:
                    self.log(f"mirror push of {e.name} failed: {err}")
        return rep

    def unverified(self, remote: Remote, python: str, helper: str, remote_dir: str,
                   missing_ok: bool = True) -> list[Entry]:
        """Files on the instance (under ``remote_dir``) whose exact content is not in the store."""
        return [e for e in remote_entries(remote, python, helper, remote_dir, missing_ok)
                if not self.cas.has(e.sha256)]


class Mirror:
    """A second SSH remote holding a copy of the store's blobs (checked with sha256sum there)."""

    def __init__(self, target: SSHTarget, path: str, known: KnownHosts):
        self.remote = Remote(target, known)
        self.path = path

    def blob_path(self, sha: str) -> str:
        return posixpath.join(self.path, "sha256", sha[:2], sha)

    def push(self, cas: CAS, sha: str) -> bool:
        dest = self.blob_path(sha)
        r = self.remote.run(["sha256sum", dest], timeout=600)
        if r.rc == 0 and r.out.split()[:1] == [sha]:
            return True
        self.remote.run(["mkdir", "-p", posixpath.dirname(dest)], timeout=60).check("mkdir on the mirror")
        self.remote.put(cas.path(sha), dest + ".part")
        r = self.remote.run(["sha256sum", dest + ".part"], timeout=600).check("sha256sum on the mirror")
        if r.out.split()[:1] != [sha]:
            self.remote.run(["rm", "-f", dest + ".part"], timeout=60)
            raise SyncError(f"mirror copy of {sha[:12]}… arrived corrupted")
        self.remote.run(["mv", "-f", dest + ".part", dest], timeout=60).check("mv on the mirror")
        self.remote.run(["chmod", "0444", dest], timeout=60)
        return True
