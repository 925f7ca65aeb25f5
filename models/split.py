"""Deterministic train/val/test split of a snapshot's feat_ids (CONTRACTS §5).

Rounding rule: val = test = round-half-up(N x val_fraction) (and test_fraction), train is
the remainder. On 290,596 rows with 0.1/0.1 this gives 232,476 / 29,060 / 29,060.
The permutation is numpy's PCG64 seeded with ``seed`` over the feat_ids sorted by
code point, so the split depends only on the set of ids, the seed and the fractions.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

import numpy as np
from models.files import atomic_write_text

PARTS = ("train", "val", "test")


def _round_half_up(x: float) -> int:
    return int(Decimal(repr(x)).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def ids_sha256(ids: list[str]) -> str:
    return hashlib.sha256("\n".join(ids).encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Split:
    seed: int
    train: list[str]
    val: list[str]
    test: list[str]
    snapshot_sha256: str = ""

    @property
    def sha256(self) -> str:
        """Hash of the ordered id lists (train, val, test)."""
        h = hashlib.sha256()
        for part in PARTS:
            h.update(f"[{part}]\n".encode())
            h.update(ids_sha256(getattr(self, part)).encode())
        return h.hexdigest()

    def sizes(self) -> dict[str, int]:
        return {p: len(getattr(self, p)) for p in PARTS}

    def to_json(self) -> dict:
        return {
            "seed": self.seed,
            "snapshot_sha256": self.snapshot_sha256,
            "sha256": self.sha256,
            "sizes": self.sizes(),
            **{f"{p}_sha256": ids_sha256(getattr(self, p)) for p in PARTS},
            **{p: getattr(self, p) for p in PARTS},
        }

    def save(self, path: Path) -> None:
        """Write split.json (its folder is created; a reader never sees a half-written file)."""
        atomic_write_text(path, json.dumps(self.to_json(), ensure_ascii=False) + "\n")

    @classmethod
    def load(cls, path: Path) -> "Split":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        for key in ("seed", *PARTS):
            if key not in data:
                raise ValueError(f"{path}: split.json is missing field '{key}'")
        split = cls(data["seed"], data["train"], data["val"], data["test"], data.get("snapshot_sha256", ""))
        if "sha256" in data and data["sha256"] != split.sha256:
            raise ValueError(f"{path}: recorded sha256 {data['sha256'][:12]} does not match its id lists ({split.sha256[:12]})")
        return split


def make_split(feat_ids: list[str], seed: int = 42, val_fraction: float = 0.1, test_fraction: float = 0.1,
               snapshot_sha256: str = "") -> Split:
    if len(set(feat_ids)) != len(feat_ids):
        raise ValueError("feat_ids must be unique to split")
    if not (0 <= val_fraction < 1 and 0 <= test_fraction < 1 and val_fraction + test_fraction < 1):
        raise ValueError("fractions must be in [0, 1) and sum below 1")
    n = len(feat_ids)
    n_val, n_test = _round_half_up(n * val_fraction), _round_half_up(n * test_fraction)
    ordered = sorted(feat_ids)
    perm = np.random.Generator(np.random.PCG64(seed)).permutation(n)
    shuffled = [ordered[i] for i in perm]
    test = shuffled[:n_test]
    val = shuffled[n_test : n_test + n_val]
    train = shuffled[n_test + n_val :]
    return Split(seed, train, val, test, snapshot_sha256)
