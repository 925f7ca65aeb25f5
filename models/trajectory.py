"""Trajectory state of a sequence of hidden states, its attention bias, and TAR.

**The 7 scalars** (CONTRACTS §2), per frame t of one utterance with states s_0..s_{L-1}.
Differences use zero before the first frame: Δx_t = x_t − x_{t−1} for t ≥ 1, Δx_0 = 0.
v = Δs (velocity), a = Δv, jerk = Δa. ``range`` is the utterance's diameter,
max_{i,j} ‖s_i − s_j‖. Maxima are taken over the utterance; a zero maximum gives ratio 0.

1. commitment        c_t = 1 − ‖v_t‖ / max_u ‖v_u‖
2. uncertainty       u_t = H(p) / ln 8, where p is the histogram over 8 equal bins of [0, π]
                     of the angles between v_t and the displacements s_t − s_j to the K=5
                     nearest earlier states j < t (fewer when t < 5; an undefined angle —
                     zero-length vector — counts as π/2); u_0 = 0.
3. transition        smooth(Δc)_t − smooth(Δu)_t, smooth = causal mean over the last 3 frames.
   pressure
4. recovery margin   1 − d_t / range, d_t = distance from s_t to the nearest high-uncertainty
                     state (u ≥ 0.5, any frame of the utterance); no such state: d_t = range.
5. phase stiffness   (cos(v_{t−1}, v_{t−2}) + 1) / 2, cos of a zero vector = 0.
6. novelty           min_{j<t} ‖s_t − s_j‖ / range; 0 at t = 0 (no history).
7. stability         1 − ‖jerk_t‖ / max_u ‖jerk_u‖.

``trajectory_scalars`` computes all of them for a padded batch at once (pairwise distances
and top-k, no loop over frames) and without gradients: they are features of the trajectory,
not something the model is trained to move.

**Attention bias** (trajectory mode): bias[h, i, j] = g_h(z_i) · exp(−s_h·|i−j|·0.01 + o_h),
g a 7→hidden→heads MLP (last layer zero-initialised, so training starts from the baseline),
s_h = softplus(ŝ_h) > 0 and o_h learned per head. Added to the attention logits of every
layer, next to the key-padding mask.

**TAR — Trajectory Anticipation Regulariser** (mode "tar", this project's definition).
With h_t the final encoder states (after the last LayerNorm, the states the CTC head reads),
z_t = trajectory_scalars(h)_t computed without gradient, A a linear anticipation head
(d_model → 7) and M the number of valid (t, t+1) pairs:

    L_TAR = λ_a · (1/M) Σ_t ‖A(h_t) − z_{t+1}‖² / 7  +  λ_s · (1/M) Σ_t ‖h_{t+1} − h_t‖² / d_model
    L     = L_CTC + L_TAR

λ_a is ``tar.weight`` (default 0.1) and λ_s ``tar.smooth_weight`` (default 0.01). The first
term asks each state to anticipate where the trajectory goes next; the second keeps it
temporally smooth. The encoder is the baseline one (no attention bias); A is dropped at
decode time.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.summary_keys import SCALARS

K_NEAREST = 5
ANGLE_BINS = 8
SMOOTH_WINDOW = 3
HIGH_UNCERTAINTY = 0.5
DECAY_SCALE = 0.01


def _delta(x: torch.Tensor) -> torch.Tensor:
    """x_t − x_{t−1} along dim 1, zero at t = 0."""
    return torch.cat([torch.zeros_like(x[:, :1]), x[:, 1:] - x[:, :-1]], dim=1)


def _shift(x: torch.Tensor, k: int) -> torch.Tensor:
    """x_{t−k} along dim 1, zero for t < k."""
    if k >= x.shape[1]:
        return torch.zeros_like(x)
    return torch.cat([torch.zeros_like(x[:, :k]), x[:, :-k]], dim=1)


def _ratio(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(num.dtype).tiny), torch.zeros_like(num))


def _causal_mean(x: torch.Tensor, window: int) -> torch.Tensor:
    cs = torch.cumsum(x, dim=1)
    total = cs - _shift(cs, window)
    count = torch.clamp(torch.arange(1, x.shape[1] + 1, device=x.device), max=window).to(x.dtype)
    return total / count


@torch.no_grad()
def trajectory_scalars(states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """states [B, T, D], mask [B, T] (True on valid frames, a prefix) -> [B, T, 7] in SCALARS
    order, zero on padded frames."""
    s = states.detach() * mask[..., None]
    m = mask.to(s.dtype)
    B, T, _ = s.shape
    v = _delta(s) * m[..., None]
    speed = v.norm(dim=-1)
    commitment = 1 - _ratio(speed, speed.amax(dim=1, keepdim=True))

    dist = torch.cdist(s, s)  # [B, T, T]
    pair = mask[:, :, None] & mask[:, None, :]
    rng = dist.masked_fill(~pair, 0).amax(dim=(1, 2))[:, None]  # [B, 1]
    earlier = torch.ones(T, T, dtype=torch.bool, device=s.device).tril(-1)[None] & pair

    # uncertainty: angle between v_t and s_t − s_j for the K nearest earlier j
    k = min(K_NEAREST, T)
    near_d, near_j = dist.masked_fill(~earlier, math.inf).topk(k, dim=2, largest=False)
    has = torch.isfinite(near_d)
    sv = torch.einsum("btd,bjd->btj", v, s)  # v_t · s_j
    dot = (sv.diagonal(dim1=1, dim2=2)[..., None] - sv.gather(2, near_j))  # (s_t − s_j) · v_t
    den = near_d.masked_fill(~has, 0) * speed[..., None]
    cos = _ratio(dot, den).clamp(-1, 1)
    bins = torch.clamp((torch.arccos(cos) / math.pi * ANGLE_BINS).floor().long(), max=ANGLE_BINS - 1)
    counts = (F.one_hot(bins, ANGLE_BINS).to(s.dtype) * has[..., None]).sum(dim=2)
    p = _ratio(counts, counts.sum(dim=-1, keepdim=True))
    uncertainty = -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1) / math.log(ANGLE_BINS) * m

    pressure = (_causal_mean(_delta(commitment * m) * m, SMOOTH_WINDOW)
                - _causal_mean(_delta(uncertainty) * m, SMOOTH_WINDOW))

    high = (uncertainty >= HIGH_UNCERTAINTY) & mask
    to_high = dist.masked_fill(~high[:, None, :], math.inf).amin(dim=2)
    to_high = torch.where(torch.isfinite(to_high), to_high, rng.expand(B, T))
    recovery = 1 - torch.where(rng > 0, to_high / rng.clamp_min(torch.finfo(s.dtype).tiny), torch.ones_like(to_high))

    v1, v2 = _shift(v, 1), _shift(v, 2)
    stiffness = (_ratio((v1 * v2).sum(-1), v1.norm(dim=-1) * v2.norm(dim=-1)) + 1) / 2

    hist = dist.masked_fill(~earlier, math.inf).amin(dim=2)
    novelty = _ratio(torch.where(torch.isfinite(hist), hist, torch.zeros_like(hist)), rng.expand(B, T))

    jerk = _delta(_delta(v) * m[..., None]) * m[..., None]
    jn = jerk.norm(dim=-1)
    stability = 1 - _ratio(jn, jn.amax(dim=1, keepdim=True))

    z = torch.stack([commitment, uncertainty, pressure, recovery, stiffness, novelty, stability], dim=-1)
    return z * m[..., None]


class TrajectoryBias(nn.Module):
    """z [B, T, 7] -> additive attention bias [B, heads, T, T]."""

    def __init__(self, n_heads: int, hidden: int):
        super().__init__()
        self.g = nn.Sequential(nn.Linear(len(SCALARS), hidden), nn.GELU(), nn.Linear(hidden, n_heads))
        nn.init.zeros_(self.g[2].weight)
        nn.init.zeros_(self.g[2].bias)
        self.decay = nn.Parameter(torch.full((n_heads,), math.log(math.e - 1)))  # softplus -> 1.0
        self.offset = nn.Parameter(torch.zeros(n_heads))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        T = z.shape[1]
        pos = torch.arange(T, device=z.device, dtype=z.dtype)
        gap = (pos[:, None] - pos[None, :]).abs()
        s = F.softplus(self.decay)
        kernel = torch.exp(-s[:, None, None] * gap * DECAY_SCALE + self.offset[:, None, None])  # [H, T, T]
        g = self.g(z).transpose(1, 2)  # [B, H, T]
        return g[..., None] * kernel[None]


def tar_loss(hidden: torch.Tensor, mask: torch.Tensor, head: nn.Module, weight: float,
             smooth_weight: float) -> tuple[torch.Tensor, dict]:
    """L_TAR as defined in the module docstring; returns (loss, parts as floats)."""
    z = trajectory_scalars(hidden.float(), mask)
    pair = (mask[:, 1:] & mask[:, :-1]).to(hidden.dtype)
    n = pair.sum().clamp_min(1)
    pred = head(hidden[:, :-1])
    anticipation = (((pred.float() - z[:, 1:]) ** 2).mean(-1) * pair).sum() / n
    smooth = (((hidden[:, 1:] - hidden[:, :-1]).float() ** 2).mean(-1) * pair).sum() / n
    loss = weight * anticipation + smooth_weight * smooth
    return loss, {"tar_anticipation": anticipation.item(), "tar_smooth": smooth.item()}
