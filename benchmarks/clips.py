"""Clips for the feature benchmarks: the sample corpus (data/sample) when it is there,
else a synthetic set (noise-modulated tones, 1-5 s) so the scripts run anywhere."""

from __future__ import annotations

from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "data" / "sample"


def load_clips(limit: int = 300, snapshot: Path | None = SAMPLE, seed: int = 0) -> tuple[list[str], list[np.ndarray], str]:
    """``(feat_ids, 16 kHz waveforms, description)`` for up to ``limit`` clips."""
    from models.audio import load_audio
    from models.snapshot import load

    if snapshot is not None and (Path(snapshot) / "pairs.jsonl").is_file():
        snap = load(snapshot)
        rows = snap.rows[:limit]
        waves = [load_audio(snap.audio_path(r), feat_id=r["feat_id"]) for r in rows]
        return [r["feat_id"] for r in rows], waves, f"{len(rows)} clips of {snap.path} (sha256 {snap.sha256[:12]})"
    rng = np.random.default_rng(seed)
    ids, waves = [], []
    for i in range(limit):
        n = int(rng.uniform(1.0, 5.0) * 16000)
        t = np.arange(n) / 16000
        w = np.sin(2 * np.pi * rng.uniform(100, 400) * t) * (0.5 + 0.5 * np.sin(2 * np.pi * 3 * t))
        waves.append((0.2 * w + 0.01 * rng.standard_normal(n)).astype(np.float32))
        ids.append(f"synthetic_{i:05d}")
    return ids, waves, f"{limit} synthetic clips, 1-5 s (seed {seed})"


def seconds(waves: list[np.ndarray]) -> float:
    return sum(len(w) for w in waves) / 16000
