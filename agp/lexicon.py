"""The word lexicon the lexicon proposer and the gate consult, built from *training*
references only (never from the rows being corrected or scored).

Words are tokens of ``target_text(reference, "nko")`` (NFC, bidi stripped, punctuation
removed, split on spaces). Saved as TSV ``word<TAB>count``, most frequent first."""

from __future__ import annotations

import hashlib
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from rapidfuzz import process
from rapidfuzz.distance import Levenshtein

from models.files import atomic_write_text
from models.text import target_text


@dataclass
class Lexicon:
    counts: dict[str, int]
    _ranked: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        # Ties in distance go to the more frequent word, then the smaller code-point order.
        self._ranked = sorted(self.counts, key=lambda w: (-self.counts[w], w))

    @classmethod
    def from_references(cls, references: Iterable[str]) -> "Lexicon":
        counts: Counter[str] = Counter()
        for ref in references:
            counts.update(w for w in target_text(ref, "nko").split(" ") if w)
        return cls(dict(counts))

    @classmethod
    def load(cls, path: Path | str) -> "Lexicon":
        path = Path(path)
        if not path.exists():
            raise FileNotFoundError(f"lexicon not found: {path}")
        counts = {}
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise ValueError(f"{path}: not valid UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})") from None
        for lineno, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            word, sep, n = line.partition("\t")
            if not sep or not n.strip().isdigit() or not word or " " in word:
                raise ValueError(f"{path.name}:line {lineno}: expected 'word<TAB>count'")
            counts[word] = counts.get(word, 0) + int(n)
        return cls(counts)

    def save(self, path: Path | str) -> None:
        atomic_write_text(path, "".join(f"{w}\t{self.counts[w]}\n" for w in self._ranked))

    def __contains__(self, word: str) -> bool:
        return word in self.counts

    def __len__(self) -> int:
        return len(self.counts)

    @property
    def sha256(self) -> str:
        h = hashlib.sha256()
        for w in sorted(self.counts):
            h.update(f"{w}\t{self.counts[w]}\n".encode())
        return h.hexdigest()

    def nearest(self, word: str, max_distance: int) -> str | None:
        """The closest lexicon word within ``max_distance`` edits (``word`` itself if known)."""
        if word in self.counts:
            return word
        hits = process.extract(word, self._ranked, scorer=Levenshtein.distance,
                               score_cutoff=max_distance, limit=None)
        if not hits:
            return None
        # extract returns (choice, distance, index); index is the frequency rank.
        best = min(hits, key=lambda h: (h[1], h[2]))
        return best[0]
