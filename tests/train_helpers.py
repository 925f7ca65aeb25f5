"""Tiny, learnable training data for the trainer tests: a snapshot of a few dozen rows, its
split, and a feature store whose frames are per-letter prototype vectors plus noise (so a
CTC head can actually learn the mapping)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from models.features import FeatureWriter, recipe_hash
from models.files import sha256_file
from models.split import make_split
from models.text import latin_to_nko

WORDS = ["i", "ye", "san", "joli", "a", "bɛ", "taa", "so", "ka", "muso", "cɛ", "ji", "dugu", "kalan", "mɔgɔ",
         "bolo", "fali", "den", "ko", "kɛ", "sira", "tile", "kunun", "fura"]
DIM = 16
FRAMES_PER_LETTER = 3


def sentences(n: int, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    out = []
    while len(out) < n:
        s = " ".join(rng.choice(WORDS, size=int(rng.integers(2, 5))))
        if s not in out:
            out.append(s)
    return out


def features_for(latin: str, rng: np.random.Generator, protos: dict[str, np.ndarray]) -> np.ndarray:
    frames = [protos[" "]] * 2
    for ch in latin:
        frames += [protos[ch]] * (FRAMES_PER_LETTER if ch != " " else 2)
    frames += [protos[" "]] * 2
    x = np.stack(frames) + rng.normal(0, 0.3, size=(len(frames), DIM))
    return x.astype(np.float32)


def build(root: Path, n: int = 40, seed: int = 0, texts: dict | None = None, source: bool = True) -> dict:
    """Write snapshot/, split.json and features/ under ``root``; return a run config dict.

    ``texts``: {part: {"nko": ..., "latin": ...}} replaces the texts of that split part's first
    row (features stay those of the original sentence). ``source``: record the snapshot in
    the feature store, as ``nko-ops features extract`` does."""
    root = Path(root)
    (root / "snapshot").mkdir(parents=True, exist_ok=True)
    latin = sentences(n, seed)
    rows = [{"feat_id": f"bam_t_{i:04d}", "nko": latin_to_nko(s), "latin": s} for i, s in enumerate(latin)]
    ids = [r["feat_id"] for r in rows]
    by_id = {r["feat_id"]: r for r in rows}
    for part, new in (texts or {}).items():
        by_id[getattr(make_split(ids, seed=42, val_fraction=0.15, test_fraction=0.15), part)[0]].update(new)
    pairs = root / "snapshot" / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    sha = sha256_file(pairs)
    split = make_split(ids, seed=42, val_fraction=0.15, test_fraction=0.15, snapshot_sha256=sha)
    split.save(root / "split.json")
    rng = np.random.default_rng(seed + 1)
    letters = sorted({ch for s in latin for ch in s} | {" "})
    protos = {ch: rng.normal(0, 1, size=DIM) for ch in letters}
    recipe = {"name": "synthetic-prototypes", "dim": DIM, "frame_rate": 50.0, "dtype": "float16"}
    recipe["hash"] = recipe_hash(recipe)
    with FeatureWriter(root / "features", recipe, source=f"{pairs} sha256:{sha}" if source else None) as w:
        for r, s in zip(rows, latin):
            w.add(r["feat_id"], features_for(s, rng, protos))
    return {
        "run_id": "t-run", "script": "nko", "mode": "baseline", "seed": 7,
        "snapshot": str(root / "snapshot"), "split": str(root / "split.json"), "features": str(root / "features"),
        "out_dir": str(root / "runs" / "t-run"),
        "model": {"preset": "tiny"},
        "train": {"epochs": 6, "batch_size": 8, "lr": 3e-3, "warmup_epochs": 1, "patience": 10, "log_every": 2,
                  "specaugment": {"freq_masks": 1, "freq_width": 2, "time_masks": 1, "time_width": 3}},
        "ttt": {"steps": 1, "lr": 1e-3, "chunk_size": 16},
        "device": "cpu",
    }
