"""A real OpenSSH sshd on 127.0.0.1, run as the current user (root or not), with its own host
key, client key and authorized_keys under one directory: the stand-in for a rented
instance's SSH (the sandbox, and the tests' fixtures).

Nothing here touches ~/.ssh: the client key, the host key and the config are all in ``root``.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from models.errors import NkoOpsError

PRIVSEP_DIR = Path("/run/sshd")  # sshd refuses to start without it, even as a plain user


class LocalSSHError(NkoOpsError, RuntimeError):
    pass


def sshd_binary() -> str | None:
    found = shutil.which("sshd") or "/usr/sbin/sshd"
    return found if Path(found).exists() else None


def require_openssh() -> str:
    """The sshd binary, or LocalSSHError saying what to install."""
    sshd = sshd_binary()
    missing = [name for name, ok in (("sshd", sshd), ("ssh-keygen", shutil.which("ssh-keygen")),
                                     ("ssh", shutil.which("ssh"))) if not ok]
    if missing:
        raise LocalSSHError(f"{', '.join(missing)} not found: install OpenSSH (Debian/Ubuntu: "
                            "`sudo apt-get install openssh-server openssh-client`; ./bootstrap.sh does it as root)")
    if not PRIVSEP_DIR.exists():
        try:
            PRIVSEP_DIR.mkdir(mode=0o755, parents=True)
        except OSError:
            raise LocalSSHError(f"sshd needs its privilege separation directory {PRIVSEP_DIR}: "
                                f"`sudo mkdir -p {PRIVSEP_DIR}`") from None
    return sshd  # type: ignore[return-value]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def free_port_pair() -> int:
    """A port p with p and p+1 free on 127.0.0.1 (rank 0 and rank 1 of a local MLX ring)."""
    for _ in range(50):
        p = free_port()
        if p > 64000:
            continue
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", p))
                b.bind(("127.0.0.1", p + 1))
            return p
        except OSError:
            continue
    raise LocalSSHError("no two free neighbouring ports on 127.0.0.1")


def keygen(path: Path) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True,
                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
    return path


def wait_for_ssh_banner(port: int, proc: subprocess.Popen | None, log: Path | None, timeout: float = 15) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            tail = log.read_text(errors="replace")[-500:] if log and log.exists() else ""
            raise LocalSSHError(f"sshd exited: {tail}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as s:
                if s.recv(4).startswith(b"SSH"):
                    return
        except OSError:
            time.sleep(0.05)
    raise LocalSSHError(f"sshd did not answer on 127.0.0.1:{port} within {timeout:g}s")


@dataclass
class SSHD:
    dir: Path
    port: int
    client_key: Path
    proc: subprocess.Popen | None = None
    host_key: Path | None = None

    @property
    def log(self) -> Path:
        return self.dir / "sshd.log"

    def config(self) -> Path:
        cfg = self.dir / "sshd_config"
        cfg.write_text("\n".join([
            f"Port {self.port}", "ListenAddress 127.0.0.1", f"HostKey {self.host_key}",
            f"PidFile {self.dir / 'sshd.pid'}", f"AuthorizedKeysFile {self.dir / 'authorized_keys'}",
            "PermitRootLogin yes", "StrictModes no", "PubkeyAuthentication yes", "PasswordAuthentication no",
            "KbdInteractiveAuthentication no", "UsePAM no", "Subsystem sftp internal-sftp", "LogLevel ERROR",
            "MaxStartups 100", "MaxSessions 100", "UseDNS no", ""]))
        return cfg

    def start(self, new_host_key: bool = False, detach: bool = False) -> "SSHD":
        """Start sshd in the foreground mode (-D) as a child; ``detach`` puts it in its own
        session so it outlives the caller (the sandbox stops it by its recorded pid)."""
        if self.host_key is None or new_host_key:
            self.host_key = keygen(self.dir / f"host_ed25519_{int(time.time() * 1000)}")
        cfg = self.config()
        with open(self.log, "ab") as err:
            self.proc = subprocess.Popen([require_openssh(), "-D", "-e", "-f", str(cfg)], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, start_new_session=detach)
        wait_for_ssh_banner(self.port, self.proc, self.log)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


def new_sshd(root: Path, port: int | None = None) -> SSHD:
    """Keys and authorized_keys for a fresh sshd under ``root`` (not started)."""
    require_openssh()
    root.mkdir(parents=True, exist_ok=True)
    client = root / "client_ed25519"
    if not client.exists():
        keygen(client)
    (root / "authorized_keys").write_text((root / "client_ed25519.pub").read_text())
    return SSHD(root, port or free_port(), client)
