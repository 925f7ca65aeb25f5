"""Partition policy for the AGP lane: keep the acoustic run's partition, or re-partition the
rows with thresholds over their trajectory scalars and CTC confidence.

Partitions (CONTRACTS §4): stable — keep unchanged; boundary — local repair when evidence
agrees; uncertain — stronger evidence or abstain; novelty — quarantine.

``configs/agp/partition.toml`` says which (``source = "model" | "policy"``) and, for
re-partitioning, holds a policy in exactly the trainer's format (``configs/partition.toml``:
``name``, ``order``, ``fallback``, one table per partition with ``match`` and
``key = {min, max}`` conditions over the ``trajectory_scalars`` summary keys). The policy is
checked and applied by the trainer's own code (``models.decode.check_policy`` /
``partition``), so a threshold means the same thing in both places.

Whatever the source, every row comes out with ``model_partition`` (what the run said) and
``partition_source`` (``"model"`` or ``"policy:<name>:<sha256[:12]>"``).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

from models.bundle import PARTITIONS, PredictionRow
from models.errors import NkoOpsError
from models.tomlfile import read_toml

DEFAULT_POLICY = Path(__file__).resolve().parents[1] / "configs" / "agp" / "partition.toml"
SOURCES = ("model", "policy")


class PartitionError(NkoOpsError, ValueError):
    pass


@dataclass(frozen=True)
class PartitionPolicy:
    source: str
    policy: dict  # the trainer-format policy (without ``source``)
    path: str = ""

    @property
    def sha256(self) -> str:
        # the same digest models.decode.policy_sha256 gives (results.json records it)
        return hashlib.sha256(json.dumps(self.policy, sort_keys=True).encode()).hexdigest()

    @property
    def identity(self) -> str:
        if self.source == "model":
            return "model"
        return f"policy:{self.policy.get('name', '')}:{self.sha256[:12]}"

    @property
    def keys(self) -> list[str]:
        """The summary keys the policy's conditions read."""
        return sorted({k for part in self.policy.get("order", []) for k in self.policy[part] if k != "match"})

    def with_source(self, source: str | None) -> "PartitionPolicy":
        if source is None:
            return self
        if source not in SOURCES:
            raise PartitionError(f"partition source must be one of {', '.join(SOURCES)}; got {source!r}")
        return _checked(replace(self, source=source))

    def classify(self, feat_id: str, scalars: dict[str, float]) -> str:
        from models.decode import partition

        missing = [k for k in self.keys if k not in scalars]
        if missing:
            raise PartitionError(f"{feat_id}: trajectory_scalars lacks {', '.join(missing)} "
                                 f"(needed by the partition policy {self.path})")
        return partition(scalars, self.policy)

    def apply(self, rows: Sequence[PredictionRow]) -> list[PredictionRow]:
        """Rows with their effective partition, recording the run's and where it came from."""
        out = []
        for row in rows:
            model_partition = row.model_partition or row.partition
            part = model_partition if self.source == "model" else self.classify(row.feat_id, row.trajectory_scalars)
            out.append(replace(row, partition=part, model_partition=model_partition, partition_source=self.identity))
        return out


def _checked(p: PartitionPolicy) -> PartitionPolicy:
    """Validate the thresholds with the trainer's checker when they will be used."""
    if p.source == "policy":
        from models.decode import check_policy

        try:
            check_policy(p.policy, p.path or "partition policy")
        except ValueError as e:
            raise PartitionError(str(e)) from None
    return p


def parse_partition_policy(data: dict, path: str = "") -> PartitionPolicy:
    data = dict(data)
    source = data.pop("source", "model")
    if source not in SOURCES:
        raise PartitionError(f"{path}: key 'source' must be one of {', '.join(SOURCES)}; got {source!r}")
    return _checked(PartitionPolicy(source, data, path))


def load_partition_policy(path: Path | str | None = None, source: str | None = None) -> PartitionPolicy:
    """Read ``configs/agp/partition.toml`` (or ``path``); ``source`` overrides its ``source``.
    A trainer policy file (no ``source`` key) reads as ``source = "model"`` unless overridden."""
    path = Path(path) if path else DEFAULT_POLICY
    policy = parse_partition_policy(read_toml(path, PartitionError, "partition policy"), str(path))
    return policy.with_source(source)


def partition_counts(rows: Sequence[PredictionRow]) -> dict:
    """Per-partition counts and the run -> effective moves (for reports)."""
    counts = {p: 0 for p in PARTITIONS}
    moved: dict[str, int] = {}
    for r in rows:
        counts[r.partition] += 1
        if r.model_partition and r.model_partition != r.partition:
            key = f"{r.model_partition}->{r.partition}"
            moved[key] = moved.get(key, 0) + 1
    return {"counts": counts, "moved": dict(sorted(moved.items()))}
