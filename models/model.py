"""CTC acoustic head over frozen encoder features (CONTRACTS §2).

    features [B, T, n_input] -> Linear, GELU, dropout -> Conv1d(k, s, p), GELU -> + learned
    positions -> n_layers pre-norm Transformer blocks (SDPA with an additive bias mask) ->
    LayerNorm -> Linear -> log-probabilities over the vocabulary (index 0 = CTC blank).

The bias mask always carries the key padding (−inf on padded keys); in trajectory mode it
also carries the per-head trajectory bias of models/trajectory.py.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from models.trajectory import TrajectoryBias, trajectory_scalars


@dataclass(frozen=True)
class Dims:
    n_input: int = 1280
    d_model: int = 768
    conv_kernel: int = 5
    conv_stride: int = 4
    conv_padding: int = 2
    n_layers: int = 6
    n_heads: int = 12
    d_ff: int = 3072
    dropout: float = 0.1
    n_vocab: int = 66
    max_positions: int = 512  # with 1280-d input this gives the program's 46.9M parameters
    traj_hidden: int = 32


PRESETS = {
    "v3": Dims(),  # the program's V3 head, 46.9M parameters with 1280-d input
    # ~0.5M parameters: trains to ~13% CER on data/sample's 50 fps log-mel in ~80 CPU-seconds
    "demo": Dims(n_input=80, d_model=128, conv_kernel=5, conv_stride=2, conv_padding=2, n_layers=2,
                 n_heads=4, d_ff=256, dropout=0.1, max_positions=1024, traj_hidden=16),
    "tiny": Dims(n_input=16, d_model=32, conv_kernel=3, conv_stride=1, conv_padding=1, n_layers=1,
                 n_heads=2, d_ff=64, dropout=0.0, max_positions=512, traj_hidden=8),
}


def make_dims(preset: str, **overrides) -> Dims:
    if preset not in PRESETS:
        raise ValueError(f"model.preset must be one of {sorted(PRESETS)}, got {preset!r}")
    dims = replace(PRESETS[preset], **overrides)
    if dims.d_model % dims.n_heads:
        raise ValueError(f"model.d_model ({dims.d_model}) must be divisible by model.n_heads ({dims.n_heads})")
    return dims


def output_lengths(lengths: torch.Tensor, dims: Dims) -> torch.Tensor:
    return (lengths + 2 * dims.conv_padding - dims.conv_kernel) // dims.conv_stride + 1


def ctc_min_frames(labels: list[int]) -> int:
    """Frames CTC needs for ``labels``: one per label plus a blank between repeats."""
    return len(labels) + sum(1 for a, b in zip(labels, labels[1:]) if a == b)


class Block(nn.Module):
    def __init__(self, dims: Dims):
        super().__init__()
        d, self.n_heads, self.p = dims.d_model, dims.n_heads, dims.dropout
        self.ln1 = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.proj = nn.Linear(d, d)
        self.ln2 = nn.LayerNorm(d)
        self.fc1 = nn.Linear(d, dims.d_ff)
        self.fc2 = nn.Linear(dims.d_ff, d)
        self.drop = nn.Dropout(dims.dropout)

    def forward(self, x: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        B, T, D = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.n_heads, D // self.n_heads).permute(2, 0, 3, 1, 4)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype),
                                           dropout_p=self.p if self.training else 0.0)
        x = x + self.drop(self.proj(y.transpose(1, 2).reshape(B, T, D)))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.ln2(x)))))


@dataclass
class Output:
    logits: torch.Tensor  # [B, T', V] (unnormalised)
    lengths: torch.Tensor  # [B] valid output frames
    mask: torch.Tensor  # [B, T'] True on valid frames
    hidden: torch.Tensor  # [B, T', D] final states (after the last LayerNorm)
    z: torch.Tensor | None  # [B, T', 7] conditioning trajectory scalars (trajectory mode)


class CTCModel(nn.Module):
    def __init__(self, dims: Dims, trajectory: bool = False, anticipation: bool = False):
        super().__init__()
        self.dims = dims
        self.inp = nn.Linear(dims.n_input, dims.d_model)
        self.conv = nn.Conv1d(dims.d_model, dims.d_model, dims.conv_kernel, dims.conv_stride, dims.conv_padding)
        self.pos = nn.Parameter(torch.randn(dims.max_positions, dims.d_model) * 0.02)
        self.drop = nn.Dropout(dims.dropout)
        self.blocks = nn.ModuleList(Block(dims) for _ in range(dims.n_layers))
        self.ln = nn.LayerNorm(dims.d_model)
        self.head = nn.Linear(dims.d_model, dims.n_vocab)
        self.traj = TrajectoryBias(dims.n_heads, dims.traj_hidden) if trajectory else None
        self.anticipation = nn.Linear(dims.d_model, 7) if anticipation else None

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> Output:
        h = self.drop(F.gelu(self.inp(x)))
        # zero the padding so the conv sees exactly what it sees at the end of an unpadded clip
        h = h * (torch.arange(x.shape[1], device=x.device)[None, :, None] < lengths[:, None, None])
        h = F.gelu(self.conv(h.transpose(1, 2))).transpose(1, 2)
        T = h.shape[1]
        if T > self.dims.max_positions:
            raise ValueError(f"{T} encoder frames exceed model.max_positions={self.dims.max_positions}")
        h = self.drop(h + self.pos[:T])
        out_len = output_lengths(lengths, self.dims).clamp(min=1, max=T)
        mask = torch.arange(T, device=x.device)[None, :] < out_len[:, None]
        bias = torch.zeros(mask.shape, dtype=torch.float32, device=x.device).masked_fill(~mask, float("-inf"))
        bias = bias[:, None, None, :]  # key padding, broadcast over heads and queries
        z = None
        if self.traj is not None:
            z = trajectory_scalars(h.float(), mask)
            bias = bias + self.traj(z)
        for block in self.blocks:
            h = block(h, bias)
        h = self.ln(h)
        return Output(self.head(h), out_len, mask, h, z)


def dims_json(dims: Dims) -> dict:
    return asdict(dims)
