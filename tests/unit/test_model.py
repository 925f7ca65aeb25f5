"""Acoustic model, trajectory scalars, attention bias, TTT adapter."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from models.config import TTTConfig
from models.model import CTCModel, Dims, ctc_min_frames, make_dims, output_lengths
from models.trajectory import SCALARS, TrajectoryBias, tar_loss, trajectory_scalars
from models.ttt import InPlaceTTTAdapter, ttt_logits

torch.set_num_threads(1)


# ---------------------------------------------------------------- reference loop (CONTRACTS §2 read literally)


def reference_scalars(s: np.ndarray) -> np.ndarray:
    """Frame-by-frame implementation of the module docstring's definitions for one utterance."""
    L = len(s)
    v = np.zeros_like(s)
    for t in range(1, L):
        v[t] = s[t] - s[t - 1]
    a = np.zeros_like(s)
    for t in range(1, L):
        a[t] = v[t] - v[t - 1]
    jerk = np.zeros_like(s)
    for t in range(1, L):
        jerk[t] = a[t] - a[t - 1]
    speed = [np.linalg.norm(v[t]) for t in range(L)]
    rng = max(np.linalg.norm(s[i] - s[j]) for i in range(L) for j in range(L))

    def ratio(x, m):
        return x / m if m > 0 else 0.0

    c = [1 - ratio(speed[t], max(speed)) for t in range(L)]
    u = []
    for t in range(L):
        earlier = sorted(range(t), key=lambda j: np.linalg.norm(s[t] - s[j]))[:5]
        counts = [0] * 8
        for j in earlier:
            d = s[t] - s[j]
            den = np.linalg.norm(d) * np.linalg.norm(v[t])
            cos = float(np.dot(d, v[t]) / den) if den > 0 else 0.0
            theta = math.acos(max(-1.0, min(1.0, cos)))
            counts[min(7, int(math.floor(theta / math.pi * 8)))] += 1
        n = sum(counts)
        u.append(-sum(k / n * math.log(k / n) for k in counts if k) / math.log(8) if n else 0.0)
    dc = [0.0] + [c[t] - c[t - 1] for t in range(1, L)]
    du = [0.0] + [u[t] - u[t - 1] for t in range(1, L)]

    def smooth(x, t):
        w = x[max(0, t - 2): t + 1]
        return sum(w) / len(w)

    tp = [smooth(dc, t) - smooth(du, t) for t in range(L)]
    high = [j for j in range(L) if u[j] >= 0.5]
    rm = []
    for t in range(L):
        d = min((np.linalg.norm(s[t] - s[j]) for j in high), default=rng)
        rm.append(1 - (d / rng if rng > 0 else 1.0))
    ps = []
    for t in range(L):
        v1 = v[t - 1] if t >= 1 else np.zeros_like(s[0])
        v2 = v[t - 2] if t >= 2 else np.zeros_like(s[0])
        den = np.linalg.norm(v1) * np.linalg.norm(v2)
        ps.append(((np.dot(v1, v2) / den if den > 0 else 0.0) + 1) / 2)
    nov = [ratio(min(np.linalg.norm(s[t] - s[j]) for j in range(t)), rng) if t else 0.0 for t in range(L)]
    jn = [np.linalg.norm(jerk[t]) for t in range(L)]
    st = [1 - ratio(jn[t], max(jn)) for t in range(L)]
    return np.array([c, u, tp, rm, ps, nov, st]).T


def test_trajectory_scalars_vectorised_match_reference_loop():
    g = torch.Generator().manual_seed(3)
    lengths = [17, 11, 4]
    B, T, D = len(lengths), max(lengths), 6
    states = torch.randn(B, T, D, generator=g, dtype=torch.float64).cumsum(1)  # a walk, so directions matter
    mask = torch.arange(T)[None] < torch.tensor(lengths)[:, None]
    z = trajectory_scalars(states, mask)
    assert z.shape == (B, T, len(SCALARS))
    for b, n in enumerate(lengths):
        ref = reference_scalars(states[b, :n].numpy())
        np.testing.assert_allclose(z[b, :n].numpy(), ref, atol=1e-9, err_msg=f"utterance {b}")
        assert torch.all(z[b, n:] == 0)
    u = z[..., SCALARS.index("uncertainty")]
    assert (u > 0.5).any() and (u < 0.5).any()  # the high-uncertainty branch of recovery margin is exercised


def test_trajectory_scalars_ranges_and_no_grad():
    states = torch.randn(2, 30, 8, requires_grad=True)
    z = trajectory_scalars(states, torch.ones(2, 30, dtype=torch.bool))
    assert not z.requires_grad
    bounded = [i for i, n in enumerate(SCALARS) if n != "transition_pressure"]
    assert z[..., bounded].min() >= 0 and z[..., bounded].max() <= 1 + 1e-6


def test_v3_dims_and_parameter_count():
    d = Dims()
    assert (d.n_input, d.d_model, d.conv_kernel, d.conv_stride, d.conv_padding) == (1280, 768, 5, 4, 2)
    assert (d.n_layers, d.n_heads, d.d_ff, d.dropout, d.n_vocab) == (6, 12, 3072, 0.1, 66)
    n = sum(p.numel() for p in CTCModel(d).parameters())
    assert round(n / 1e6, 1) == 46.9  # the program's V3 size
    assert output_lengths(torch.tensor([375]), d).item() == 94
    with pytest.raises(ValueError, match="n_heads"):
        make_dims("tiny", n_heads=3)


def test_ctc_min_frames_counts_repeats():
    assert ctc_min_frames([1, 2, 3]) == 3
    assert ctc_min_frames([1, 1, 2, 2, 2]) == 8


def test_padding_does_not_change_an_utterance():
    torch.manual_seed(0)
    model = CTCModel(make_dims("tiny"), trajectory=True).eval()
    with torch.no_grad():
        model.traj.g[2].weight.normal_()  # non-zero trajectory bias
    a, b = torch.randn(1, 9, 16), torch.randn(1, 14, 16)
    batch = torch.zeros(2, 14, 16)
    batch[0, :9], batch[1] = a[0], b[0]
    with torch.no_grad():
        both = model(batch, torch.tensor([9, 14]))
        alone = model(a, torch.tensor([9]))
    assert both.lengths.tolist() == [9, 14]
    torch.testing.assert_close(both.logits[0, :9], alone.logits[0], atol=1e-5, rtol=1e-5)


def test_trajectory_model_starts_as_baseline_and_bias_is_per_head():
    torch.manual_seed(0)
    base = CTCModel(make_dims("tiny")).eval()
    traj = CTCModel(make_dims("tiny"), trajectory=True).eval()
    traj.load_state_dict(base.state_dict(), strict=False)
    x = torch.randn(2, 12, 16)
    n = torch.tensor([12, 7])
    with torch.no_grad():
        torch.testing.assert_close(traj(x, n).logits, base(x, n).logits)
    bias = TrajectoryBias(n_heads=3, hidden=4)
    with torch.no_grad():
        bias.g[2].weight.normal_()
        bias.offset.copy_(torch.tensor([0.0, 1.0, -1.0]))
    z = torch.rand(1, 5, 7)
    out = bias(z)
    assert out.shape == (1, 3, 5, 5)
    g = bias.g(z)[0]  # [T, H]
    s = torch.nn.functional.softplus(bias.decay)
    for h, i, j in [(1, 2, 4), (1, 4, 2), (2, 0, 3), (0, 3, 3)]:  # bias[h, i, j] = g_h(z_i) exp(-s_h |i-j| 0.01 + o_h)
        torch.testing.assert_close(out[0, h, i, j], g[i, h] * torch.exp(-s[h] * abs(i - j) * 0.01 + bias.offset[h]))


def test_tar_loss_is_differentiable_and_masked():
    torch.manual_seed(0)
    head = torch.nn.Linear(8, 7)
    h = torch.randn(2, 10, 8, requires_grad=True)
    mask = torch.arange(10)[None] < torch.tensor([10, 6])[:, None]
    loss, parts = tar_loss(h, mask, head, weight=0.5, smooth_weight=0.1)
    loss.backward()
    assert h.grad is not None and head.weight.grad is not None
    assert h.grad[1, 6:].abs().sum() == 0  # padded frames play no part
    assert parts["tar_anticipation"] > 0 and parts["tar_smooth"] > 0


# ---------------------------------------------------------------- TTT


def _ctc_like_model(seed: int = 0) -> CTCModel:
    """A tiny model whose output looks like a trained CTC head: mostly blank, some letters."""
    torch.manual_seed(seed)
    model = CTCModel(make_dims("tiny"), trajectory=True).eval()
    with torch.no_grad():
        model.head.bias.zero_()
        model.head.bias[0] = 1.2
    return model


def test_zero_delta_adapter_and_zero_steps_are_exact():
    model = _ctc_like_model()
    x, n = torch.randn(1, 40, 16), torch.tensor([40])
    with torch.no_grad():
        plain = model(x, n).logits[0]
    adapter = InPlaceTTTAdapter(model, rank=4)
    with torch.no_grad():
        hooked = model(x, n).logits[0]
    adapter.remove()
    assert torch.equal(hooked, plain)
    out, stats = ttt_logits(model, x, n, TTTConfig(steps=0, chunk_size=8))
    assert torch.equal(out, plain) and stats["steps"] == 0


def test_ttt_adapts_resets_and_leaves_weights_alone():
    model = _ctc_like_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x, n = torch.randn(1, 40, 16), torch.tensor([40])
    cfg = TTTConfig(steps=3, lr=0.5, chunk_size=16, guard=False)
    first, stats = ttt_logits(model, x, n, cfg)
    again, _ = ttt_logits(model, x, n, cfg)
    with torch.no_grad():
        plain = model(x, n).logits[0]
    assert stats["steps"] == 9  # 3 chunks x 3 steps
    assert not torch.allclose(first, plain)
    assert torch.equal(first, again)  # fast weights reset per utterance
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    ent = lambda lg: -(lg.log_softmax(-1).exp() * lg.log_softmax(-1)).sum(-1)  # noqa: E731
    nonblank = plain.argmax(-1) != 0
    assert ent(first)[nonblank].mean() < ent(plain)[nonblank].mean()
    suta, s2 = ttt_logits(model, x, n, TTTConfig(steps=2, lr=0.5, method="suta", guard=False))
    assert s2["steps"] == 2 and not torch.allclose(suta, plain)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


@pytest.mark.parametrize("method", ["adapter", "suta"])
def test_ttt_collapse_guard(method):
    model = _ctc_like_model()
    x, n = torch.randn(1, 48, 16), torch.tensor([48])
    with torch.no_grad():
        start = (model(x, n).logits[0].argmax(-1) != 0).float().mean().item()
    assert 0.1 < start < 0.9
    base = dict(steps=8, lr=50.0, chunk_size=48, frames="all", method=method)
    collapsed, _ = ttt_logits(model, x, n, TTTConfig(**base, guard=False))
    guarded, stats = ttt_logits(model, x, n, TTTConfig(**base, guard=True, guard_ratio=0.5))
    frac = lambda lg: (lg.argmax(-1) != 0).float().mean().item()  # noqa: E731
    assert frac(collapsed) < 0.5 * start  # unguarded entropy minimisation collapses to blanks
    assert frac(guarded) >= 0.5 * start
    assert stats["guard_reverts"] >= 1
