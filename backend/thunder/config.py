"""The Thunder cluster file (``configs/thunder/cluster.toml``): hosts, the paths every host
shares, the training shape and the watchdog.

Paths on the hosts are absolute and the same on every host (the ring starts each rank with
one ``--python`` and one ``--cwd``, and the preflight compares model and data by path).
Every section forbids unknown keys, so a typo is an error that names the field.

Training defaults are the seed's safe shape on the Macs: batch 1 per rank, 4 LoRA layers,
rank 8, lr 1e-6, max sequence 256 (batch 2 / 8 layers / seq 512 hit a Metal GPU timeout).
"""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from models.errors import NkoOpsError
from models.tomlfile import read_toml
from models.validation import validate

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "thunder" / "cluster.toml"
SAFE_SHAPE = {"batch_size": 1, "num_layers": 4, "lora_rank": 8, "learning_rate": 1e-6, "max_seq_length": 256}


class ConfigError(NkoOpsError, ValueError):
    pass


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _absolute(value: str | None, field: str) -> str | None:
    if value is not None and not value.startswith("/"):
        raise ValueError(f"{field} must be an absolute path on the hosts (got {value!r})")
    return value


class HostConfig(_Section):
    """One Mac. ``kind = "local"`` runs its commands on this machine without ssh (tests, or
    a controller that is itself one of the hosts); in the ring hostfile it becomes 127.0.0.1,
    which ``mlx.launch`` starts without ssh."""

    name: str = Field(min_length=1)
    ssh: str = ""  # ssh alias (~/.ssh/config); mlx.launch uses the same alias
    ip: str  # Thunderbolt IP (numeric): the ring connects over it
    kind: Literal["ssh", "local"] = "ssh"
    python: str | None = None  # default: the cluster's python

    @field_validator("ip")
    @classmethod
    def _numeric_ip(cls, v: str) -> str:
        try:
            ipaddress.ip_address(v)
        except ValueError:
            raise ValueError(f"ip must be a numeric IP address (the ring backend needs one), got {v!r}") from None
        return v

    @field_validator("python")
    @classmethod
    def _abs_python(cls, v: str | None) -> str | None:
        return _absolute(v, "python")

    @model_validator(mode="after")
    def _ssh_alias(self) -> "HostConfig":
        if self.kind == "ssh" and not self.ssh:
            raise ValueError(f"host {self.name!r}: field 'ssh' (the ssh alias) is required for kind 'ssh'")
        return self


class TrainConfig(_Section):
    batch_size: int = Field(SAFE_SHAPE["batch_size"], gt=0)  # per rank; mlx-lm's batch = this x world size
    num_layers: int = Field(SAFE_SHAPE["num_layers"], ge=-1)
    lora_rank: int = Field(SAFE_SHAPE["lora_rank"], gt=0)
    lora_scale: float = Field(20.0, gt=0)
    lora_dropout: float = Field(0.0, ge=0, lt=1)
    learning_rate: float = Field(SAFE_SHAPE["learning_rate"], gt=0)
    max_seq_length: int = Field(SAFE_SHAPE["max_seq_length"], gt=0)
    iters: int = Field(1000, gt=0)
    steps_per_report: int = Field(10, gt=0)
    steps_per_eval: int = Field(200, gt=0)
    save_every: int = Field(100, gt=0)
    val_batches: int = Field(25, ge=-1)
    grad_checkpoint: bool = False
    mask_prompt: bool = False
    seed: int = 0

    def shape(self) -> dict:
        return {k: getattr(self, k) for k in SAFE_SHAPE}


class WatchdogConfig(_Section):
    window_s: float = Field(600.0, gt=0)  # no new metrics line from a rank for this long -> hung
    # before a rank's first train/val report: imports, model load and the first validation
    startup_window_s: float = Field(1800.0, gt=0)
    poll_s: float = Field(5.0, gt=0)
    stop_grace_s: float = Field(10.0, ge=0)  # SIGTERM -> SIGKILL


class EvalConfig(_Section):
    """AGP evaluation of the finished adapter on the corpus' held-out (test) split."""

    enabled: bool = True
    rows: str | None = None  # prediction rows the corpus was built from (on the hosts)
    max_tokens: int = Field(256, gt=0)
    timeout_s: float = Field(1800.0, gt=0)
    gate_policy: str | None = None  # default: the repository's configs/agp/gate.toml on the host
    partition_policy: str | None = None  # must give the corpus' partition_source (agp_eval checks)
    partition_source: Literal["model", "policy"] | None = None  # overrides the policy file's ``source``
    # the rows' ASR run directory on the hosts (best.pt + its feature store): proposals get their
    # acoustic score; without it the default gate refuses every boundary/uncertain edit (rule acoustic)
    acoustic_run: str | None = None

    @field_validator("rows", "gate_policy", "partition_policy", "acoustic_run")
    @classmethod
    def _abs(cls, v: str | None, info) -> str | None:
        return _absolute(v, info.field_name)


class ClusterConfig(_Section):
    name: str = "thunder"
    hosts: list[HostConfig] = Field(min_length=2)
    python: str  # venv python on the hosts
    workdir: str  # nko-ops checkout on the hosts (ranks run `python -m backend.thunder.worker` there)
    model: str  # model directory (config.json, weights, tokenizer)
    data: str  # AGP corpus directory (train/valid/test.jsonl, corpus.json)
    run_root: str  # run directories on the hosts: <run_root>/<run_id>
    local_root: str = "work/thunder"  # hostfile and launcher logs on the controller
    starting_port: int = Field(32323, gt=1023, lt=65000)
    env: list[str] = ["HF_HUB_OFFLINE=1", "TRANSFORMERS_OFFLINE=1"]
    ssh_options: list[str] = []  # extra ssh args for the preflight/monitor (mlx.launch uses plain ssh)
    connect_timeout_s: float = Field(5.0, gt=0)
    train: TrainConfig = TrainConfig()
    watchdog: WatchdogConfig = WatchdogConfig()
    eval: EvalConfig = EvalConfig()

    @field_validator("python", "workdir", "model", "data", "run_root")
    @classmethod
    def _abs(cls, v: str, info) -> str:
        return _absolute(v, info.field_name)

    @field_validator("env")
    @classmethod
    def _env(cls, v: list[str]) -> list[str]:
        for e in v:
            key = e.split("=", 1)[0]
            if "=" not in e or not key.replace("_", "a").isalnum():
                raise ValueError(f"env entry {e!r} is not KEY=VALUE")
        return v

    @model_validator(mode="after")
    def _hosts(self) -> "ClusterConfig":
        names = [h.name for h in self.hosts]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"hosts: duplicate name(s) {dup}")
        return self

    def python_of(self, host: HostConfig) -> str:
        return host.python or self.python

    def host(self, name: str) -> HostConfig:
        for h in self.hosts:
            if h.name == name:
                return h
        raise ConfigError(f"no host named {name!r} (hosts: {', '.join(h.name for h in self.hosts)})")


def parse_config(data: dict, where: str = "<config>") -> ClusterConfig:
    return validate(ClusterConfig, data, where, ConfigError)


def load_config(path: Path | str | None = None) -> ClusterConfig:
    """Read and validate a cluster TOML (default ``configs/thunder/cluster.toml``)."""
    path = Path(path) if path else DEFAULT_CONFIG
    return parse_config(read_toml(path, ConfigError, "Thunder cluster config"), str(path))


def config_json(cfg: ClusterConfig) -> str:
    return json.dumps(cfg.model_dump(), sort_keys=True)
