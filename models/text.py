"""The text layer every number depends on: normalisation, script checks,
Latin <-> N'Ko transliteration, toneless projection and CER.

Transliteration is lossy in both directions, by construction:

* Latin -> N'Ko: Bambara Latin orthography does not write tone, so the N'Ko it
  produces is *toneless* (no U+07EB-U+07F1). A transliterated reference's "tone"
  is therefore an artefact; compare such references with toneless CER. Nasal
  vowels are written vowel+n before a consonant or at the end of a word; before a
  vowel the n starts the next syllable, so "sanu" -> ߛߊߣߎ, "san" -> ߛߊ߲.
  Punctuation is mapped where N'Ko has a sign (",", "!", "?") and dropped otherwise
  by the target normaliser, not here.
* Long vowels: Latin writes them doubled ("taa"), real N'Ko writes one vowel with a
  long tone mark U+07EE-U+07F1 (ߕߊ߯). Latin -> N'Ko writes the doubled letters
  ("taa" -> ߕߊߊ), which differs from real N'Ko orthography; N'Ko -> Latin reads a long
  tone mark as a doubled vowel, so ߕߊ߯ and ߕߊߊ both read back "taa".
* N'Ko -> Latin: tone marks (U+07EB-U+07F1 after vowels and ߒ) and the
  high/low tone apostrophes' tone are dropped; U+07F2 becomes "n" after the
  vowel, so a nasal vowel followed by a vowel reads back as vowel+n+vowel
  (ߛߊ߲ߊ -> "sana", which Latin->N'Ko maps to ߛߊߣߊ). ߠ (na woloso) and ߧ (nya
  woloso) read back as n and ɲ.

"ng" is not a digraph in the modern orthography (the velar nasal is written ŋ):
"fanga" is a nasal vowel then g, "ngoni" a syllabic n then g, and both come out of
the n rules above. ŋ itself is written ߒ.

Letter-name traps (CONTRACTS §6): ߋ (U+07CB, "EE") is /e/, ߍ (U+07CD, "E") is /ɛ/,
ߏ (U+07CF, "OO") is /o/, ߐ (U+07D0, "O") is /ɔ/.

Project decision on g: CONTRACTS §6 writes Latin g as the loan letter ߜ߭ and gb as
ߜ, which keeps the two distinct in both directions. Bambara writers often write
native /g/ as plain ߜ; pass ``native_g=True`` to get that spelling.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Sequence

from rapidfuzz.distance import Levenshtein

NORMALIZATION_VERSION = "nko-ops-text-1"

NKO_FIRST, NKO_LAST = 0x07C0, 0x07FF
TONE_MARKS = frozenset(chr(c) for c in range(0x07EB, 0x07F2))  # U+07EB..U+07F1
LONG_TONE_MARKS = frozenset(chr(c) for c in range(0x07EE, 0x07F2))  # U+07EE..U+07F1: long vowel
NASAL_MARK = "\u07f2"
LOAN_MARK = "\u07ed"  # short rising tone on a vowel, loan-sound dot on a consonant
HIGH_TONE_APOSTROPHE, LOW_TONE_APOSTROPHE = "\u07f4", "\u07f5"
SYLLABIC_N = "\u07d2"

BIDI_CONTROLS = frozenset(
    ["\u200e", "\u200f", "\u061c"]
    + [chr(c) for c in range(0x202A, 0x202F)]
    + [chr(c) for c in range(0x2066, 0x206A)]
)
INVISIBLES = frozenset(["\u200b", "\ufeff", "\u00ad"])  # zero-width space, BOM, soft hyphen

NKO_VOWELS = "ߊߋߌߍߎߏߐ"
# N'Ko signs and the foreign punctuation found in real N'Ko text (FLORES, NLLB-Seed).
NKO_PUNCTUATION = frozenset("߸߹߷߶.,:;!?()«»‹›\"'-–—،؛؟﴾﴿")
# Inside words: elision apostrophes and the lengthening sign are part of the spelling.
NKO_WORD_SIGNS = frozenset([HIGH_TONE_APOSTROPHE, LOW_TONE_APOSTROPHE, "\u07fa"])
UNASSIGNED_NKO = frozenset(["\u07fb", "\u07fc"])


def is_nko_char(ch: str) -> bool:
    return NKO_FIRST <= ord(ch) <= NKO_LAST and ch not in UNASSIGNED_NKO


# --------------------------------------------------------------------------- normalisation

_WS = re.compile(r"\s+")
_DROP = str.maketrans({ch: None for ch in BIDI_CONTROLS | INVISIBLES})


def normalize(text: str) -> str:
    """NFC, bidi controls and invisibles removed, whitespace folded to single spaces."""
    return _WS.sub(" ", unicodedata.normalize("NFC", text).translate(_DROP)).strip()


# bambara-text-normalizer does apostrophes, variant letters, tone stripping, punctuation
# and whitespace well; its legacy pass also rewrites every "ng" to "ŋ", which corrupts
# modern spellings such as "fanga" (fa + nasal + ga), so we run our own legacy map.
_LATIN_LEGACY = {"è": "ɛ", "ê": "ɛ", "ò": "ɔ", "ô": "ɔ", "ε": "ɛ", "ɳ": "ɲ", "ñ": "ɲ", "ꞃ": "r"}


def _latin_normalizer(remove_punctuation: bool):
    from bambara_normalizer import BambaraNormalizer
    from bambara_normalizer.config import BambaraNormalizerConfig

    config = BambaraNormalizerConfig(
        contraction_mode="preserve",
        preserve_tones=False,
        normalize_legacy_orthography=False,
        lowercase=True,
        remove_punctuation=remove_punctuation,
        normalize_whitespace=True,
        normalize_apostrophes=True,
        normalize_special_chars=True,
        handle_french_loanwords=False,
    )
    return BambaraNormalizer(config)


_NORMALIZERS: dict[bool, object] = {}


def normalize_latin(text: str, remove_punctuation: bool = False) -> str:
    """Latin Bambara: lower-case, Ɛ->ɛ, Ɔ->ɔ, Ɲ->ɲ, legacy letters (è->ɛ, ò->ɔ, ny->ɲ),
    apostrophe variants -> ', tone accents stripped; punctuation removed on request."""
    text = normalize(text).lower()
    for old, new in _LATIN_LEGACY.items():
        text = text.replace(old, new)
    text = text.replace("ny", "ɲ")
    if remove_punctuation not in _NORMALIZERS:
        _NORMALIZERS[remove_punctuation] = _latin_normalizer(remove_punctuation)
    text = _NORMALIZERS[remove_punctuation].normalize(text)  # type: ignore[attr-defined]
    if remove_punctuation:
        text = text.replace("'", " ' ").replace(" ' ", "'")  # keep elisions like k'a
        text = re.sub(r"(^|\s)'|'(\s|$)", r"\1\2", text)
    return normalize(text)


def normalize_nko(text: str, remove_punctuation: bool = False) -> str:
    """N'Ko: NFC, bidi stripped, whitespace folded; punctuation removed on request
    (elision apostrophes ߴ ߵ and the lengthening sign ߺ are kept: they are spelling)."""
    text = normalize(text)
    if remove_punctuation:
        text = "".join(" " if ch in NKO_PUNCTUATION else ch for ch in text)
        text = normalize(text)
    return text


def target_text(text: str, script: str) -> str:
    """The string a CTC model is trained on and scored against for ``script``."""
    if script == "nko":
        return normalize_nko(text, remove_punctuation=True)
    if script == "latin":
        return normalize_latin(text, remove_punctuation=True)
    raise ValueError(f"script must be 'nko' or 'latin', got {script!r}")


# --------------------------------------------------------------------------- script validity


@dataclass(frozen=True)
class Offence:
    position: int
    char: str

    @property
    def codepoint(self) -> str:
        return f"U+{ord(self.char):04X}"

    @property
    def name(self) -> str:
        return unicodedata.name(self.char, "UNKNOWN")

    def __str__(self) -> str:
        return f"{self.codepoint} {self.name} at position {self.position}"


def nko_offences(text: str, allow_punctuation: bool = True) -> list[Offence]:
    """Characters in NFC ``text`` that are not N'Ko letters/marks/digits, space, or
    (if allowed) punctuation. Empty list means valid N'Ko."""
    text = unicodedata.normalize("NFC", text)
    bad = []
    for i, ch in enumerate(text):
        if is_nko_char(ch) or ch == " ":
            continue
        if allow_punctuation and ch in NKO_PUNCTUATION:
            continue
        bad.append(Offence(i, ch))
    return bad


def is_valid_nko(text: str, allow_punctuation: bool = True) -> bool:
    return not nko_offences(text, allow_punctuation)


# --------------------------------------------------------------------------- transliteration

_LATIN_VOWELS = {"a": "ߊ", "e": "ߋ", "ɛ": "ߍ", "i": "ߌ", "o": "ߏ", "ɔ": "ߐ", "u": "ߎ"}
_LATIN_CONSONANTS = {
    "b": "ߓ", "p": "ߔ", "t": "ߕ", "j": "ߖ", "c": "ߗ", "d": "ߘ", "r": "ߙ", "s": "ߛ",
    "f": "ߝ", "k": "ߞ", "l": "ߟ", "m": "ߡ", "ɲ": "ߢ", "n": "ߣ", "h": "ߤ", "w": "ߥ",
    "y": "ߦ",
}
_LATIN_DIGRAPHS = {  # longest first; matched before single letters
    "rr": "ߚ", "gb": "ߜ", "ny": "ߢ", "sh": "ߛ߭", "kh": "ߞ߭",
}
_LATIN_LOANS = {"g": "ߜ߭", "v": "ߝ߭", "z": "ߖ߭", "x": "ߞ߭", "q": "ߞ", "ŋ": "ߒ"}
_LATIN_PUNCT = {",": "߸", "!": "߹", "?": "؟"}
_DIGITS = {str(d): chr(0x07C0 + d) for d in range(10)}


def _latin_tokens(word: str) -> list[str]:
    """Split a Latin word into orthographic units (digraphs first)."""
    units, i = [], 0
    while i < len(word):
        pair = word[i : i + 2]
        if pair in _LATIN_DIGRAPHS:
            units.append(pair)
            i += 2
        else:
            units.append(word[i])
            i += 1
    return units


def latin_to_nko(text: str, native_g: bool = False) -> str:
    """Transliterate normalised Latin Bambara to toneless N'Ko (see module docstring).

    >>> latin_to_nko("i ye san joli ye")
    'ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ'
    """
    text = normalize_latin(text)
    out_words = []
    for word in text.split(" "):
        units = _latin_tokens(word)
        out = []
        for k, u in enumerate(units):
            prev = units[k - 1] if k > 0 else ""
            nxt = units[k + 1] if k + 1 < len(units) else ""
            if u in _LATIN_VOWELS:
                out.append(_LATIN_VOWELS[u])
            elif u == "n":
                if prev in _LATIN_VOWELS and nxt not in _LATIN_VOWELS:
                    out.append(NASAL_MARK)  # nasal vowel: before a consonant or word end
                elif prev not in _LATIN_VOWELS and nxt not in _LATIN_VOWELS:
                    out.append(SYLLABIC_N)  # syllabic n: "n", "n'a", "nbe"
                else:
                    out.append("ߣ")
            elif u in _LATIN_CONSONANTS:
                out.append(_LATIN_CONSONANTS[u])
            elif u in _LATIN_DIGRAPHS:
                out.append(_LATIN_DIGRAPHS[u])
            elif u == "g" and native_g:
                out.append("ߜ")
            elif u in _LATIN_LOANS:
                out.append(_LATIN_LOANS[u])
            elif u in _DIGITS:
                out.append(_DIGITS[u])
            elif u in _LATIN_PUNCT:
                out.append(_LATIN_PUNCT[u])
            elif u == "'":
                out.append(HIGH_TONE_APOSTROPHE)  # elision, written ߴ in N'Ko
            else:
                out.append(u)  # left as is; validity checks report it
        out_words.append("".join(out))
    return unicodedata.normalize("NFC", " ".join(out_words))


_NKO_TO_LATIN = {v: k for k, v in _LATIN_VOWELS.items()}
_NKO_TO_LATIN.update({v: k for k, v in _LATIN_CONSONANTS.items()})
_NKO_TO_LATIN.update({"ߚ": "rr", "ߜ": "gb", "ߒ": "n", "ߠ": "n", "ߧ": "ɲ", "ߑ": ""})
_NKO_TO_LATIN.update({v: k for k, v in _DIGITS.items()})
_NKO_TO_LATIN.update({"߸": ",", "߹": "!", "؟": "?", "،": ",", "؛": ";"})
_NKO_TO_LATIN.update({HIGH_TONE_APOSTROPHE: "'", LOW_TONE_APOSTROPHE: "'", "\u07fa": ""})
_NKO_LOANS_TO_LATIN = {"ߜ": "g", "ߝ": "v", "ߖ": "z", "ߛ": "sh", "ߞ": "kh", "ߕ": "th", "ߘ": "dh", "ߙ": "gh", "ߗ": "ch"}


def nko_to_latin(text: str) -> str:
    """Transliterate N'Ko to Latin Bambara; tone is dropped, a long tone mark doubles its
    vowel (see module docstring).

    >>> nko_to_latin("ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ")
    'i ye san joli ye'
    >>> nko_to_latin("ߕߊ߯")
    'taa'
    """
    text = normalize(text)
    out = []
    i = 0
    while i < len(text):
        ch = text[i]
        nxt = text[i + 1] if i + 1 < len(text) else ""
        if nxt == LOAN_MARK and ch in _NKO_LOANS_TO_LATIN:
            out.append(_NKO_LOANS_TO_LATIN[ch])
            i += 2
            continue
        if ch == NASAL_MARK:
            out.append("n")
        elif ch in TONE_MARKS or ch == "\u07f3":
            pass
        elif ch in _NKO_TO_LATIN:
            out.append(_NKO_TO_LATIN[ch])
            mark = text[i + 2] if nxt == NASAL_MARK and i + 2 < len(text) else nxt  # NFC: nasal before tone
            if ch in NKO_VOWELS and mark in LONG_TONE_MARKS:
                out.append(_NKO_TO_LATIN[ch])
        else:
            out.append(ch)
        i += 1
    return normalize("".join(out))


# --------------------------------------------------------------------------- toneless projection


def toneless(text: str) -> str:
    """Strip tone marks U+07EB-U+07F1 that follow a vowel or ߒ (possibly after the
    nasal mark); on consonants U+07ED changes the letter and is kept. U+07F2 is kept;
    the tone apostrophes U+07F4/U+07F5 are merged into U+07F4."""
    text = unicodedata.normalize("NFC", text)
    out: list[str] = []
    carrier = False  # the last base character was a vowel or syllabic n
    for ch in text:
        if ch in TONE_MARKS:
            if carrier:
                continue
            out.append(ch)
            continue
        if ch == NASAL_MARK:
            out.append(ch)
            continue
        carrier = ch in NKO_VOWELS or ch == SYLLABIC_N
        out.append(HIGH_TONE_APOSTROPHE if ch == LOW_TONE_APOSTROPHE else ch)
    return "".join(out)


# --------------------------------------------------------------------------- CER


@dataclass(frozen=True)
class CER:
    edits: int
    reference_chars: int
    rows: int

    @property
    def value(self) -> float | None:
        """edits / reference_chars; None when there are no reference characters (undefined)."""
        return self.edits / self.reference_chars if self.reference_chars else None

    def as_dict(self) -> dict:
        return {"cer": self.value, "edits": self.edits, "reference_chars": self.reference_chars, "rows": self.rows}


def row_edits(reference: str, hypothesis: str) -> tuple[int, int]:
    """(edit distance, reference length) over NFC code points."""
    ref = unicodedata.normalize("NFC", reference)
    hyp = unicodedata.normalize("NFC", hypothesis)
    return Levenshtein.distance(ref, hyp), len(ref)


def corpus_cer(references: Sequence[str], hypotheses: Sequence[str], tone_free: bool = False) -> CER:
    """Corpus-level CER: total edits / total reference characters (NFC code points).
    With no reference characters at all the CER is undefined: ``.value`` is None."""
    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    edits = chars = 0
    for ref, hyp in zip(references, hypotheses):
        if tone_free:
            ref, hyp = toneless(ref), toneless(hyp)
        e, n = row_edits(ref, hyp)
        edits += e
        chars += n
    return CER(edits, chars, len(references))


def unknown_chars(texts: Iterable[str], symbols: Iterable[str]) -> dict[str, int]:
    """Characters of ``texts`` that are not in ``symbols``, with counts."""
    allowed = set(symbols)
    found: dict[str, int] = {}
    for t in texts:
        for ch in t:
            if ch not in allowed:
                found[ch] = found.get(ch, 0) + 1
    return found
