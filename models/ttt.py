"""Test-time training for the CTC head (mode "ttt"; also usable on any run at evaluation).

**InPlaceTTTAdapter** (``ttt.method = "adapter"``): low-rank fast weights on the FFN of one
block (``ttt.layer``, default the last): fc2(x) becomes fc2(x) + B·A·x with A [rank, d_ff]
(random, fixed seed, scaled 1/sqrt(d_ff)) and B [d_model, rank] (zero), so a fresh adapter
changes nothing. Per utterance the fast weights are reset; the utterance's encoder frames
are cut into chunks of ``ttt.chunk_size`` frames and, chunk by chunk, ``ttt.steps`` plain SGD
steps at ``ttt.lr`` on A and B minimise the mean per-frame entropy of the CTC posteriors
over the chunk's non-blank frames (those whose argmax is not blank before the chunk's
first step; ``ttt.frames = "all"`` uses every frame). Each chunk's output is read after its
steps, with the whole utterance as attention context; adaptation carries over to later
chunks of the same utterance.

**Blank-collapse guard** (``ttt.guard``): after every step the chunk's non-blank fraction is
re-measured; if it fell below ``ttt.guard_ratio`` × its value before the chunk's first step,
the step is undone and adaptation of that chunk stops.

**SUTA-style control** (``ttt.method = "suta"``): the same entropy objective and guard, but
the LayerNorm scales and shifts of the whole model are adapted over the whole utterance
(no chunking, no fast weights), then restored.

``ttt.steps = 0`` reproduces the non-TTT output exactly.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from models.config import TTTConfig
from models.model import CTCModel


class InPlaceTTTAdapter:
    def __init__(self, model: CTCModel, rank: int, layer: int = -1, seed: int = 0):
        fc = model.blocks[layer]
        d_ff, d = fc.fc2.in_features, fc.fc2.out_features
        device = fc.fc2.weight.device
        g = torch.Generator().manual_seed(seed)
        self.A0 = (torch.randn(rank, d_ff, generator=g) / math.sqrt(d_ff)).to(device)
        self.A = self.A0.clone().requires_grad_(True)
        self.B = torch.zeros(d, rank, device=device, requires_grad=True)
        self._handle = fc.fc2.register_forward_hook(self._hook)

    def _hook(self, module, inputs, output):
        return output + F.linear(F.linear(inputs[0], self.A.to(output.dtype)), self.B.to(output.dtype))

    def params(self) -> list[torch.Tensor]:
        return [self.A, self.B]

    def reset(self) -> None:
        with torch.no_grad():
            self.A.copy_(self.A0)
            self.B.zero_()

    def remove(self) -> None:
        self._handle.remove()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    lp = logits.float().log_softmax(-1)
    return -(lp.exp() * lp).sum(-1)


def _nonblank(logits: torch.Tensor, blank: int) -> torch.Tensor:
    return logits.argmax(-1) != blank


def _adapt(forward, params: list[torch.Tensor], sl: slice, cfg: TTTConfig, blank: int, stats: dict,
           full: torch.Tensor) -> torch.Tensor:
    """Up to cfg.steps SGD steps on the entropy of frames ``sl`` of ``forward()``'s logits.
    ``full`` = forward() at the current parameters; returns forward() at the parameters it
    leaves. Each guard check's forward pass is also the next step's, so a step costs one
    forward and one backward pass."""
    start = full[sl]
    keep = _nonblank(start, blank) if cfg.frames == "nonblank" else torch.ones(start.shape[0], dtype=torch.bool,
                                                                              device=start.device)
    if not keep.any():
        return full
    ref = _nonblank(start, blank).float().mean().item()
    current = None  # forward() at the current parameters, with its graph
    for _ in range(cfg.steps):
        with torch.enable_grad():
            logits = current if current is not None else forward()
            loss = entropy(logits[sl])[keep].mean()
            grads = torch.autograd.grad(loss, params)
        before = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p, g in zip(params, grads):
                p.sub_(cfg.lr * g)
        stats["steps"] += 1
        current = None
        if cfg.guard:
            with torch.enable_grad():
                current = forward()
            now = _nonblank(current.detach()[sl], blank).float().mean().item()
            if now < cfg.guard_ratio * ref:
                with torch.no_grad():
                    for p, b in zip(params, before):
                        p.copy_(b)
                stats["guard_reverts"] += 1
                return logits.detach()  # forward() at the restored parameters
    if current is None:
        with torch.no_grad():
            return forward()
    return current.detach()


def ttt_logits(model: CTCModel, feats: torch.Tensor, length: torch.Tensor, cfg: TTTConfig,
               blank: int = 0) -> tuple[torch.Tensor, dict]:
    """Logits [T', V] for one utterance (feats [1, T, F]) after test-time training."""
    model.eval()
    stats = {"steps": 0, "guard_reverts": 0}
    with torch.no_grad():
        base = model(feats, length).logits[0]
    if cfg.steps == 0:
        return base, stats

    def forward() -> torch.Tensor:
        return model(feats, length).logits[0]

    if cfg.method == "suta":
        params = [p for m in model.modules() if isinstance(m, torch.nn.LayerNorm) for p in m.parameters()]
        saved = [p.detach().clone() for p in params]
        try:
            return _adapt(forward, params, slice(None), cfg, blank, stats, base), stats
        finally:
            with torch.no_grad():
                for p, s in zip(params, saved):
                    p.copy_(s)

    adapter = InPlaceTTTAdapter(model, cfg.rank, cfg.layer)
    try:
        out = []
        full = base  # a fresh adapter (B = 0) adds exactly zero
        for a in range(0, base.shape[0], cfg.chunk_size):
            sl = slice(a, a + cfg.chunk_size)
            full = _adapt(forward, adapter.params(), sl, cfg, blank, stats, full)
            out.append(full[sl])
        return torch.cat(out), stats
    finally:
        adapter.remove()
