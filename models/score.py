"""Acoustic evidence for text proposals: how well does the run's own acoustic model
(``best.pt``) explain a proposed transcript of an utterance, against the ASR text it
decoded?

For each utterance the model runs once over its stored features (the run's own feature
store, recipe checked against the run), and ``F.ctc_loss`` gives the CTC log-likelihood of
each label sequence, summed over all alignments. The comparison is normalised **per output
frame**: both texts are scored on the same frames, so

    delta = (log p(proposal | x) - log p(asr | x)) / frames

is a log-likelihood ratio per frame, comparable across utterances of different lengths and
independent of how many labels each text has (a per-label average would favour longer texts).
delta > 0: the audio prefers the proposal; delta < 0: it prefers the ASR text.

Utterances are batched (padded; the model masks padding) on CPU or GPU. A text with a
character outside the vocabulary, or with more labels than CTC can place on the frames,
has no score (``None`` and a reason). ``posteriors`` returns the per-frame log-posteriors
that the N-best proposer searches.

models/ imports nothing from the other packages: this runs on a bare GPU box.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from models import text as T
from models.errors import NkoOpsError
from models.features import FeatureStore
from models.model import CTCModel, ctc_min_frames
from models.vocab import Vocab

NORMALISATION = "per_frame"


class ScoreError(NkoOpsError, ValueError):
    pass


@dataclass(frozen=True)
class Score:
    logp_proposal: float | None
    logp_asr: float | None
    frames: int
    delta: float | None  # (logp_proposal - logp_asr) / frames, None when either is unscoreable
    reason: str = ""

    def as_dict(self, model_id: str) -> dict:
        d = {"delta": self.delta, "logp_proposal": self.logp_proposal, "logp_asr": self.logp_asr,
             "frames": self.frames, "normalisation": NORMALISATION, "model": model_id}
        if self.reason:
            d["reason"] = self.reason
        return d


class Scorer:
    """The run's acoustic model, vocabulary and feature store, ready to score texts."""

    def __init__(self, model: CTCModel, vocab: Vocab, store: FeatureStore, device: torch.device, model_id: str,
                 max_batch_frames: int = 60_000):
        self.model = model.eval()
        self.vocab = vocab
        self.store = store
        self.device = device
        self.model_id = model_id
        self.max_batch_frames = max_batch_frames

    @classmethod
    def from_run(cls, run_dir: str | Path, device: str | None = None, features: str | Path | None = None,
                 max_batch_frames: int = 60_000) -> "Scorer":
        """Load ``best.pt``, ``vocab.json`` and the run's feature store (``features`` overrides
        the path recorded in results.json; the recipe must still be the run's)."""
        run_dir = Path(run_dir)
        for name in ("best.pt", "vocab.json", "results.json"):
            if not (run_dir / name).exists():
                raise ScoreError(f"{run_dir}: no {name} (not a completed run)")
        results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
        store_path = Path(features) if features else Path(results["resolved_paths"]["features"])
        if not store_path.is_dir():
            raise ScoreError(f"{run_dir}: feature store {store_path} is missing (pass --features)")
        store = FeatureStore.open(store_path)
        if store.recipe_hash != results["feature_recipe_hash"]:
            raise ScoreError(f"feature store {store_path} has recipe {store.recipe_hash[:12]}, the run used "
                             f"{results['feature_recipe_hash'][:12]}")
        dev = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        from models.train import load_model

        model, _ = load_model(run_dir / "best.pt", dev)
        digest = hashlib.sha256((run_dir / "best.pt").read_bytes()).hexdigest()
        return cls(model, Vocab.load(run_dir / "vocab.json"), store, dev, f"best.pt:{digest[:12]}", max_batch_frames)

    def _batches(self, feat_ids: Sequence[str]) -> list[list[int]]:
        order = sorted(range(len(feat_ids)), key=lambda i: self.store.frames(feat_ids[i]))
        batches, cur, longest = [], [], 0
        for i in order:
            n = self.store.frames(feat_ids[i])
            if cur and max(longest, n) * (len(cur) + 1) > self.max_batch_frames:
                batches.append(cur)
                cur, longest = [], 0
            cur.append(i)
            longest = max(longest, n)
        if cur:
            batches.append(cur)
        return batches

    @torch.no_grad()
    def _forward(self, ids: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Log-posteriors ``[T', B, V]`` (fp32, on the device) and valid frames ``[B]`` for a batch."""
        arrays = [self.store.get(f) for f in ids]
        lengths = torch.tensor([a.shape[0] for a in arrays], device=self.device)
        x = torch.zeros(len(arrays), int(lengths.max()), self.store.dim, device=self.device)
        for j, a in enumerate(arrays):
            x[j, :a.shape[0]] = torch.from_numpy(a).float()
        o = self.model(x, lengths)
        return o.logits.float().log_softmax(-1).transpose(0, 1), o.lengths

    @torch.no_grad()
    def posteriors(self, feat_ids: Sequence[str]) -> list[np.ndarray]:
        """Per-frame log-posteriors ``[frames, vocab]`` as float32 numpy arrays, in order."""
        out: list = [None] * len(feat_ids)
        for idx in self._batches(feat_ids):
            lp, lengths = self._forward([feat_ids[i] for i in idx])
            for j, i in enumerate(idx):
                out[i] = lp[:int(lengths[j]), j].cpu().numpy()
        return out

    def _labels(self, text: str) -> tuple[list[int] | None, str]:
        try:
            return self.vocab.encode(T.normalize(text)), ""
        except ValueError as e:
            return None, str(e)

    @torch.no_grad()
    def score(self, feat_ids: Sequence[str], asr_texts: Sequence[str], proposals: Sequence[str]) -> list[Score]:
        """One ``Score`` per (feat_id, ASR text, proposal), in order. One forward pass and one
        ``ctc_loss`` call per batch of utterances."""
        if not len(feat_ids) == len(asr_texts) == len(proposals):
            raise ScoreError("feat_ids, asr_texts and proposals differ in length")
        missing = [f for f in feat_ids if f not in self.store]
        if missing:
            raise ScoreError(f"{len(missing)} feat_id(s) not in feature store {self.store.root} (e.g. {missing[0]})")
        out: list = [None] * len(feat_ids)
        for idx in self._batches(feat_ids):
            lp, lengths = self._forward([feat_ids[i] for i in idx])
            jobs, logp, reasons = [], {}, {i: [] for i in idx}
            for j, i in enumerate(idx):
                n = int(lengths[j])
                for what, text in (("proposal", proposals[i]), ("asr", asr_texts[i])):
                    labels, why = self._labels(text)
                    if labels is None:
                        reasons[i].append(f"{what}: {why}")
                    elif ctc_min_frames(labels) > n:
                        reasons[i].append(f"{what}: {len(labels)} labels do not fit {n} frames")
                    else:
                        jobs.append((i, what, j, labels))
            if jobs:
                width = max(1, max(len(labels) for *_, labels in jobs))
                targets = torch.zeros(len(jobs), width, dtype=torch.long, device=self.device)  # padded form
                for k, (*_, labels) in enumerate(jobs):
                    targets[k, :len(labels)] = torch.tensor(labels, dtype=torch.long)
                target_lengths = torch.tensor([len(labels) for *_, labels in jobs], device=self.device)
                rows = torch.tensor([j for _, _, j, _ in jobs], device=self.device)
                nll = F.ctc_loss(lp[:, rows], targets, lengths[rows], target_lengths, blank=0, reduction="none",
                                 zero_infinity=False)
                for (i, what, _, _), v in zip(jobs, nll.tolist()):
                    logp[(i, what)] = -v
            for j, i in enumerate(idx):
                n = int(lengths[j])
                lpp, lpa = logp.get((i, "proposal")), logp.get((i, "asr"))
                delta = (lpp - lpa) / n if lpp is not None and lpa is not None else None
                out[i] = Score(lpp, lpa, n, delta, "; ".join(reasons[i]))
        return out
