"""The AGP corrector's training corpus: mlx-lm chat format (``{"messages": [...]}`` per line)
in ``train.jsonl`` / ``valid.jsonl`` / ``test.jsonl``, built from real ASR error pairs.

User turn = ASR text + partition + a trajectory summary; assistant turn = the reference.
Splits are made over groups of rows sharing an ``audio_id`` (a row without one is its own
group), so no feat_id and no audio_id appears in two splits. Rows the ASR already got right
make no examples but still get a split (``split_feat_ids`` in corpus.json), so a held-out
evaluation can show an adapter damaging them. Synthetic N'Ko-aware
perturbations of *train-split* references (tone mark dropped or swapped, nasal mark dropped,
ߋ/ߍ and ߏ/ߐ swapped, words merged or split) are added only when asked for, only to train,
and every such line says ``"source": "synthetic"`` and which perturbation made it.
"""

from __future__ import annotations

import hashlib
import math
import random
import unicodedata
from collections import Counter
from pathlib import Path
from typing import Sequence

from agp.rows import write_jsonl
from models.files import atomic_write_json
from models.bundle import PredictionRow
from models.errors import NkoOpsError
from models.text import NASAL_MARK, NKO_VOWELS, SYLLABIC_N, TONE_MARKS

SYSTEM_PROMPT = ("You correct N'Ko (Bambara) speech-recognition output. Reply with the corrected "
                 "N'Ko text only. Keep stable text unchanged; make only small, local repairs.")
SPLIT_FILES = {"train": "train.jsonl", "valid": "valid.jsonl", "test": "test.jsonl"}
PERTURBATIONS = ("tone_drop", "tone_swap", "nasal_drop", "e_swap", "o_swap", "word_merge", "word_split")
_SWAPS = {"e_swap": {"ߋ": "ߍ", "ߍ": "ߋ"}, "o_swap": {"ߏ": "ߐ", "ߐ": "ߏ"}}
_NKO_TONES = sorted(TONE_MARKS)


class CorpusError(NkoOpsError, ValueError):
    pass


def trajectory_summary(scalars: dict[str, float]) -> str:
    if not scalars:
        return "none"
    return " ".join(f"{k}={v:.2f}" for k, v in sorted(scalars.items()))


def user_turn(asr_text: str, partition: str, scalars: dict[str, float] | None) -> str:
    summary = "none (synthetic)" if scalars is None else trajectory_summary(scalars)
    return f"ASR: {asr_text}\nPartition: {partition}\nTrajectory: {summary}"


def prompt_messages(row: PredictionRow) -> list[dict]:
    """System + user turns for a row: what a chat proposer is asked (no reference)."""
    return [{"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": user_turn(row.asr_text, row.partition, row.trajectory_scalars)}]


def chat_example(row: PredictionRow) -> dict:
    return {"messages": prompt_messages(row) + [{"role": "assistant", "content": row.reference_text}],
            "feat_id": row.feat_id, "audio_id": row.audio_id, "source": "asr"}


# --------------------------------------------------------------------------- splits


def split_rows(rows: Sequence[PredictionRow], seed: int = 42, valid_fraction: float = 0.1,
               test_fraction: float = 0.1) -> dict[str, list[PredictionRow]]:
    """Deterministic group split: groups (audio_id, else feat_id) are shuffled with ``seed``
    and dealt to test, then valid, until each holds its share of rows; the rest is train."""
    if not 0 <= valid_fraction < 1 or not 0 <= test_fraction < 1 or valid_fraction + test_fraction >= 1:
        raise CorpusError("valid and test fractions must be in [0, 1) and sum to less than 1")
    groups: dict[str, list[PredictionRow]] = {}
    for r in rows:
        groups.setdefault(f"a:{r.audio_id}" if r.audio_id else f"f:{r.feat_id}", []).append(r)
    keys = sorted(groups)
    if len(keys) < 3:
        raise CorpusError(f"need at least 3 distinct utterance groups to make train/valid/test; got {len(keys)}")
    random.Random(seed).shuffle(keys)
    n = len(rows)
    targets = {"test": max(1, round(n * test_fraction)), "valid": max(1, round(n * valid_fraction))}
    out: dict[str, list[PredictionRow]] = {"train": [], "valid": [], "test": []}
    i = 0
    for name, keep in (("test", 2), ("valid", 1)):  # leave at least one group for each later split
        while i < len(keys) - keep and len(out[name]) < targets[name]:
            out[name].extend(groups[keys[i]])
            i += 1
    for k in keys[i:]:
        out["train"].extend(groups[k])
    if not out["train"]:
        raise CorpusError("the split left no training rows; lower the valid/test fractions")
    return out


def place_correct_rows(splits: dict[str, list[PredictionRow]], correct: Sequence[PredictionRow], seed: int = 42,
                       valid_fraction: float = 0.1, test_fraction: float = 0.1) -> dict[str, list[PredictionRow]]:
    """A split for every already-correct row, leaving the error-pair split as it is: a row
    whose recording (audio_id) is already in a split goes there; the other groups are
    shuffled with ``seed`` and dealt to test, then valid (each at least its share, rounded
    up), the rest to train."""
    home = {f"a:{r.audio_id}": name for name, part in splits.items() for r in part if r.audio_id}
    groups: dict[str, list[PredictionRow]] = {}
    for r in correct:
        groups.setdefault(f"a:{r.audio_id}" if r.audio_id else f"f:{r.feat_id}", []).append(r)
    out: dict[str, list[PredictionRow]] = {name: [] for name in splits}
    free = []
    for key in sorted(groups):
        if key in home:
            out[home[key]].extend(groups[key])
        else:
            free.append(key)
    random.Random(seed).shuffle(free)
    n = sum(len(groups[k]) for k in free)
    i = 0
    for name, fraction in (("test", test_fraction), ("valid", valid_fraction)):
        got, target = 0, math.ceil(n * fraction)
        while i < len(free) and got < target:
            out[name].extend(groups[free[i]])
            got += len(groups[free[i]])
            i += 1
    for k in free[i:]:
        out["train"].extend(groups[k])
    return out


def partition_identity(rows: Sequence[PredictionRow]) -> str:
    """The one partition source of the rows (``PartitionPolicy.identity``): ``"model"`` for
    rows that were not re-partitioned."""
    sources = sorted({r.partition_source or "model" for r in rows})
    if len(sources) > 1:
        raise CorpusError(f"rows mix partition sources {sources} (field 'partition_source'); partition them "
                          "with one policy")
    return sources[0] if sources else "model"


# --------------------------------------------------------------------------- synthetic


def _tone_positions(text: str) -> list[int]:
    """Indices of tone marks that sit on a vowel or syllabic n (on consonants U+07ED is a
    letter-changing loan dot, not tone)."""
    out, carrier = [], False
    for i, ch in enumerate(text):
        if ch in TONE_MARKS:
            if carrier:
                out.append(i)
        elif ch != NASAL_MARK:
            carrier = ch in NKO_VOWELS or ch == SYLLABIC_N
    return out


def _is_mark(ch: str) -> bool:
    return unicodedata.category(ch) == "Mn"


def perturb(text: str, kind: str, rng: random.Random) -> str | None:
    """One N'Ko-aware perturbation of ``text``, or None when ``kind`` does not apply."""
    text = unicodedata.normalize("NFC", text)
    if kind in ("tone_drop", "tone_swap"):
        pos = _tone_positions(text)
        if not pos:
            return None
        i = rng.choice(pos)
        new = "" if kind == "tone_drop" else rng.choice([t for t in _NKO_TONES if t != text[i]])
        out = text[:i] + new + text[i + 1:]
    elif kind == "nasal_drop":
        pos = [i for i, ch in enumerate(text) if ch == NASAL_MARK]
        if not pos:
            return None
        i = rng.choice(pos)
        out = text[:i] + text[i + 1:]
    elif kind in _SWAPS:
        table = _SWAPS[kind]
        pos = [i for i, ch in enumerate(text) if ch in table]
        if not pos:
            return None
        i = rng.choice(pos)
        out = text[:i] + table[text[i]] + text[i + 1:]
    elif kind == "word_merge":
        pos = [i for i, ch in enumerate(text) if ch == " "]
        if not pos:
            return None
        i = rng.choice(pos)
        out = text[:i] + text[i + 1:]
    elif kind == "word_split":
        # between two letters of one word, never in front of a combining mark
        pos = [i for i in range(1, len(text)) if text[i] != " " and text[i - 1] != " " and not _is_mark(text[i])]
        if not pos:
            return None
        i = rng.choice(pos)
        out = text[:i] + " " + text[i:]
    else:
        raise CorpusError(f"unknown perturbation {kind!r}; known: {', '.join(PERTURBATIONS)}")
    out = unicodedata.normalize("NFC", out)
    return out if out != text else None


def synthetic_examples(rows: Sequence[PredictionRow], per_row: int, seed: int) -> list[dict]:
    """``per_row`` perturbed copies of each row's *reference* (train rows only, by the caller)."""
    rng = random.Random(seed)
    out = []
    for r in rows:
        for _ in range(per_row):
            kinds = list(PERTURBATIONS)
            rng.shuffle(kinds)
            for kind in kinds:
                noisy = perturb(r.reference_text, kind, rng)
                if noisy is not None:
                    break
            else:
                continue
            messages = [{"role": "system", "content": SYSTEM_PROMPT},
                        {"role": "user", "content": user_turn(noisy, "boundary", None)},
                        {"role": "assistant", "content": r.reference_text}]
            out.append({"messages": messages, "feat_id": r.feat_id, "audio_id": r.audio_id,
                        "source": "synthetic", "perturbation": kind})
    return out


# --------------------------------------------------------------------------- build


def build_corpus(rows: Sequence[PredictionRow], out_dir: Path | str, seed: int = 42, valid_fraction: float = 0.1,
                 test_fraction: float = 0.1, synthetic_per_row: int = 0, rows_sha256: str = "") -> dict:
    """Write train/valid/test.jsonl and corpus.json under ``out_dir``; return the manifest.
    Only rows whose ASR text differs from the reference (real error pairs) become examples;
    the split is made over those, then the already-correct rows are placed too
    (``place_correct_rows``). corpus.json records the rows' sha256 and partition source,
    counts, ``feat_ids`` (the examples' rows per split) and ``split_feat_ids`` (every row
    per split, already-correct ones included)."""
    if synthetic_per_row < 0:
        raise CorpusError("synthetic_per_row must be >= 0")
    scripts = {r.script for r in rows}
    if scripts - {"nko"}:
        raise CorpusError(f"the AGP corpus is N'Ko only; rows include script(s) {sorted(scripts - {'nko'})}")
    partition_source = partition_identity(rows)
    errors = [r for r in rows if r.asr_text != r.reference_text]
    if not errors:
        raise CorpusError("no error pairs: every ASR text equals its reference")
    splits = split_rows(errors, seed, valid_fraction, test_fraction)
    correct = place_correct_rows(splits, [r for r in rows if r.asr_text == r.reference_text], seed,
                                 valid_fraction, test_fraction)
    every = {k: splits[k] + correct[k] for k in splits}

    ids = {k: {r.feat_id for r in v} for k, v in every.items()}
    audio = {k: {r.audio_id for r in v if r.audio_id} for k, v in every.items()}
    for a, b in (("train", "valid"), ("train", "test"), ("valid", "test")):
        if ids[a] & ids[b] or audio[a] & audio[b]:  # guaranteed by the splitting; checked anyway
            raise CorpusError(f"splits {a} and {b} overlap")

    examples = {k: [chat_example(r) for r in v] for k, v in splits.items()}
    synthetic = synthetic_examples(splits["train"], synthetic_per_row, seed) if synthetic_per_row else []
    examples["train"] += synthetic

    out = Path(out_dir)
    for name, file in SPLIT_FILES.items():
        write_jsonl(out / file, examples[name])
    manifest = {
        "format": "mlx-lm chat (messages)", "seed": seed, "valid_fraction": valid_fraction,
        "test_fraction": test_fraction, "rows_in": len(rows), "rows_sha256": rows_sha256,
        "partition_source": partition_source,
        "error_pairs": len(errors), "skipped_correct_rows": len(rows) - len(errors),
        "synthetic_per_row": synthetic_per_row,
        "synthetic": dict(sorted(Counter(e["perturbation"] for e in synthetic).items())),
        "counts": {k: {"real": len(splits[k]), "synthetic": len(synthetic) if k == "train" else 0,
                       "lines": len(examples[k]), "correct": len(correct[k])} for k in SPLIT_FILES},
        "partitions": {k: dict(sorted(Counter(r.partition for r in v).items())) for k, v in splits.items()},
        "feat_ids": {k: sorted(r.feat_id for r in v) for k, v in splits.items()},
        "split_feat_ids": {k: sorted(v) for k, v in ids.items()},
        "files": {name: hashlib.sha256((out / file).read_bytes()).hexdigest() for name, file in SPLIT_FILES.items()},
    }
    atomic_write_json(out / "corpus.json", manifest, sort_keys=True)
    return manifest
