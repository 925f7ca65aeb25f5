"""Run commands on a cluster host: over ``ssh`` (BatchMode, so a missing key fails instead of
prompting), or on this machine for a ``local`` host. Commands are POSIX shell strings; values
in them are quoted with ``shlex.quote``."""

from __future__ import annotations

import shlex
import subprocess
from typing import Sequence

from backend.thunder.config import ClusterConfig, HostConfig


class Host:
    def __init__(self, cfg: HostConfig, cluster: ClusterConfig):
        self.cfg = cfg
        self.name = cfg.name
        self.python = cluster.python_of(cfg)
        self._ssh_options = list(cluster.ssh_options)
        self._connect_timeout = cluster.connect_timeout_s

    @property
    def is_local(self) -> bool:
        return self.cfg.kind == "local"

    @property
    def launch_name(self) -> str:
        """The host's name in the ring hostfile: mlx.launch runs 127.0.0.1 without ssh."""
        return "127.0.0.1" if self.is_local else self.cfg.ssh

    def argv(self, command: str) -> list[str]:
        if self.is_local:
            return ["/bin/sh", "-c", command]
        return ["ssh", "-o", "BatchMode=yes", "-o", f"ConnectTimeout={int(max(1, self._connect_timeout))}",
                *self._ssh_options, self.cfg.ssh, command]

    def run(self, command: str, input: str | None = None, timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run and wait; never raises for a non-zero exit (callers read ``returncode``). A
        timeout comes back as returncode 124 with a note on stderr."""
        try:
            return subprocess.run(self.argv(command), input=input, capture_output=True, text=True,
                                  timeout=timeout, stdin=None if input is not None else subprocess.DEVNULL)
        except subprocess.TimeoutExpired as e:
            out = e.stdout.decode(errors="replace") if isinstance(e.stdout, bytes) else (e.stdout or "")
            return subprocess.CompletedProcess(e.cmd, 124, out, f"timed out after {timeout:.0f}s on {self.name}")

    def popen(self, command: str, **kwargs) -> subprocess.Popen:
        return subprocess.Popen(self.argv(command), text=True, **kwargs)

    def python_command(self, args: Sequence[str] = (), cwd: str | None = None, env: Sequence[str] = ()) -> str:
        """Shell command running this host's python on a script read from stdin."""
        prefix = f"cd {shlex.quote(cwd)} && " if cwd else ""
        envs = "".join(f"{shlex.quote(e)} " for e in env)
        return f"{prefix}exec env {envs}{shlex.quote(self.python)} - {' '.join(shlex.quote(a) for a in args)}"

    def run_python(self, script: str, args: Sequence[str] = (), cwd: str | None = None, env: Sequence[str] = (),
                   timeout: float = 120.0) -> subprocess.CompletedProcess:
        return self.run(self.python_command(args, cwd, env), input=script, timeout=timeout)

    def write_file(self, path: str, text: str) -> None:
        """Write ``text`` to ``path`` on the host atomically (temp file + rename)."""
        tmp = f"{path}.tmp"
        r = self.run(f"mkdir -p {shlex.quote(path.rsplit('/', 1)[0])} && cat > {shlex.quote(tmp)} && "
                     f"mv {shlex.quote(tmp)} {shlex.quote(path)}", input=text)
        if r.returncode != 0:
            raise OSError(f"{self.name}: could not write {path}: {r.stderr.strip() or r.returncode}")

    def read_from(self, path: str, offset: int) -> bytes | None:
        """Bytes of ``path`` from ``offset`` on; None when the file does not exist (yet)."""
        q = shlex.quote(path)
        try:
            r = subprocess.run(self.argv(f"if [ -f {q} ]; then tail -c +{int(offset) + 1} {q}; else exit 3; fi"),
                               capture_output=True, timeout=60, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise OSError(f"{self.name}: reading {path} timed out") from None
        if r.returncode == 3:
            return None
        if r.returncode != 0:
            raise OSError(f"{self.name}: could not read {path}: {r.stderr.decode(errors='replace').strip()}")
        return r.stdout


def cluster_hosts(cluster: ClusterConfig) -> list[Host]:
    return [Host(h, cluster) for h in cluster.hosts]
