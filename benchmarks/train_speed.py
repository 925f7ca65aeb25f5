"""Training throughput: the trainer's step vs a naive fp32 version of the same model.

    python benchmarks/train_speed.py --mode trajectory --utts 96 --batch 16 --threads 1

Both sides train the same CTCModel weights on the same synthetic utterances (80-d
features, lengths drawn like data/sample's 50 fps log-mel clips), fp32, CPU:

* optimised — what models/train.py does: length-bucketed batches, SDPA with one additive
  bias mask, trajectory scalars vectorised over the batch, one batched CTC loss.
* naive — random batches padded to the longest utterance of the whole set; attention as
  explicit softmax(QKᵀ/√d + bias)·V in a Python loop over heads; trajectory scalars by a
  Python loop over frames (per utterance); CTC loss utterance by utterance.

Reported: seconds per step, real (unpadded) input frames per second and the time for one
epoch over the utterances; the ratio is optimised / naive frames per second. A first
check asserts both sides give the same loss on one batch (they are the same function).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import numpy as np
import torch
import torch.nn.functional as F

from models.model import CTCModel, make_dims, output_lengths
from models.trajectory import ANGLE_BINS, HIGH_UNCERTAINTY, K_NEAREST, SMOOTH_WINDOW


def synthetic(n: int, dim: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    rng = np.random.default_rng(seed)
    frames = np.clip(rng.lognormal(math.log(130), 0.35, n), 48, 320).astype(int)  # 50 fps, ~1-6 s clips
    out = []
    for t in frames:
        labels = rng.integers(1, 66, size=max(2, int(t / 5)))
        out.append((torch.from_numpy(rng.normal(0, 1, (t, dim)).astype(np.float32)), torch.from_numpy(labels)))
    return out


def batch_of(items, pad_to: int | None = None):
    T = pad_to or max(x.shape[0] for x, _ in items)
    x = torch.zeros(len(items), T, items[0][0].shape[1])
    for i, (f, _) in enumerate(items):
        x[i, : f.shape[0]] = f
    n = torch.tensor([f.shape[0] for f, _ in items])
    y = torch.cat([lab for _, lab in items])
    yl = torch.tensor([len(lab) for _, lab in items])
    return x, n, y, yl


# ---------------------------------------------------------------- naive side


def naive_scalars(s: torch.Tensor) -> torch.Tensor:
    """Frame-by-frame trajectory scalars of one utterance [L, D] (same definitions)."""
    L = s.shape[0]
    zero = torch.zeros_like(s[0])
    v = [zero] + [s[t] - s[t - 1] for t in range(1, L)]
    a = [zero] + [v[t] - v[t - 1] for t in range(1, L)]
    j = [zero] + [a[t] - a[t - 1] for t in range(1, L)]
    speed = [float(x.norm()) for x in v]
    rng = max(float((s[i] - s[k]).norm()) for i in range(L) for k in range(L))
    ratio = lambda x, m: x / m if m > 0 else 0.0  # noqa: E731
    c = [1 - ratio(sp, max(speed)) for sp in speed]
    u = []
    for t in range(L):
        near = sorted(range(t), key=lambda k: float((s[t] - s[k]).norm()))[:K_NEAREST]
        counts = [0] * ANGLE_BINS
        for k in near:
            d = s[t] - s[k]
            den = float(d.norm()) * speed[t]
            cos = float(d @ v[t]) / den if den > 0 else 0.0
            counts[min(ANGLE_BINS - 1, int(math.acos(max(-1.0, min(1.0, cos))) / math.pi * ANGLE_BINS))] += 1
        tot = sum(counts)
        u.append(-sum(q / tot * math.log(q / tot) for q in counts if q) / math.log(ANGLE_BINS) if tot else 0.0)
    dc = [0.0] + [c[t] - c[t - 1] for t in range(1, L)]
    du = [0.0] + [u[t] - u[t - 1] for t in range(1, L)]
    sm = lambda x, t: sum(x[max(0, t - SMOOTH_WINDOW + 1): t + 1]) / len(x[max(0, t - SMOOTH_WINDOW + 1): t + 1])  # noqa: E731
    high = [k for k in range(L) if u[k] >= HIGH_UNCERTAINTY]
    jn = [float(x.norm()) for x in j]
    rows = []
    for t in range(L):
        d_high = min((float((s[t] - s[k]).norm()) for k in high), default=rng)
        v1, v2 = (v[t - 1] if t >= 1 else zero), (v[t - 2] if t >= 2 else zero)
        den = float(v1.norm() * v2.norm())
        nov = ratio(min(float((s[t] - s[k]).norm()) for k in range(t)), rng) if t else 0.0
        rows.append([c[t], u[t], sm(dc, t) - sm(du, t), 1 - (d_high / rng if rng > 0 else 1.0),
                     ((float(v1 @ v2) / den if den > 0 else 0.0) + 1) / 2, nov, 1 - ratio(jn[t], max(jn))])
    return torch.tensor(rows, dtype=s.dtype)


def naive_forward(m: CTCModel, x: torch.Tensor, lengths: torch.Tensor):
    d = m.dims
    h = m.drop(F.gelu(m.inp(x)))
    h = h * (torch.arange(x.shape[1])[None, :, None] < lengths[:, None, None])
    h = F.gelu(m.conv(h.transpose(1, 2))).transpose(1, 2)
    B, T, D = h.shape
    h = m.drop(h + m.pos[:T])
    out_len = output_lengths(lengths, d).clamp(min=1, max=T)
    mask = torch.arange(T)[None] < out_len[:, None]
    bias = torch.zeros(B, 1, T, T).masked_fill(~mask[:, None, None, :], float("-inf"))
    if m.traj is not None:
        z = torch.zeros(B, T, 7)
        with torch.no_grad():
            for b in range(B):
                z[b, : out_len[b]] = naive_scalars(h[b, : out_len[b]].detach())
        bias = bias + m.traj(z)
    hd = D // d.n_heads
    for blk in m.blocks:
        q, k, v = blk.qkv(blk.ln1(h)).split(D, dim=-1)
        heads = []
        for i in range(d.n_heads):
            sl = slice(i * hd, (i + 1) * hd)
            att = q[..., sl] @ k[..., sl].transpose(1, 2) / math.sqrt(hd) + bias[:, min(i, bias.shape[1] - 1)]
            heads.append(F.dropout(att.softmax(-1), blk.p, m.training) @ v[..., sl])
        h = h + blk.drop(blk.proj(torch.cat(heads, -1)))
        h = h + blk.drop(blk.fc2(F.gelu(blk.fc1(blk.ln2(h)))))
    return m.head(m.ln(h)), out_len


def naive_loss(m, x, n, y, yl):
    logits, out_len = naive_forward(m, x, n)
    lp = logits.log_softmax(-1)
    losses, start = [], 0
    for b in range(x.shape[0]):
        lab = y[start: start + yl[b]]
        start += int(yl[b])
        losses.append(F.ctc_loss(lp[b, : out_len[b], None], lab[None], out_len[b: b + 1], yl[b: b + 1],
                                 zero_infinity=True))
    return torch.stack(losses).mean()


def fast_loss(m, x, n, y, yl):
    o = m(x, n)
    lp = o.logits.float().log_softmax(-1).transpose(0, 1)
    return (F.ctc_loss(lp, y, o.lengths, yl, reduction="none", zero_infinity=True) / yl).mean()


# ---------------------------------------------------------------- timing


def time_steps(model, loss_fn, batches, steps: int) -> tuple[float, int]:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    model.train()
    frames = 0
    t0 = time.perf_counter()
    for x, n, y, yl in batches[:steps]:
        loss = loss_fn(model, x, n, y, yl)
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        frames += int(n.sum())
    return time.perf_counter() - t0, frames


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mode", choices=["baseline", "trajectory"], default="trajectory")
    ap.add_argument("--preset", default="demo")
    ap.add_argument("--utts", type=int, default=96)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--steps", type=int, default=3, help="batches timed per side (the epoch time is extrapolated)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dims = make_dims(args.preset, n_input=80, dropout=0.0)
    data = synthetic(args.utts, 80, args.seed)
    torch.manual_seed(args.seed)
    model = CTCModel(dims, trajectory=args.mode == "trajectory")
    with torch.no_grad():
        if model.traj is not None:
            model.traj.g[2].weight.normal_(0, 0.1)  # a live bias, as after training

    # same function: losses agree on one batch
    x, n, y, yl = batch_of(data[:4])
    model.eval()
    with torch.no_grad():
        diff = abs(fast_loss(model, x, n, y, yl).item() - naive_loss(model, x, n, y, yl).item())
    assert diff < 1e-3, f"naive and optimised losses differ by {diff}"

    order = sorted(range(len(data)), key=lambda i: data[i][0].shape[0])
    fast_batches = [batch_of([data[i] for i in order[k:k + args.batch]]) for k in range(0, len(order), args.batch)]
    g = torch.Generator().manual_seed(args.seed)
    fast_batches = [fast_batches[i] for i in torch.randperm(len(fast_batches), generator=g).tolist()]
    longest = max(f.shape[0] for f, _ in data)
    perm = torch.randperm(len(data), generator=g).tolist()
    naive_batches = [batch_of([data[i] for i in perm[k:k + args.batch]], pad_to=longest)
                     for k in range(0, len(perm), args.batch)]
    real = sum(f.shape[0] for f, _ in data)
    steps = min(args.steps, len(fast_batches))

    fast_model = CTCModel(dims, trajectory=args.mode == "trajectory")
    fast_model.load_state_dict(model.state_dict())
    time_steps(fast_model, fast_loss, fast_batches, 1)  # warm-up
    t_fast, f_fast = time_steps(fast_model, fast_loss, fast_batches, steps)
    naive_model = CTCModel(dims, trajectory=args.mode == "trajectory")
    naive_model.load_state_dict(model.state_dict())
    t_naive, f_naive = time_steps(naive_model, naive_loss, naive_batches, steps)

    fast_fps, naive_fps = f_fast / t_fast, f_naive / t_naive
    pad_fast = 1 - real / sum(b[0].shape[0] * b[0].shape[1] for b in fast_batches)
    pad_naive = 1 - real / sum(b[0].shape[0] * b[0].shape[1] for b in naive_batches)
    report = {
        "mode": args.mode, "preset": args.preset, "params": model.num_params(), "utterances": args.utts,
        "batch": args.batch, "threads": args.threads, "torch": torch.__version__, "steps_timed": steps,
        "loss_check_abs_diff": diff,
        "optimised": {"s_per_step": t_fast / steps, "steps_per_s": steps / t_fast, "frames_per_s": fast_fps,
                      "epoch_s": real / fast_fps, "padding_waste": pad_fast},
        "naive": {"s_per_step": t_naive / steps, "steps_per_s": steps / t_naive, "frames_per_s": naive_fps,
                  "epoch_s": real / naive_fps, "padding_waste": pad_naive},
        "speedup": fast_fps / naive_fps,
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
