"""Paired bootstrap over test utterances for corpus-level CER.

Every run of a matrix is scored on the same test utterances, so one resample of utterance
indices applies to all runs at once (paired). A resample is summarised by its *counts*
(how often each utterance was drawn); the resampled edit and reference-char totals of every
run are then one matrix product ``counts @ [edits | chars]``, so all runs and all pairs cost
one pass over the resamples instead of a Python loop per resample and pair.

Resampled CERs are exact: the products are sums of integers, computed in float32 only when
every possible total stays below 2**24 (else float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

RESAMPLES = 10_000
SEED = 42
# Resamples per matrix product. Small on purpose: a chunk's indices and counts stay in cache,
# and OpenBLAS keeps a 16-row product on one thread; with 32+ rows it splits this skinny
# product across threads and ran 3x slower on the shared 2-core build machine.
CHUNK = 16


def draw_indices(bitgen: np.random.PCG64, n: int, count: int) -> np.ndarray:
    """``count`` independent uniform indices in [0, n) as int64: Lemire's multiply-shift on
    32-bit words from ``bitgen`` (two per 64-bit output), with its rejection step so the draw
    is exactly uniform (a word is redrawn, rarely: < n / 2**32 of them)."""
    if not 0 < n < 2 ** 31:
        raise ValueError(f"row count {n} out of range")
    words = bitgen.random_raw((count + 1) // 2).view(np.uint32)[:count]
    threshold = (2 ** 32) % n
    bad = np.flatnonzero(np.multiply(words, np.uint32(n)) < threshold)  # low 32 bits of words * n
    idx = np.multiply(words, np.uint64(n), dtype=np.uint64)
    np.right_shift(idx, np.uint64(32), out=idx)
    idx = idx.view(np.int64)
    for i in bad:  # sequential, so the stream (and the result) depends only on the seed
        while True:
            w = int(bitgen.random_raw()) & 0xFFFFFFFF
            if (w * n) & 0xFFFFFFFF >= threshold:
                idx[i] = (w * n) >> 32
                break
    return idx


def resampled_totals(edits: np.ndarray, chars: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED,
                     chunk: int = CHUNK) -> tuple[np.ndarray, np.ndarray]:
    """Bootstrap totals. ``edits``/``chars``: [runs, rows] per-utterance integers in a fixed
    row order. Returns (edit totals, char totals), each [resamples, runs]. Indices come from
    ``draw_indices(PCG64(seed), rows, b * rows)`` per chunk of b resamples, row-major."""
    edits = np.atleast_2d(np.asarray(edits))
    chars = np.atleast_2d(np.asarray(chars))
    if edits.shape != chars.shape:
        raise ValueError(f"edits {edits.shape} and chars {chars.shape} differ in shape")
    runs, n = edits.shape
    if n == 0:
        raise ValueError("no rows to resample")
    x = np.concatenate([edits, chars]).T  # [rows, 2*runs]
    worst = n * float(np.abs(x).max(initial=0))
    dtype = np.float32 if worst < 2 ** 24 else np.float64
    x = np.ascontiguousarray(x, dtype=dtype)
    out = np.empty((resamples, 2 * runs), dtype=np.float64)
    bitgen = np.random.PCG64(seed)
    counts = np.empty((min(chunk, resamples), n), dtype=dtype)
    for start in range(0, resamples, chunk):
        b = min(chunk, resamples - start)
        idx = draw_indices(bitgen, n, b * n).reshape(b, n)
        for i in range(b):  # one resample's counts fit in cache; a single bincount over the chunk does not
            counts[i] = np.bincount(idx[i], minlength=n)
        out[start:start + b] = counts[:b] @ x
    return out[:, :runs], out[:, runs:]


def resampled_cer(edits: np.ndarray, chars: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """[resamples, runs] corpus CER of each run on each resample (a resample with no
    reference characters, possible only with all-empty references, gives NaN)."""
    e, c = resampled_totals(edits, chars, resamples, seed)
    with np.errstate(invalid="ignore", divide="ignore"):
        return e / c


@dataclass(frozen=True)
class Delta:
    """CER(candidate) − CER(reference) with its bootstrap 95% CI; negative = improvement."""

    delta: float
    lo: float
    hi: float
    p_improvement: float
    resamples: int

    def as_dict(self) -> dict:
        return {"delta": self.delta, "ci_lo": self.lo, "ci_hi": self.hi,
                "p_improvement": self.p_improvement, "resamples": self.resamples}


def delta_from_samples(point: float, samples: np.ndarray, level: float = 0.95) -> Delta:
    samples = samples[~np.isnan(samples)]
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return Delta(float(point), float(lo), float(hi), float(np.mean(samples < 0)), int(samples.size))


def ci_from_samples(samples: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    samples = samples[~np.isnan(samples)]
    tail = (1 - level) / 2 * 100
    lo, hi = np.percentile(samples, [tail, 100 - tail])
    return float(lo), float(hi)


def paired_delta(edits_a, chars_a, edits_b, chars_b, resamples: int = RESAMPLES, seed: int = SEED) -> Delta:
    """ΔCER = CER(a) − CER(b) over the same utterances (rows aligned), with a paired
    bootstrap 95% CI and P(a better than b) = share of resamples with Δ < 0."""
    e = np.stack([np.asarray(edits_a), np.asarray(edits_b)])
    c = np.stack([np.asarray(chars_a), np.asarray(chars_b)])
    cer = resampled_cer(e, c, resamples, seed)
    point = e[0].sum() / c[0].sum() - e[1].sum() / c[1].sum()
    return delta_from_samples(point, cer[:, 0] - cer[:, 1])


def all_pairs(edits: np.ndarray, chars: np.ndarray, resamples: int = RESAMPLES, seed: int = SEED) -> dict:
    """{(i, j): Delta of run j vs run i} for every pair i < j of the [runs, rows] arrays."""
    cer = resampled_cer(edits, chars, resamples, seed)
    point = edits.sum(axis=1) / chars.sum(axis=1)
    out = {}
    runs = edits.shape[0]
    for i in range(runs):
        for j in range(i + 1, runs):
            out[(i, j)] = delta_from_samples(point[j] - point[i], cer[:, j] - cer[:, i])
    return out


def seed_draws(seeds: list[int], resamples: int = RESAMPLES, seed: int = SEED) -> np.ndarray:
    """[resamples, k] positions into ``seeds`` (k of them) drawn with replacement, the
    seed-level half of the hierarchical bootstrap. Deterministic in (seeds, resamples, seed):
    two groups with the same seed list get the same draws, so their seed resampling is paired."""
    key = np.random.SeedSequence([seed, len(seeds), *[s & 0xFFFFFFFF for s in sorted(seeds)]])
    return np.random.Generator(np.random.PCG64(key)).integers(0, len(seeds), size=(resamples, len(seeds)))


def hierarchical_means(cer_b: np.ndarray, cols: list[int], seeds: list[int], seed: int = SEED) -> np.ndarray:
    """[resamples] mean CER of a group of runs under the hierarchical bootstrap: per resample,
    the group's seeds are drawn with replacement (``seed_draws``) and each drawn run is scored
    on that resample's utterances (``cer_b`` [resamples, runs] from ``resampled_cer``, one
    utterance draw shared by every run). ``cols`` are the group's columns in ``cer_b``, in the
    order of ``seeds``. A single-seed group reduces to the utterance bootstrap."""
    order = np.argsort(seeds, kind="stable")
    cols = np.asarray(cols)[order]
    if len(cols) == 1:
        return cer_b[:, cols[0]]
    pos = seed_draws(list(seeds), cer_b.shape[0], seed)
    return np.take_along_axis(cer_b[:, cols], pos, axis=1).mean(axis=1)


HIERARCHICAL = ("hierarchical bootstrap: each resample draws the test utterances with replacement (one draw shared "
                "by all runs, so comparisons are paired by utterance) and, within every group of seeds, the seeds "
                "with replacement (groups with the same seeds share the seed draw, so they are paired by seed too)")
