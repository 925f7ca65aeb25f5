"""The text layer every number depends on: normalisation, script checks,
Latin <-> N'Ko transliteration, toneless projection and CER.

Transliteration is lossy in both directions, by construction. The spellings below follow
real N'Ko text (the 8,202 FLORES / NLLB-Seed ``nqo_Nkoo`` lines in
``../shared/data/bambara-text``; counts from ``benchmarks/nko_orthography.py``); the special
spellings are in one table, ``ORTHOGRAPHY``, each with its source.

* Latin -> N'Ko: Bambara Latin orthography does not write tone, so the N'Ko it
  produces is *toneless* (no U+07EB-U+07F1). A transliterated reference's "tone"
  is therefore an artefact; compare such references with toneless CER. Nasal
  vowels are written vowel+n before a consonant or at the end of a word; before a
  vowel the n starts the next syllable, so "sanu" -> ߛߊߣߎ, "san" -> ߛߊ߲.
  Punctuation is mapped where N'Ko has a sign (",", "!", "?") and dropped otherwise
  by the target normaliser, not here.
* Gbarali. N'Ko readers supply a vowel between two consonants written side by side: the
  vowel that follows them (ߞߣߐ reads kɔnɔ). A true consonant cluster is marked with
  dagbasinna ߑ (U+07D1) between the consonants (Stanford -> ߛߑߕߊ߲ߝߏߙߑߘ). Latin -> N'Ko
  writes ߑ in every cluster; with ``gbarali=True`` it also writes the compressed spelling
  native writers use: C1 V C2 V with the same short oral vowel V both sides (and, in N'Ko
  that carries tone, the same tone mark: ``gbarali_compress``) loses its first V, left to
  right, pairs not overlapping (kɔnɔ -> ߞߣߐ, kelekele -> ߞߟߋߞߟߋ). N'Ko -> Latin restores the
  vowel. When no vowel follows the consonants (before an elision apostrophe, at the end of
  a word, before a digit or a sign) the rule cannot say which vowel was dropped: the slot is
  written ``UNDECIDED`` ("·", U+00B7), e.g. ߓߟߴߊ -> "b·l'a", never a guessed vowel.
  Latin -> N'Ko turns a "·" between consonants back into the unmarked pair, so the reading
  is stable.
* Long vowels: Latin writes them doubled ("taa"), real N'Ko writes one vowel with a
  long tone mark U+07EE-U+07F1 (ߕߊ߯). Latin -> N'Ko writes the doubled letters
  ("taa" -> ߕߊߊ), which differs from real N'Ko orthography; N'Ko -> Latin reads a long
  tone mark as a doubled vowel, so ߕߊ߯ and ߕߊߊ both read back "taa".
* N'Ko -> Latin: tone marks (U+07EB-U+07F1 after vowels and ߒ) and the
  high/low tone apostrophes' tone are dropped; U+07F2 becomes "n" after the
  vowel, so a nasal vowel followed by a vowel reads back as vowel+n+vowel
  (ߛߊ߲ߊ -> "sana", which Latin->N'Ko maps to ߛߊߣߊ). ߠ (na woloso) reads n, ߧ (nya
  woloso) reads y: it is the y of a syllable after a nasal vowel (ߓߏ߲ߧߊ "bonya"), and
  Latin -> N'Ko writes it there. A digit with the nasal mark is an ordinal: ߁߲ -> "1nan".
* "ny": in the modern orthography ɲ is written ɲ and "ny" is n + y (bonya -> ߓߏ߲ߧߊ).
  Old texts that write ɲ as "ny" need ``legacy=True`` (``normalize_latin``,
  ``latin_to_nko``), which reads every "ny" as ɲ.

"ng" is not a digraph in the modern orthography (the velar nasal is written ŋ):
"fanga" is a nasal vowel then g, "ngoni" a syllabic n then g, and both come out of
the n rules above. ŋ itself is written ߒ. An n before an elision apostrophe is the
consonant ߣ (n'a -> ߣߴߊ, min'a -> ߡߌߣߴߊ), never the syllabic ߒ.

Letter-name traps (CONTRACTS §6): ߋ (U+07CB, "EE") is /e/, ߍ (U+07CD, "E") is /ɛ/,
ߏ (U+07CF, "OO") is /o/, ߐ (U+07D0, "O") is /ɔ/.

Project decision on g: CONTRACTS §6 writes Latin g as the loan letter ߜ߭ and gb as
ߜ, which keeps the two distinct in both directions. Bambara writers often write
native /g/ as plain ߜ; pass ``native_g=True`` to get that spelling.

Script validity is by character class (``VALIDITY_CLASSES``): N'Ko, the punctuation real
N'Ko text uses, common typographic signs, Latin letters, other scripts and symbols,
controls. Each caller chooses which classes it accepts; findings are reported by class.
"""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass
from typing import Iterable, Sequence

from rapidfuzz.distance import Levenshtein

NORMALIZATION_VERSION = "nko-ops-text-2"

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


def normalize_latin(text: str, remove_punctuation: bool = False, legacy: bool = False) -> str:
    """Latin Bambara: lower-case, Ɛ->ɛ, Ɔ->ɔ, Ɲ->ɲ, variant letters (è->ɛ, ò->ɔ, ñ->ɲ),
    apostrophe variants -> ', tone accents stripped; punctuation removed on request.
    "ny" is n + y (modern orthography); ``legacy=True`` reads it as ɲ (old texts)."""
    text = normalize(text).lower()
    for old, new in _LATIN_LEGACY.items():
        text = text.replace(old, new)
    if legacy:
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

# Which kind of character a finding is. Callers choose the classes they accept.
VALIDITY_CLASSES = ("nko", "punctuation", "typographic", "latin", "other", "control")
# Sentence punctuation is class "punctuation" (NKO_PUNCTUATION); everything else that is
# neither a letter nor a control -- spaces of any width (NBSP, thin space), %, /, °, =, +, ×,
# ASCII digits, currency and other signs -- is "typographic". Real N'Ko text uses both.
ACCEPT_TEXT = ("nko", "punctuation", "typographic")  # default for running N'Ko text
ACCEPT_TARGET = ("nko",)  # N'Ko letters, marks, digits and space only (ASR targets)


def char_class(ch: str) -> str:
    """The validity class of one character (see ``VALIDITY_CLASSES``)."""
    if ch == " " or is_nko_char(ch):
        return "nko"
    if ch in UNASSIGNED_NKO:
        return "control"
    if ch in NKO_PUNCTUATION:
        return "punctuation"
    cat = unicodedata.category(ch)
    if cat[0] == "C" or cat in ("Zl", "Zp"):
        return "control"
    if cat[0] in "LM":
        return "latin" if unicodedata.name(ch, "").startswith(("LATIN", "COMBINING")) else "other"
    if cat == "Nd" and not ch.isascii():
        return "other"  # digits of another script
    if cat == "So" and ord(ch) > 0xFFFF:
        return "other"  # emoji and other astral symbols
    return "typographic"  # Z*, P*, S*, ASCII digits, No


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

    @property
    def klass(self) -> str:
        return char_class(self.char)

    def __str__(self) -> str:
        return f"{self.codepoint} {self.name} at position {self.position} ({self.klass})"


def _accepted(allow_punctuation: bool, accept: Iterable[str] | None) -> frozenset[str]:
    if accept is None:
        return frozenset(ACCEPT_TEXT if allow_punctuation else ACCEPT_TARGET)
    accept = frozenset(accept)
    unknown = accept - set(VALIDITY_CLASSES)
    if unknown:
        raise ValueError(f"unknown validity class(es) {sorted(unknown)}; known: {', '.join(VALIDITY_CLASSES)}")
    return accept


def nko_offences(text: str, allow_punctuation: bool = True, accept: Iterable[str] | None = None) -> list[Offence]:
    """Characters in NFC ``text`` whose class is not accepted. ``accept`` names the
    classes (``VALIDITY_CLASSES``); without it, ``allow_punctuation`` chooses between
    ``ACCEPT_TEXT`` (N'Ko, punctuation, typographic signs) and ``ACCEPT_TARGET`` (N'Ko
    only). Empty list means valid."""
    ok = _accepted(allow_punctuation, accept)
    text = unicodedata.normalize("NFC", text)
    return [Offence(i, ch) for i, ch in enumerate(text) if char_class(ch) not in ok]


def offences_by_class(offences: Iterable[Offence]) -> dict[str, list[Offence]]:
    """Group findings by validity class, in ``VALIDITY_CLASSES`` order."""
    groups: dict[str, list[Offence]] = {}
    for o in offences:
        groups.setdefault(o.klass, []).append(o)
    return {k: groups[k] for k in VALIDITY_CLASSES if k in groups}


def is_valid_nko(text: str, allow_punctuation: bool = True, accept: Iterable[str] | None = None) -> bool:
    return not nko_offences(text, allow_punctuation, accept)


# --------------------------------------------------------------------------- orthography table


@dataclass(frozen=True)
class Spelling:
    """One special spelling. ``nko`` is read as ``latin``; Latin -> N'Ko writes ``nko``
    for ``latin`` and for each of ``also`` (where ``writes``), under ``where``."""
    rule: str
    nko: str
    latin: str
    where: str
    source: str
    also: tuple[str, ...] = ()
    writes: bool = True


# Counts are in the 8,202 nqo_Nkoo lines of ../shared/data/bambara-text (issue 13 and
# benchmarks/nko_orthography.py).
ORTHOGRAPHY: tuple[Spelling, ...] = (
    Spelling("loan", "ߜ߭", "g", "loan letter", "CONTRACTS §6 (N'Ko loan letters); ߜ߭ 1,024 times in the data"),
    Spelling("loan", "ߝ߭", "v", "loan letter", "CONTRACTS §6; ߝ߭ 494 times"),
    Spelling("loan", "ߖ߭", "z", "loan letter", "CONTRACTS §6; ߖ߭ 641 times"),
    Spelling("loan", "ߛ߭", "sh", "loan letter", "CONTRACTS §6; ߛ߭ 167 times"),
    Spelling("loan", "ߗ߭", "j", "voiced loan (French j, ߗ߭ߊߙߑߘߍ߲ 'jardin'); Latin j is the native ߖ",
             "issue 13 item 6; ߗ߭ 59 times", writes=False),
    Spelling("loan", "ߞ߭", "kh", "loan letter (Arabic kh)", "issue 13; ߞ߭ 12 times", also=("x",)),
    Spelling("loan", "ߕ߭", "th", "loan letter (Arabic th)", "N'Ko loan-letter convention; ߕ߭ 4 times"),
    Spelling("loan", "ߘ߭", "dh", "loan letter (Arabic dh)", "N'Ko loan-letter convention; ߘ߭ 4 times"),
    Spelling("loan", "ߙ߭", "gh", "loan letter (Arabic gh)", "N'Ko loan-letter convention; not in the data"),
    Spelling("nya_woloso", "ߧ", "y", "y starting a syllable after a nasal vowel (bonya ߓߏ߲ߧߊ)",
             "issue 13 item 3: after a nasal vowel ߧ 690 times, ߦ 1,245; ߓߏ߲ߧߊ 57 times (toneless)"),
    Spelling("na_woloso", "ߠ", "n", "n (or la -> na) after a nasal; read only: Latin -> N'Ko writes ߣ",
             "N'Ko standard; ߠ 12,723 times", writes=False),
    Spelling("elided_n", "ߣߴ", "n'", "n before an elision apostrophe (n'a, min'a)",
             "issue 13 item 5: ߣߴ 1,028 times, ߣߵ 144, ߒ + apostrophe never"),
    Spelling("ordinal", "߁߲", "1nan", "a digit run with the nasal mark is an ordinal (any digits)",
             "issue 13 item 4: 231 times (߁߉߲ 61, ߂߀߲ 27)"),
    Spelling("dagbasinna", "ߑ", "", "between the consonants of a true cluster (ߛߑߕ 'st')",
             "N'Ko standard (U+07D1); ߑ 2,922 times (ߛߑߕ 428)"),
    Spelling("latin_only", "ߞ", "q", "Latin q (French and Arabic names); reads back k",
             "project decision: N'Ko has no q; q 366 times in the bam_Latn lines"),
    Spelling("latin_only", "ߒ", "ŋ", "Latin ŋ (velar nasal); reads back n",
             "project decision: written as the syllabic nasal ߒ; ŋ 91 times in the bam_Latn lines"),
)

_LOANS = [s for s in ORTHOGRAPHY if s.rule == "loan"]
_NKO_LOANS_TO_LATIN = {s.nko[0]: s.latin for s in _LOANS}  # base letter (with LOAN_MARK) -> Latin
_LATIN_LOANS = {lat: s.nko for s in _LOANS if s.writes for lat in (s.latin, *s.also)}
_LATIN_LOANS.update({s.latin: s.nko for s in ORTHOGRAPHY if s.rule == "latin_only"})
NYA_WOLOSO, NA_WOLOSO, DAGBASINNA = "ߧ", "ߠ", "\u07d1"
UNDECIDED = "\u00b7"  # the vowel gbarali cannot decide (see module docstring)

# --------------------------------------------------------------------------- transliteration

_LATIN_VOWELS = {"a": "ߊ", "e": "ߋ", "ɛ": "ߍ", "i": "ߌ", "o": "ߏ", "ɔ": "ߐ", "u": "ߎ"}
_LATIN_CONSONANTS = {
    "b": "ߓ", "p": "ߔ", "t": "ߕ", "j": "ߖ", "c": "ߗ", "d": "ߘ", "r": "ߙ", "s": "ߛ",
    "f": "ߝ", "k": "ߞ", "l": "ߟ", "m": "ߡ", "ɲ": "ߢ", "n": "ߣ", "h": "ߤ", "w": "ߥ",
    "y": "ߦ",
}
_LATIN_DIGRAPHS = {"rr": "ߚ", "gb": "ߜ"}  # matched before single letters
_LATIN_DIGRAPHS.update({lat: nko for lat, nko in _LATIN_LOANS.items() if len(lat) == 2})
_LATIN_PUNCT = {",": "߸", "!": "߹", "?": "؟"}
_DIGITS = {str(d): chr(0x07C0 + d) for d in range(10)}
_ORDINAL = "nan"


def _latin_tokens(word: str) -> list[str]:
    """Split a Latin word into orthographic units (digraphs first; "nan" after a digit is
    the ordinal suffix)."""
    units, i = [], 0
    while i < len(word):
        pair = word[i : i + 2]
        if units and units[-1] in _DIGITS and word.startswith(_ORDINAL, i) and not word[i + 3 : i + 4].isalpha():
            units.append(_ORDINAL)
            i += 3
        elif pair in _LATIN_DIGRAPHS:
            units.append(pair)
            i += 2
        else:
            units.append(word[i])
            i += 1
    return units


def _latin_word_to_nko(word: str, native_g: bool) -> str:
    units = _latin_tokens(word)
    items: list[tuple[str, str]] = []  # (kind, N'Ko): C consonant, V vowel, N nasal mark, other
    for k, u in enumerate(units):
        prev = units[k - 1] if k > 0 else ""
        nxt = units[k + 1] if k + 1 < len(units) else ""
        if u in _LATIN_VOWELS:
            items.append(("V", _LATIN_VOWELS[u]))
        elif u == "n":
            if nxt == "'":
                items.append(("C", "ߣ"))  # elided n': ߣߴ (ORTHOGRAPHY "elided_n")
            elif UNDECIDED in (prev, nxt):
                items.append(("C", "ߣ"))  # the consonant of an undecided gbarali pair
            elif prev in _LATIN_VOWELS and nxt not in _LATIN_VOWELS:
                items.append(("N", NASAL_MARK))  # nasal vowel: before a consonant or word end
            elif prev not in _LATIN_VOWELS and nxt not in _LATIN_VOWELS:
                items.append(("S", SYLLABIC_N))  # syllabic n: "n", "nbe"
            else:
                items.append(("C", "ߣ"))
        elif u == "y" and items and items[-1][0] == "N" and nxt in _LATIN_VOWELS:
            items.append(("C", NYA_WOLOSO))  # y after a nasal vowel (ORTHOGRAPHY "nya_woloso")
        elif u == "g" and native_g:
            items.append(("C", "ߜ"))
        elif u in _LATIN_CONSONANTS:
            items.append(("C", _LATIN_CONSONANTS[u]))
        elif u in _LATIN_DIGRAPHS:
            items.append(("C", _LATIN_DIGRAPHS[u]))
        elif u in _LATIN_LOANS:
            items.append(("S" if u == "ŋ" else "C", _LATIN_LOANS[u]))
        elif u in _DIGITS:
            items.append(("D", _DIGITS[u]))
        elif u == _ORDINAL:
            items.append(("N", NASAL_MARK))  # ordinal: digit + nasal mark
        elif u in _LATIN_PUNCT:
            items.append(("P", _LATIN_PUNCT[u]))
        elif u == "'":
            items.append(("A", HIGH_TONE_APOSTROPHE))  # elision, written ߴ in N'Ko
        elif u == UNDECIDED:
            items.append(("U", ""))  # an undecided gbarali slot: the consonants stay unmarked
        else:
            items.append(("O", u))  # left as is; validity checks report it
    out = []
    for k, (kind, nko) in enumerate(items):
        out.append(nko)
        if kind == "C" and k + 1 < len(items) and items[k + 1][0] == "C":
            out.append(DAGBASINNA)  # a true cluster
    return "".join(out)


def latin_to_nko(text: str, native_g: bool = False, gbarali: bool = False, legacy: bool = False) -> str:
    """Transliterate Latin Bambara to toneless N'Ko (see module docstring): ߑ in true
    clusters; ``gbarali=True`` compresses same-vowel syllable pairs (``gbarali_compress``);
    ``legacy=True`` reads "ny" as ɲ.

    >>> latin_to_nko("i ye san joli ye")
    'ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ'
    >>> latin_to_nko("kɔnɔ", gbarali=True)
    'ߞߣߐ'
    """
    text = normalize_latin(text, legacy=legacy)
    nko = unicodedata.normalize("NFC", " ".join(_latin_word_to_nko(w, native_g) for w in text.split(" ")))
    return gbarali_compress(nko) if gbarali else nko


# --------------------------------------------------------------------------- N'Ko syllable units

_NKO_MARKS = frozenset(chr(c) for c in range(0x07EB, 0x07F4)) | {"\u07fd"}
_NKO_CONSONANTS = frozenset(chr(c) for c in range(0x07D3, 0x07EB))


@dataclass(frozen=True)
class Unit:
    """One N'Ko base character with its combining marks. kind: C consonant, V vowel,
    S syllabic n, X dagbasinna, A elision apostrophe, D digit, O anything else."""
    kind: str
    base: str
    marks: str = ""

    @property
    def text(self) -> str:
        return self.base + self.marks

    @property
    def tone(self) -> str:
        return "".join(m for m in self.marks if m in TONE_MARKS)


def nko_units(word: str) -> list[Unit]:
    """Split NFC N'Ko into base characters with their marks."""
    units: list[Unit] = []
    for ch in word:
        if ch in _NKO_MARKS and units and units[-1].kind != "O":
            u = units[-1]
            units[-1] = Unit(u.kind, u.base, u.marks + ch)
            continue
        if ch in NKO_VOWELS:
            kind = "V"
        elif ch in _NKO_CONSONANTS:
            kind = "C"
        elif ch == SYLLABIC_N:
            kind = "S"
        elif ch == DAGBASINNA:
            kind = "X"
        elif ch in (HIGH_TONE_APOSTROPHE, LOW_TONE_APOSTROPHE):
            kind = "A"
        elif "\u07c0" <= ch <= "\u07c9":
            kind = "D"
        else:
            kind = "O"
        units.append(Unit(kind, ch))
    return units


def _gbarali_vowel(units: list[Unit], k: int) -> Unit | None:
    """For consonant ``units[k]`` followed directly by a consonant: the vowel that follows
    the run of consonants (ߑ inside the run is skipped), or None if none does."""
    j = k + 1
    while j < len(units) and units[j].kind in ("C", "X"):
        j += 1
    return units[j] if j < len(units) and units[j].kind == "V" else None


def gbarali_expand(text: str, tones: bool = True) -> str:
    """N'Ko with every gbarali vowel written out: the reader's vowel, with the tone mark
    of the vowel it copies when ``tones`` (nasal and long marks are not copied). A slot
    with no following vowel keeps its consonants unmarked."""
    out = []
    for token in re.split(r"(\s+)", unicodedata.normalize("NFC", text)):
        units = nko_units(token)
        parts = []
        for k, u in enumerate(units):
            parts.append(u.text)
            if u.kind == "C" and k + 1 < len(units) and units[k + 1].kind == "C":
                v = _gbarali_vowel(units, k)
                if v is not None:
                    tone = v.tone if tones and v.tone not in LONG_TONE_MARKS else ""
                    parts.append(v.base + tone)
        out.append("".join(parts))
    return unicodedata.normalize("NFC", "".join(out))


def gbarali_compress(text: str) -> str:
    """The gbarali spelling: C1 V C2 V with the same short oral vowel (and the same tone
    marks, where the text has tones) loses its first V; left to right, pairs not
    overlapping. ``nko_to_latin`` and ``gbarali_expand`` restore it."""
    out = []
    for token in re.split(r"(\s+)", unicodedata.normalize("NFC", text)):
        units = nko_units(token)
        parts, k = [], 0
        while k < len(units):
            w = units[k : k + 4]
            if (len(w) == 4 and [u.kind for u in w] == ["C", "V", "C", "V"] and w[1].base == w[3].base
                    and w[1].marks == w[1].tone and w[1].tone == w[3].tone
                    and not set(w[1].tone) & LONG_TONE_MARKS):
                parts += [w[0].text, w[2].text, w[3].text]
                k += 4
            else:
                parts.append(units[k].text)
                k += 1
        out.append("".join(parts))
    return unicodedata.normalize("NFC", "".join(out))


_NKO_TO_LATIN = {v: k for k, v in _LATIN_VOWELS.items()}
_NKO_TO_LATIN.update({v: k for k, v in _LATIN_CONSONANTS.items()})
_NKO_TO_LATIN.update({"ߚ": "rr", "ߜ": "gb", "ߒ": "n", NA_WOLOSO: "n", NYA_WOLOSO: "y", DAGBASINNA: ""})
_NKO_TO_LATIN.update({"ߨ": "j", "ߩ": "c", "ߪ": "r"})  # archaic jona letters
_NKO_TO_LATIN.update({v: k for k, v in _DIGITS.items()})
_NKO_TO_LATIN.update({"߸": ",", "߹": "!", "؟": "?", "،": ",", "؛": ";"})
_NKO_TO_LATIN.update({HIGH_TONE_APOSTROPHE: "'", LOW_TONE_APOSTROPHE: "'", "\u07fa": ""})


def nko_to_latin(text: str) -> str:
    """Transliterate N'Ko to Latin Bambara: gbarali vowels restored (``UNDECIDED`` where no
    vowel follows), tone dropped, a long tone mark doubles its vowel, a digit with the
    nasal mark is an ordinal (see module docstring).

    >>> nko_to_latin("ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ")
    'i ye san joli ye'
    >>> nko_to_latin("ߕߊ߯ ߞߣߐ ߛߑߕߊ߲ߝߏߙߑߘ ߁߲")
    'taa kɔnɔ stanford 1nan'
    """
    out = []
    for token in re.split(r"(\s+)", normalize(text)):
        units = nko_units(token)
        for k, u in enumerate(units):
            if u.kind == "C" and LOAN_MARK in u.marks and u.base in _NKO_LOANS_TO_LATIN:
                out.append(_NKO_LOANS_TO_LATIN[u.base])
            elif u.kind == "D":
                out.append(_NKO_TO_LATIN[u.base] + (_ORDINAL if NASAL_MARK in u.marks else ""))
                continue
            elif u.base in _NKO_MARKS:  # a mark with no letter before it: tone dropped, nasal read n
                out.append("n" if u.base == NASAL_MARK else "")
                continue
            else:
                out.append(_NKO_TO_LATIN.get(u.base, u.base))
            if u.kind == "V" and set(u.marks) & LONG_TONE_MARKS:
                out.append(_NKO_TO_LATIN[u.base])
            if NASAL_MARK in u.marks:
                out.append("n")
            if u.kind == "C" and k + 1 < len(units) and units[k + 1].kind == "C":
                v = _gbarali_vowel(units, k)
                out.append(_NKO_TO_LATIN[v.base] if v is not None else UNDECIDED)
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
