"""N-best proposer: CTC prefix beam search over the run's own posteriors with a character
n-gram language model, proposing the best LM-rescored hypothesis that differs from the ASR
text.

Why this is written here rather than taken from a library (checked on this machine, with
torch 2.13): ``kenlm`` publishes no wheels (its sdist needs a C++/Boost build), torchaudio's
``ctc_decoder`` (flashlight-text) has no torchaudio release for torch 2.13 and was deprecated
upstream, and ``pyctcdecode`` scores its LM once per completed *word* through a KenLM-style
word model, while a character LM has to score every character inside the search. The part
written here is small: a Witten-Bell interpolated character n-gram model and the standard
CTC prefix beam search (blank / non-blank prefix probabilities, LM shallow fusion with
weight ``alpha`` and a per-character bonus ``beta``).

LM text (``lm_texts``): the run's *training* references, plus the public Bambara text in
``bambara-text/`` (NLLB-Seed only: the N'Ko side as written, the Latin side transliterated
to N'Ko with ``models.text.latin_to_nko``). FLORES-200 dev/devtest are never read: the demo
corpus was cut from FLORES sentences, so they would leak test text into the LM. The two
sources are separate models mixed with weight ``in_domain`` on the training references.
"""

from __future__ import annotations

import math
import os
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from models.bundle import PredictionRow
from models import text as T

NLLB_FILES = {"nko": "multitext-nllb-seed.nqo_Nkoo", "latin": "multitext-nllb-seed.bam_Latn"}
HELD_OUT = ("flores-200-dev", "flores-200-devtest")  # never read: the sample corpus comes from FLORES
DEFAULT_TEXT_DIR = Path("../shared/data/bambara-text")  # relative to the repository root
BOS, EOS = "\x02", "\x03"


def default_text_dir() -> Path:
    """$NKO_OPS_BAMBARA_TEXT, else ../shared/data/bambara-text beside the repository."""
    env = os.environ.get("NKO_OPS_BAMBARA_TEXT")
    if env:
        return Path(env)
    return Path(__file__).resolve().parents[1] / DEFAULT_TEXT_DIR


def public_texts(text_dir: Path | str, symbols: Iterable[str]) -> tuple[list[str], dict]:
    """N'Ko lines from the NLLB-Seed files of ``text_dir`` (see the module docstring), each in
    the CTC target form and inside ``symbols``; and a record of what was read."""
    text_dir = Path(text_dir)
    missing = [name for name in NLLB_FILES.values() if not (text_dir / name).is_file()]
    if missing:
        raise FileNotFoundError(f"public Bambara text not found: {', '.join(str(text_dir / m) for m in missing)} "
                                "(pass --lm-text DIR, set NKO_OPS_BAMBARA_TEXT, or --lm-text none for the "
                                "training references alone)")
    allowed = set(symbols)
    out, record = [], {"dir": str(text_dir), "files": {}}
    for script, name in NLLB_FILES.items():
        kept = dropped = 0
        for line in (text_dir / name).read_text(encoding="utf-8").splitlines():
            if script == "latin":
                line = T.latin_to_nko(T.target_text(line, "latin"))
            line = T.target_text(line, "nko")
            if line and set(line) <= allowed:
                out.append(line)
                kept += 1
            elif line:
                dropped += 1
        record["files"][name] = {"kept": kept, "dropped_out_of_vocab": dropped}
    return out, record


class CharNgram:
    """Witten-Bell interpolated character n-gram model over ``symbols`` plus end of text."""

    def __init__(self, texts: Iterable[str], symbols: Iterable[str], order: int = 5):
        if order < 1:
            raise ValueError("order must be >= 1")
        self.order = order
        self.symbols = sorted(set(symbols)) + [EOS]
        self.counts: dict[str, Counter] = defaultdict(Counter)
        n = 0
        for t in texts:
            s = BOS * (order - 1) + t + EOS
            for i in range(order - 1, len(s)):
                for k in range(order):
                    self.counts[s[i - k:i]][s[i]] += 1
            n += 1
        self.lines = n
        self.totals = {h: sum(c.values()) for h, c in self.counts.items()}
        self.types = {h: len(c) for h, c in self.counts.items()}
        self.logp = lru_cache(maxsize=1 << 20)(self._logp)

    def _prob(self, history: str, ch: str) -> float:
        p = 1.0 / len(self.symbols)
        for k in range(0, min(len(history), self.order - 1) + 1):
            h = history[len(history) - k:] if k else ""
            total = self.totals.get(h)
            if not total:
                break
            types = self.types[h]
            p = (self.counts[h][ch] + types * p) / (total + types)
        return p

    def _logp(self, history: str, ch: str) -> float:
        """log P(ch | the last order-1 characters of history), natural log."""
        return math.log(self._prob(history[-(self.order - 1):] if self.order > 1 else "", ch))

    def context(self, prefix: str) -> str:
        return (BOS * (self.order - 1) + prefix)[-(self.order - 1):] if self.order > 1 else ""


@dataclass
class MixedLM:
    """in_domain * P(training references) + (1 - in_domain) * P(public text), per character."""
    models: list[CharNgram]
    weights: list[float]
    record: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.order = max(m.order for m in self.models)
        self.logp = lru_cache(maxsize=1 << 20)(self._logp)

    def _logp(self, context: str, ch: str) -> float:
        return math.log(sum(w * math.exp(m.logp(context, ch)) for m, w in zip(self.models, self.weights)))

    def context(self, prefix: str) -> str:
        return (BOS * (self.order - 1) + prefix)[-(self.order - 1):] if self.order > 1 else ""

    def sentence_logp(self, text: str) -> float:
        s, total = "", 0.0
        for ch in text + EOS:
            total += self.logp(self.context(s), ch)
            s += ch
        return total


def build_lm(train_references: Sequence[str], symbols: Iterable[str], text_dir: Path | str | None,
             order: int = 5, in_domain: float = 0.5) -> MixedLM:
    """The proposer's LM: training references, mixed with the public text when ``text_dir``
    is given (None: training references alone)."""
    symbols = [s for s in symbols if len(s) == 1]
    refs = [T.target_text(r, "nko") for r in train_references]
    refs = [r for r in refs if r]
    if not refs:
        raise ValueError("no training references to train the LM on")
    ref_lm = CharNgram(refs, symbols, order)
    record = {"order": order, "train_references": len(refs), "in_domain_weight": 1.0, "public": None}
    if text_dir is None:
        return MixedLM([ref_lm], [1.0], record)
    public, pub_record = public_texts(text_dir, symbols)
    record.update(in_domain_weight=in_domain, public=pub_record)
    return MixedLM([ref_lm, CharNgram(public, symbols, order)], [in_domain, 1 - in_domain], record)


# --------------------------------------------------------------------------- search


def _logsumexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    m = max(a, b)
    return m + math.log(math.exp(a - m) + math.exp(b - m))


def prefix_beam_search(log_probs: np.ndarray, symbols: Sequence[str], lm: MixedLM | None, alpha: float = 0.5,
                       beta: float = 1.0, beam: int = 16, prune: float = -8.0, nbest: int = 8) -> list[tuple[str, float]]:
    """CTC prefix beam search over ``log_probs`` [T, V] (index 0 = blank). Each hypothesis
    scores log p_ctc(prefix) + alpha * log p_lm(prefix) + beta * len(prefix); the end of text
    is scored by the LM at the end. Per frame, only symbols with log posterior >= ``prune``
    (and always the best one) are extended. Returns up to ``nbest`` (text, score), best first."""
    NEG = -math.inf
    beams: dict[str, tuple[float, float, float]] = {"": (0.0, NEG, 0.0)}  # prefix -> (p_blank, p_nonblank, lm+bonus)
    for t in range(log_probs.shape[0]):
        row = log_probs[t]
        cand = np.nonzero(row >= prune)[0].tolist() or [int(row.argmax())]
        nxt: dict[str, list[float]] = {}

        def add(prefix: str, pb: float, pnb: float, extra: float) -> None:
            cur = nxt.get(prefix)
            if cur is None:
                nxt[prefix] = [pb, pnb, extra]
            else:
                cur[0] = _logsumexp(cur[0], pb)
                cur[1] = _logsumexp(cur[1], pnb)

        for prefix, (pb, pnb, extra) in beams.items():
            total = _logsumexp(pb, pnb)
            last = prefix[-1] if prefix else None
            for v in cand:
                lp = float(row[v])
                if v == 0:
                    add(prefix, total + lp, NEG, extra)
                    continue
                ch = symbols[v]
                if ch == last:
                    add(prefix, NEG, pnb + lp, extra)  # repeat collapses
                    if pb > NEG:
                        new_extra = extra + (alpha * lm.logp(lm.context(prefix), ch) if lm else 0.0) + beta
                        add(prefix + ch, NEG, pb + lp, new_extra)
                    continue
                if ch == " " and (not prefix or last == " "):
                    continue  # no leading or double spaces: the ASR text is whitespace-folded
                new_extra = extra + (alpha * lm.logp(lm.context(prefix), ch) if lm else 0.0) + beta
                add(prefix + ch, NEG, total + lp, new_extra)
        ranked = sorted(nxt.items(), key=lambda kv: _logsumexp(kv[1][0], kv[1][1]) + kv[1][2], reverse=True)
        beams = {k: tuple(v) for k, v in ranked[:beam]}
    final = []
    for prefix, (pb, pnb, extra) in beams.items():
        end = alpha * lm.logp(lm.context(prefix), EOS) if lm else 0.0
        final.append((T.normalize(prefix), _logsumexp(pb, pnb) + extra + end))
    merged: dict[str, float] = {}
    for text, score in final:  # a trailing space folds into the same text
        merged[text] = max(merged.get(text, -math.inf), score)
    return sorted(merged.items(), key=lambda kv: kv[1], reverse=True)[:nbest]


class NbestProposer:
    """Proposes, for each row, the best beam hypothesis whose text differs from the row's
    ASR text (the ASR text itself when every hypothesis equals it: an abstention). Stable
    rows are skipped, as by the lexicon proposer: the gate would refuse any change there."""

    name = "nbest"

    def __init__(self, scorer, lm: MixedLM | None, alpha: float = 0.5, beta: float = 1.0, beam: int = 16,
                 skip: Sequence[str] = ("stable",)):
        self.scorer = scorer  # models.score.Scorer of the run whose rows these are
        self.lm = lm
        self.alpha, self.beta, self.beam = alpha, beta, beam
        self.skip = set(skip)
        self._posteriors: dict[str, np.ndarray] = {}
        self.info: dict[str, dict] = {}

    def prime(self, rows: Sequence[PredictionRow]) -> None:
        """Compute the posteriors of all ``rows`` in batches (propose() would do one at a time)."""
        ids = [r.feat_id for r in rows if r.partition not in self.skip and r.feat_id not in self._posteriors]
        for fid, lp in zip(ids, self.scorer.posteriors(ids)):
            self._posteriors[fid] = lp

    def propose(self, row: PredictionRow) -> str:
        if row.partition in self.skip:
            return row.asr_text
        if row.feat_id not in self._posteriors:
            self.prime([row])
        hyps = prefix_beam_search(self._posteriors.pop(row.feat_id), self.scorer.vocab.symbols, self.lm,
                                  self.alpha, self.beta, self.beam)
        for rank, (text, score) in enumerate(hyps):
            if text != row.asr_text:
                self.info[row.feat_id] = {"rank": rank, "score": round(score, 4), "top": hyps[0][0] == text}
                return text
        return row.asr_text

    def settings(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "beam": self.beam,
                "lm": self.lm.record if self.lm is not None else None}
