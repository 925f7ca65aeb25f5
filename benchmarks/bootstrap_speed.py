"""Paired bootstrap speed: every pair of R runs over N test utterances, B resamples.

The vectorised path is `backend.stats.all_pairs` (resample counts @ [edits | chars] for all
runs at once, then per-pair differences). The baseline is the straightforward version: a
Python loop over resamples, each drawing N indices and summing every run's edits and
reference characters with numpy fancy indexing, then the pairs. The loop is timed on
``--loop-resamples`` resamples and scaled to B (it is linear in B).

    .venv/bin/python benchmarks/bootstrap_speed.py                   # 9 runs, 29,060 rows, 10,000 resamples
    .venv/bin/python benchmarks/bootstrap_speed.py --loop-resamples 10000   # time the full loop too
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from backend import stats  # noqa: E402


def synthetic(runs: int, rows: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Reference lengths like N'Ko test utterances (20-90 chars) and per-run error rates 0.15-0.35."""
    rng = np.random.default_rng(seed)
    chars = np.tile(rng.integers(20, 90, size=rows), (runs, 1))
    p = np.linspace(0.15, 0.35, runs)[:, None]
    edits = rng.binomial(chars, p)
    return edits, chars


def loop_pairs(edits: np.ndarray, chars: np.ndarray, resamples: int, seed: int) -> np.ndarray:
    runs, n = edits.shape
    rng = np.random.default_rng(seed)
    out = np.empty((resamples, runs * (runs - 1) // 2))
    for b in range(resamples):
        idx = rng.integers(0, n, size=n)
        cer = np.array([edits[r, idx].sum() / chars[r, idx].sum() for r in range(runs)])
        k = 0
        for i in range(runs):
            for j in range(i + 1, runs):
                out[b, k] = cer[j] - cer[i]
                k += 1
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=9)
    ap.add_argument("--rows", type=int, default=29_060)
    ap.add_argument("--resamples", type=int, default=10_000)
    ap.add_argument("--loop-resamples", type=int, default=1_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    edits, chars = synthetic(args.runs, args.rows)
    pairs = args.runs * (args.runs - 1) // 2
    print(f"{args.runs} runs ({pairs} pairs) x {args.rows:,} rows x {args.resamples:,} resamples; "
          f"{os.cpu_count()} CPUs, numpy {np.__version__}, load average {os.getloadavg()[0]:.1f}")
    best_wall = best_cpu = float("inf")
    for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        res = stats.all_pairs(edits, chars, args.resamples)
        best_wall, best_cpu = min(best_wall, time.perf_counter() - t), min(best_cpu, time.process_time() - c)
    assert len(res) == pairs
    print(f"vectorised: {best_wall:.2f} s wall (best of {args.repeats}), {best_cpu:.2f} s CPU")
    t, c = time.perf_counter(), time.process_time()
    loop_pairs(edits, chars, args.loop_resamples, 0)
    wall, cpu = time.perf_counter() - t, time.process_time() - c
    scale = args.resamples / args.loop_resamples
    print(f"per-resample loop: {wall:.2f} s wall for {args.loop_resamples:,} resamples -> "
          f"{wall * scale:.1f} s wall ({cpu * scale:.1f} s CPU) for {args.resamples:,}")
    print(f"speed-up: {wall * scale / best_wall:.1f}x wall, {cpu * scale / best_cpu:.1f}x CPU")


if __name__ == "__main__":
    main()
