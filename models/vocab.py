"""Per-script CTC vocabulary: ordered symbols, blank index, script, normalisation version."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable

from models.text import NORMALIZATION_VERSION, unknown_chars

BLANK = "<blank>"

# The whole N'Ko block (64 code points) + space + blank = 66 outputs, the size of the
# program's published head, so a Paper 4 checkpoint and ours share the output layer.
NKO_SYMBOLS = [" "] + [chr(c) for c in range(0x07C0, 0x0800)]
LATIN_SYMBOLS = [" ", "'"] + list("abcdefghijklmnopqrstuvwxyz") + ["ɛ", "ɔ", "ɲ", "ŋ"] + [str(d) for d in range(10)]


@dataclass(frozen=True)
class Vocab:
    script: str
    symbols: tuple[str, ...]  # index 0 is the blank
    normalization_version: str = NORMALIZATION_VERSION
    _index: dict = field(default_factory=dict, compare=False, repr=False)

    def __post_init__(self) -> None:
        if self.symbols[0] != BLANK:
            raise ValueError("vocab symbol 0 must be the CTC blank")
        if len(set(self.symbols)) != len(self.symbols):
            raise ValueError("vocab symbols must be unique")
        self._index.update({s: i for i, s in enumerate(self.symbols)})

    @property
    def blank(self) -> int:
        return 0

    def __len__(self) -> int:
        return len(self.symbols)

    def unknown(self, texts: Iterable[str]) -> dict[str, int]:
        return unknown_chars(texts, self.symbols[1:])

    def encode(self, text: str) -> list[int]:
        """Indices for ``text``; raises ValueError naming every character not in the vocab."""
        missing = self.unknown([text])
        if missing:
            shown = ", ".join(f"{c!r} (U+{ord(c):04X})" for c in sorted(missing))
            raise ValueError(f"characters not in the {self.script} vocabulary: {shown}")
        return [self._index[ch] for ch in text]

    def decode(self, ids: Iterable[int]) -> str:
        return "".join(self.symbols[i] for i in ids if i != 0)

    def to_json(self) -> dict:
        return {
            "script": self.script,
            "blank_index": 0,
            "normalization_version": self.normalization_version,
            "symbols": list(self.symbols),
        }

    def save(self, path: Path) -> None:
        Path(path).write_text(json.dumps(self.to_json(), ensure_ascii=False, indent=1) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: Path) -> "Vocab":
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        return cls(data["script"], tuple(data["symbols"]), data.get("normalization_version", "unknown"))

    @classmethod
    def for_script(cls, script: str) -> "Vocab":
        if script == "nko":
            return cls("nko", (BLANK, *NKO_SYMBOLS))
        if script == "latin":
            return cls("latin", (BLANK, *LATIN_SYMBOLS))
        raise ValueError(f"script must be 'nko' or 'latin', got {script!r}")
