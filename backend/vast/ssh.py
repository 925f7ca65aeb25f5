"""SSH to instances with paramiko.

Host keys: trust on first use, recorded in the project's own known_hosts
(``.nko-ops/vast/known_hosts``); afterwards strict. A server presenting a different key for a
known host:port is refused with HostKeyChanged, whose message says so plainly and gives both
fingerprints; nothing is sent to that server and the file is left as it was.

Commands are argument lists joined with ``shlex.join``: a run id with spaces, quotes or
``;`` stays one argument and cannot inject anything. Where shell syntax is needed
(redirections, ``&``) the caller builds the line from ``quote()``d pieces.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import shlex
import socket
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import paramiko

from backend.vast.config import expand
from models.errors import NkoOpsError


class SSHError(NkoOpsError, RuntimeError):
    pass


class HostKeyChanged(SSHError):
    pass


def quote(s: str | Path) -> str:
    return shlex.quote(str(s))


def fingerprint(key: paramiko.PKey) -> str:
    digest = hashlib.sha256(key.asbytes()).digest()
    return "SHA256:" + base64.b64encode(digest).decode().rstrip("=")


@dataclass(frozen=True)
class SSHTarget:
    host: str
    port: int
    user: str = "root"
    key: str = "~/.ssh/id_ed25519"

    @property
    def hostport(self) -> str:
        return self.host if self.port == 22 else f"[{self.host}]:{self.port}"

    def __str__(self) -> str:
        return f"{self.user}@{self.host}:{self.port}"


class KnownHosts:
    """The lane's known_hosts file: first use records the key, later uses must match."""

    _lock = threading.Lock()

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _load(self) -> paramiko.HostKeys:
        keys = paramiko.HostKeys()
        if self.path.exists():
            keys.load(str(self.path))
        return keys

    def lookup(self, hostport: str) -> dict | None:
        return self._load().lookup(hostport)

    def check_or_trust(self, hostport: str, key: paramiko.PKey) -> bool:
        """True when ``key`` was recorded now (first use); raises HostKeyChanged on mismatch."""
        with self._lock:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                keys = self._load()
                known = keys.lookup(hostport)
                if known is not None and len(known):
                    if known.get(key.get_name()) == key:
                        return False
                    old = next(iter(known.values()))
                    raise HostKeyChanged(
                        f"REFUSING {hostport}: ITS HOST KEY HAS CHANGED. Recorded {old.get_name()} "
                        f"{fingerprint(old)} in {self.path}; the server now presents {key.get_name()} "
                        f"{fingerprint(key)}. This can be an attack (someone in the middle) or a re-used "
                        f"address. Nothing was sent. If you know why it changed, remove the line for "
                        f"{hostport} from {self.path} and connect again.")
                keys.add(hostport, key.get_name(), key)
                tmp = self.path.with_name(self.path.name + ".tmp")
                keys.save(str(tmp))
                tmp.replace(self.path)
                return True

    def forget(self, hostport: str) -> None:
        """Drop a host's entry (its instance was destroyed: the address may be re-used)."""
        with self._lock:
            if not self.path.exists():
                return
            with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
                fcntl.flock(lock, fcntl.LOCK_EX)
                keys = self._load()
                if hostport in keys:
                    del keys[hostport]
                    tmp = self.path.with_name(self.path.name + ".tmp")
                    keys.save(str(tmp))
                    tmp.replace(self.path)


class _Verify(paramiko.MissingHostKeyPolicy):
    """paramiko asks this for hosts it has no key for; every key check goes through here
    because the client is given no host keys of its own."""

    def __init__(self, known: KnownHosts, on_trust=None):
        self.known, self.on_trust = known, on_trust

    def missing_host_key(self, client, hostname, key):
        if self.known.check_or_trust(hostname, key) and self.on_trust:
            self.on_trust(hostname, key)


@dataclass
class Result:
    rc: int
    out: str
    err: str

    def check(self, what: str) -> "Result":
        if self.rc != 0:
            detail = (self.err or self.out).strip().splitlines()[-3:]
            raise SSHError(f"{what} failed with exit status {self.rc}: {' | '.join(detail)}")
        return self


class Remote:
    """One SSH session to an instance (reconnects on demand)."""

    def __init__(self, target: SSHTarget, known_hosts: KnownHosts, timeout: float = 20.0, on_trust=None):
        self.target, self.known, self.timeout, self.on_trust = target, known_hosts, timeout, on_trust
        self.client: paramiko.SSHClient | None = None
        self._sftp: paramiko.SFTPClient | None = None
        self.history: deque[str] = deque(maxlen=1000)  # recent command lines sent (for audits and tests)

    def connect(self) -> "Remote":
        if self.client is not None and self.client.get_transport() and self.client.get_transport().is_active():
            return self
        self.close()
        client = paramiko.SSHClient()
        client.set_missing_host_key_policy(_Verify(self.known, self.on_trust))
        try:
            client.connect(self.target.host, port=self.target.port, username=self.target.user,
                           key_filename=expand(self.target.key), look_for_keys=False, allow_agent=False,
                           timeout=self.timeout, banner_timeout=self.timeout, auth_timeout=self.timeout)
        except HostKeyChanged:
            client.close()
            raise
        except (paramiko.SSHException, OSError, EOFError) as e:
            client.close()
            raise SSHError(f"cannot connect to {self.target}: {type(e).__name__}: {e}") from None
        transport = client.get_transport()
        transport.set_keepalive(15)
        self.client = client
        return self

    def close(self) -> None:
        if self._sftp is not None:
            try:
                self._sftp.close()
            except Exception:
                pass
            self._sftp = None
        if self.client is not None:
            self.client.close()
            self.client = None

    def drop(self) -> None:
        """Cut the connection abruptly (tests: an SSH drop mid-transfer)."""
        if self.client is not None and self.client.get_transport():
            self.client.get_transport().close()

    def __enter__(self) -> "Remote":
        return self.connect()

    def __exit__(self, *exc) -> None:
        self.close()

    def run_line(self, line: str, timeout: float | None = 120.0, stdin: bytes | None = None) -> Result:
        """Run a shell line the caller built from quoted pieces."""
        self.connect()
        self.history.append(line)
        try:
            chan = self.client.get_transport().open_session(timeout=self.timeout)
            chan.settimeout(timeout)
            chan.exec_command(line)
            if stdin is not None:
                chan.sendall(stdin)
            chan.shutdown_write()
            out, err = bytearray(), bytearray()
            deadline = time.monotonic() + timeout if timeout else None
            while True:
                if chan.recv_ready():
                    out += chan.recv(65536)
                elif chan.recv_stderr_ready():
                    err += chan.recv_stderr(65536)
                elif chan.exit_status_ready():
                    while chan.recv_ready():
                        out += chan.recv(65536)
                    while chan.recv_stderr_ready():
                        err += chan.recv_stderr(65536)
                    break
                else:
                    if deadline and time.monotonic() > deadline:
                        chan.close()
                        raise SSHError(f"{self.target}: command timed out after {timeout:.0f} s")
                    time.sleep(0.01)
            rc = chan.recv_exit_status()
            chan.close()
        except (paramiko.SSHException, OSError, EOFError, socket.timeout) as e:
            self.close()
            raise SSHError(f"{self.target}: connection lost ({type(e).__name__}: {e})") from None
        return Result(rc, out.decode("utf-8", "replace"), err.decode("utf-8", "replace"))

    def run(self, argv: Sequence[str | Path], timeout: float | None = 120.0, stdin: bytes | None = None,
            cwd: str | None = None, env: dict[str, str] | None = None) -> Result:
        """Run one command given as an argument list (each argument quoted)."""
        parts = []
        if cwd:
            parts.append(f"cd {quote(cwd)} &&")
        if env:
            parts.append("env " + " ".join(quote(f"{k}={v}") for k, v in env.items()))
        parts.append(shlex.join(str(a) for a in argv))
        return self.run_line(" ".join(parts), timeout=timeout, stdin=stdin)

    def sftp(self) -> paramiko.SFTPClient:
        self.connect()
        if self._sftp is None:
            try:
                self._sftp = self.client.open_sftp()
            except (paramiko.SSHException, OSError, EOFError) as e:
                self.close()
                raise SSHError(f"{self.target}: cannot open SFTP ({e})") from None
        return self._sftp

    def _sftp_op(self, what: str, fn, *args):
        try:
            return fn(self.sftp(), *args)
        except FileNotFoundError:
            raise
        except (paramiko.SSHException, OSError, EOFError) as e:
            if not isinstance(e, OSError) or e.errno is None:
                self.close()
            raise SSHError(f"{what} on {self.target} failed ({type(e).__name__}: {e})") from None

    def put(self, local: str | Path, remote: str) -> None:
        self._sftp_op(f"upload of {local} to {remote}", lambda s: s.put(str(local), remote))

    def makedirs(self, path: str) -> None:
        """``mkdir -p`` over SFTP."""
        def mk(s):
            parts, cur = [p for p in path.split("/") if p], ""
            for p in parts:
                cur += "/" + p
                try:
                    s.stat(cur)
                except FileNotFoundError:
                    try:
                        s.mkdir(cur)
                    except OSError:
                        s.stat(cur)  # created meanwhile: fine; otherwise this raises
        self._sftp_op(f"mkdir -p {path}", mk)

    def rename(self, src: str, dst: str) -> None:
        """Atomic rename over SFTP (replaces ``dst``)."""
        self._sftp_op(f"rename {src}", lambda s: s.posix_rename(src, dst))

    def read_bytes(self, path: str) -> bytes:
        def rd(s):
            with s.open(path, "rb") as f:
                return f.read()
        return self._sftp_op(f"read {path}", rd)
