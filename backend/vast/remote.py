"""The remote side of a run: stage the project and the data on an instance, check every
staged byte by sha256 *on the instance*, start the trainer detached, read its status.

Layout under ``<remote_base>/<instance id>`` (one directory per instance, so a relaunched
instance starts clean):

    nko_remote.py                 the helper (backend/vast/remote_helper.py)
    app/<wheel sha[:16]>/         the project wheel, unpacked (first on PYTHONPATH)
    data/...                      snapshot pairs.jsonl, split.json, feature store files
    manifests/<name>.json         what was staged, with hashes (checked by the helper)
    runs/<run id>/                the trainer's out_dir: the run's artifacts
    ctl/<run id>/                 runner.json, heartbeat.json, exit.json, trainer.out
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from models.files import sha256_file
from backend.vast.ssh import Remote, SSHError, quote
from models.errors import NkoOpsError

HELPER = Path(__file__).with_name("remote_helper.py")
PROJECT_ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("backend", "models", "agp", "console", "state", "cli")


class StageError(NkoOpsError, RuntimeError):
    pass


@dataclass(frozen=True)
class Layout:
    root: str

    @classmethod
    def for_instance(cls, remote_base: str, instance_id: str | int) -> "Layout":
        return cls(posixpath.join(remote_base, str(instance_id)))

    @property
    def helper(self) -> str:
        return posixpath.join(self.root, "nko_remote.py")

    def app(self, wheel_sha: str) -> str:
        return posixpath.join(self.root, "app", wheel_sha[:16])

    def data(self, *parts: str) -> str:
        return posixpath.join(self.root, "data", *parts)

    def run_dir(self, run_id: str) -> str:
        return posixpath.join(self.root, "runs", run_id)

    def ctl_dir(self, run_id: str) -> str:
        return posixpath.join(self.root, "ctl", run_id)

    @property
    def runs(self) -> str:
        return posixpath.join(self.root, "runs")


@dataclass(frozen=True)
class StagedFile:
    local: Path
    path: str  # relative to the layout root
    sha256: str
    size: int

    @classmethod
    def of(cls, local: Path, path: str) -> "StagedFile":
        return cls(local, path, sha256_file(local), local.stat().st_size)


# --------------------------------------------------------------------------- the project wheel

def _source_hash() -> str:
    h = hashlib.sha256()
    files = [PROJECT_ROOT / "pyproject.toml"]
    for pkg in PACKAGES:
        files += sorted(p for p in (PROJECT_ROOT / pkg).rglob("*")
                        if p.is_file() and p.suffix in (".py", ".json", ".toml", ".tcss")
                        and "__pycache__" not in p.parts)
    for p in files:
        h.update(str(p.relative_to(PROJECT_ROOT)).encode() + b"\0")
        h.update(p.read_bytes())
    return h.hexdigest()


def build_wheel(dist_dir: Path) -> Path:
    """The project as a wheel (``pip wheel``), cached by a hash of its sources."""
    out = Path(dist_dir) / _source_hash()[:16]
    found = sorted(out.glob("nko_ops-*.whl")) if out.exists() else []
    if found:
        return found[0]
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as tmp:
        r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            str(PROJECT_ROOT), "-w", tmp], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("nko_ops-*.whl"))
        if r.returncode != 0 or not wheels:
            raise StageError(f"building the project wheel failed: {(r.stderr or r.stdout).strip()[-500:]}")
        out.mkdir(exist_ok=True)
        target = out / wheels[0].name
        wheels[0].replace(target)
    return target


# --------------------------------------------------------------------------- inputs of a run

def run_inputs(cfg: dict) -> tuple[list[StagedFile], dict]:
    """The files a run reads (snapshot pairs.jsonl, split, feature store) as StagedFiles
    under ``data/``, and the config fields pointing at them, relative to the layout root."""
    from models.snapshot import pairs_path

    pairs = pairs_path(Path(cfg["snapshot"]))
    split = Path(cfg["split"])
    features = Path(cfg["features"])
    for what, p in (("snapshot", pairs), ("split", split)):
        if not p.is_file():
            raise StageError(f"config field '{what}': {p} not found")
    if not (features / "index.json").is_file():
        raise StageError(f"config field 'features': {features} is not a feature store (no index.json)")
    pairs_f = StagedFile.of(pairs, "")
    split_f = StagedFile.of(split, "")
    snap_dir = f"data/snapshot-{pairs_f.sha256[:16]}"
    split_rel = f"data/split-{split_f.sha256[:16]}.json"
    index_sha = sha256_file(features / "index.json")
    feat_dir = f"data/features-{index_sha[:16]}"
    files = [StagedFile(pairs, f"{snap_dir}/pairs.jsonl", pairs_f.sha256, pairs_f.size),
             StagedFile(split, split_rel, split_f.sha256, split_f.size)]
    for p in sorted(features.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            files.append(StagedFile.of(p, f"{feat_dir}/{p.name}"))
    return files, {"snapshot": snap_dir, "split": split_rel, "features": feat_dir}


PATH_FIELDS = ("snapshot", "split", "features", "out_dir")


def remote_config(cfg: dict, fields: dict) -> dict:
    """The run config as the instance sees it: paths relative to the layout root, where the
    trainer runs. Relative, so a relaunched instance (another root) continues the same run
    (the trainer refuses a ``last.pt`` whose config differs)."""
    out = dict(cfg)
    out.update(fields)
    out["out_dir"] = posixpath.join("runs", cfg["run_id"])
    return out


# --------------------------------------------------------------------------- staging

class Stager:
    """Uploads to one instance, each file verified by the helper on the instance."""

    def __init__(self, remote: Remote, layout: Layout, python: str):
        self.remote, self.layout, self.python = remote, layout, python

    def helper(self, *args: str, timeout: float = 300.0, check: bool = True):
        r = self.remote.run([self.python, self.layout.helper, *args], timeout=timeout)
        if check:
            r.check(f"nko_remote.py {args[0]}")
        return r

    def install_helper(self) -> None:
        """Upload the helper (if it is not there, intact) and read it back to check it: the
        helper cannot vouch for itself."""
        want = HELPER.read_bytes()
        try:
            if self.remote.read_bytes(self.layout.helper) == want:
                return
        except FileNotFoundError:
            pass
        self._put(HELPER, self.layout.helper)
        got = self.remote.read_bytes(self.layout.helper)
        if hashlib.sha256(got).digest() != hashlib.sha256(want).digest():
            raise StageError(f"{self.remote.target}: the helper arrived corrupted")

    def _put(self, local: Path, remote_path: str) -> None:
        part = remote_path + ".part"
        self.remote.makedirs(posixpath.dirname(remote_path))
        self.remote.put(local, part)
        self.remote.rename(part, remote_path)

    def verify(self, name: str, files: list[StagedFile]) -> list[dict]:
        """Problems ({path, why}) of ``files`` on the instance, checked there."""
        manifest = {"root": self.layout.root,
                    "files": [{"path": f.path, "sha256": f.sha256, "size": f.size} for f in files]}
        remote_path = posixpath.join(self.layout.root, "manifests", f"{name}.json")
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as tmp:
            json.dump(manifest, tmp)
        try:
            self._put(Path(tmp.name), remote_path)
        finally:
            Path(tmp.name).unlink()
        r = self.helper("verify", remote_path, check=False)
        try:
            return json.loads(r.out)["problems"]
        except (ValueError, KeyError):
            raise StageError(f"verify on {self.remote.target} failed: {(r.err or r.out).strip()[-300:]}") from None

    def stage(self, name: str, files: list[StagedFile]) -> int:
        """Upload what is missing or different; returns how many files were sent. Raises
        StageError when the instance still disagrees after the upload."""
        todo = {p["path"] for p in self.verify(name, files)}
        for f in files:
            if f.path in todo:
                self._put(f.local, posixpath.join(self.layout.root, f.path))
        if todo:
            problems = self.verify(name, files)
            if problems:
                raise StageError(f"{self.remote.target}: staged files do not verify: "
                                 + "; ".join(f"{p['path']}: {p['why']}" for p in problems[:5]))
        return len(todo)

    def install_wheel(self, wheel: Path) -> str:
        """Unpack the project wheel into ``app/<sha>`` and put the repository's ``configs/``
        beside its packages, where the code looks for its default policies (a wheel does
        not carry them)."""
        sha = sha256_file(wheel)
        f = StagedFile(wheel, f"dist/{wheel.name}", sha, wheel.stat().st_size)
        self.stage("wheel", [f])
        app = self.layout.app(sha)
        self.helper("unpack", posixpath.join(self.layout.root, f.path), app)
        rel = posixpath.relpath(app, self.layout.root)
        configs = [StagedFile.of(p, f"{rel}/{p.relative_to(PROJECT_ROOT).as_posix()}")
                   for p in sorted((PROJECT_ROOT / "configs").rglob("*")) if p.is_file()]
        self.stage("configs", configs)
        return app


# --------------------------------------------------------------------------- the trainer

def start_trainer(remote: Remote, layout: Layout, run_id: str, cfg_remote: dict, python: str, app: str,
                  env: dict[str, str], heartbeat_s: float, lease_grace_s: float | None = None) -> None:
    """Write the run's config on the instance and start runner + trainer detached
    (``nohup setsid``: they survive the SSH session). Waits for runner.json.
    ``lease_grace_s``: the runner stops the trainer that long after ``ctl/lease.json`` expires
    (the server-side budget backstop, see backend/vast/guard.py); None: no lease."""
    ctl = layout.ctl_dir(run_id)
    cfg_path = posixpath.join(ctl, "config.json")
    remote.makedirs(ctl)
    remote.makedirs(layout.run_dir(run_id))
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False, encoding="utf-8") as tmp:
        json.dump(cfg_remote, tmp, ensure_ascii=False, indent=1)
    try:
        remote.put(tmp.name, cfg_path + ".part")
    finally:
        Path(tmp.name).unlink()
    remote.rename(cfg_path + ".part", cfg_path)
    full_env = {"PYTHONPATH": app, "PYTHONUNBUFFERED": "1", **env}
    argv = [python, "-m", "models.train_cli", "train", "--config", cfg_path]
    line = (f"cd {quote(layout.root)} && nohup setsid env "
            + " ".join(quote(f"{k}={v}") for k, v in full_env.items())
            + f" {quote(python)} {quote(layout.helper)} runner {quote(ctl)} {heartbeat_s:g}"
            + (f" --lease-grace {lease_grace_s:g}" if lease_grace_s is not None else "")
            + f" -- {shlex.join(argv)}"
            + f" > {quote(posixpath.join(ctl, 'runner.out'))} 2>&1 < /dev/null &")
    remote.run_line(line, timeout=60).check("starting the trainer")
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            remote.sftp().stat(posixpath.join(ctl, "runner.json"))
            return
        except FileNotFoundError:
            time.sleep(0.1)
    raise StageError(f"{remote.target}: the runner for {run_id!r} did not start (see {ctl}/runner.out)")


def status(remote: Remote, layout: Layout, run_id: str, python: str) -> dict:
    r = remote.run([python, layout.helper, "status", layout.ctl_dir(run_id)], timeout=60).check("status")
    try:
        return json.loads(r.out)
    except ValueError:
        raise SSHError(f"{remote.target}: unreadable status for {run_id!r}: {r.out[:200]}") from None


def stop_trainer(remote: Remote, layout: Layout, run_id: str, python: str) -> None:
    remote.run([python, layout.helper, "stop", layout.ctl_dir(run_id)], timeout=60).check("stop")


