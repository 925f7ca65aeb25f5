"""Audio loading for feature extraction: soundfile (WAV/FLAC/OGG Vorbis/Opus), mono,
resampled to 16 kHz with a windowed-sinc polyphase filter in torch (no ffmpeg, no scipy)."""

from __future__ import annotations

import math
from functools import lru_cache
from pathlib import Path

import numpy as np
import soundfile as sf
import torch
import torch.nn.functional as F
from models.errors import NkoOpsError

SAMPLE_RATE = 16000


class AudioError(NkoOpsError, ValueError):
    """Audio that cannot be used; the message starts with the feat_id when one is known."""


def _who(feat_id: str | None, path: Path) -> str:
    return f"{feat_id}: " if feat_id else f"{path}: "


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE, feat_id: str | None = None) -> np.ndarray:
    """Read ``path`` as a mono float32 waveform at ``sample_rate`` (channels averaged,
    resampled when the file's rate differs)."""
    path = Path(path)
    who = _who(feat_id, path)
    if not path.is_file():
        raise AudioError(f"{who}audio file not found: {path}")
    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, TypeError) as e:
        raise AudioError(f"{who}cannot read audio {path}: {e}") from e
    if data.shape[0] == 0:
        raise AudioError(f"{who}audio file has no samples: {path}")
    wave = data.mean(axis=1) if data.shape[1] > 1 else data[:, 0]
    if not np.isfinite(wave).all():
        raise AudioError(f"{who}audio contains NaN or infinite samples: {path}")
    if rate != sample_rate:
        wave = resample(wave, rate, sample_rate)
    return np.ascontiguousarray(wave, dtype=np.float32)


# Filter design: a Kaiser-windowed sinc low-pass at ``rolloff`` times the lower Nyquist
# frequency, ``zero_crossings`` lobes each side. Beta 12 puts the stop band near -120 dB.
ZERO_CROSSINGS = 32
ROLLOFF = 0.95
KAISER_BETA = 12.0
_MAX_KERNEL = 20_000_000  # phases x taps; rates whose reduced ratio is huge would need more


@lru_cache(maxsize=16)
def _polyphase_kernel(up: int, down: int) -> tuple[torch.Tensor, int]:
    """Weights ``[up, 1, taps]`` and the left context ``K - 1``: output sample ``q*up + p``
    sits at input position ``q*down + p*down/up`` and reads inputs ``q*down + j`` for
    ``j`` in ``[-(K-1), down-1+K]``."""
    cutoff = ROLLOFF * min(1.0, up / down)  # as a fraction of the input Nyquist frequency
    half_width = ZERO_CROSSINGS / cutoff  # in input samples
    k = math.ceil(half_width)
    taps = down + 2 * k - 1
    if up * taps > _MAX_KERNEL:
        raise AudioError(f"resampling ratio {down}:{up} needs a {up}x{taps} filter; convert the audio first")
    j = torch.arange(-(k - 1), down + k, dtype=torch.float64)  # input offsets
    phase = torch.arange(up, dtype=torch.float64)[:, None] * down / up  # output positions
    tau = phase - j[None, :]
    inside = tau.abs() <= half_width
    arg = (1.0 - (tau / half_width).clamp(-1, 1) ** 2).sqrt()
    window = torch.i0(KAISER_BETA * arg) / torch.i0(torch.tensor(KAISER_BETA, dtype=torch.float64))
    weights = cutoff * torch.sinc(cutoff * tau) * window * inside
    return weights.to(torch.float32)[:, None, :], k - 1


def resample(wave: np.ndarray, orig_sr: int, new_sr: int) -> np.ndarray:
    """Band-limited resampling of a 1-D signal; output length ``ceil(len * new / orig)``."""
    if orig_sr <= 0 or new_sr <= 0:
        raise AudioError(f"bad sample rates {orig_sr} -> {new_sr}")
    wave = np.asarray(wave, dtype=np.float32)
    if orig_sr == new_sr:
        return wave
    g = math.gcd(orig_sr, new_sr)
    up, down = new_sr // g, orig_sr // g
    weights, left = _polyphase_kernel(up, down)
    n_out = math.ceil(len(wave) * up / down)
    n_blocks = math.ceil(n_out / up)
    taps = weights.shape[-1]
    right = max(0, (n_blocks - 1) * down + taps - (len(wave) + left))
    x = F.pad(torch.from_numpy(wave)[None, None, :], (left, right))
    with torch.no_grad():
        y = F.conv1d(x, weights, stride=down)  # [1, up, n_blocks]: one row per output phase
    return y[0].T.reshape(-1)[:n_out].numpy().copy()
