"""N'Ko orthography against real N'Ko text (issue 13): every target, measured over the
FLORES-200 dev/devtest and NLLB-Seed lines in ../shared/data/bambara-text/.

    nice .venv/bin/python benchmarks/nko_orthography.py [--data ../shared/data/bambara-text] [--json out.json]

Targets:
* stable Latin reading: nko_to_latin(latin_to_nko(nko_to_latin(x))) == nko_to_latin(x), per
  character over every nqo_Nkoo line x (>= 99.5%);
* the gbarali choice: compressed pairs and same-vowel pairs written in full, toneless and by
  tone; the round trip toneless N'Ko -> Latin -> N'Ko with compression on and off, and the
  tone-aware round trip N'Ko -> gbarali_expand -> gbarali_compress;
* Latin round trip: nko_to_latin(latin_to_nko(x)) == normalize_latin(x), per character over
  every bam_Latn line x (>= 99.5%);
* validity: nqo_Nkoo lines flagged by the default policy, by class (only latin and other
  may be non-zero).
Character accuracy is 1 - total Levenshtein edits / total characters of the expected side.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from models.text import (  # noqa: E402
    ACCEPT_TEXT, LONG_TONE_MARKS, UNDECIDED, gbarali_compress, gbarali_expand, latin_to_nko, nko_offences, nko_to_latin,
    nko_units, normalize, normalize_latin, offences_by_class, row_edits, toneless,
)

DEFAULT_DATA = Path(os.environ.get("NKO_OPS_SHARED", ROOT.parent / "shared")) / "data" / "bambara-text"


def read_lines(data: Path, script: str) -> list[str]:
    files = sorted(data.glob(f"*{script}*"))
    if not files:
        raise SystemExit(f"no *{script}* files under {data}")
    return [line for f in files for line in f.read_text(encoding="utf-8").splitlines() if line.strip()]


def accuracy(expected: list[str], got: list[str]) -> dict:
    edits = chars = same = 0
    for e, g in zip(expected, got):
        d, n = row_edits(e, g)
        edits, chars, same = edits + d, chars + n, same + (d == 0)
    return {"char_accuracy": round(1 - edits / chars, 5), "edits": edits, "chars": chars,
            "lines_identical": same, "lines": len(expected)}


def pair_counts(lines: list[str]) -> dict:
    """Gbarali slots and same-vowel CVCV written in full, the latter split by tone."""
    slots = Counter()  # compressed pairs: a consonant followed directly by a consonant
    full = Counter()  # C1 V C2 V, same short oral vowel, written in full (scanned like gbarali_compress)
    for line in lines:
        for word in normalize(line).split(" "):
            units = nko_units(word)
            for k, u in enumerate(units[:-1]):
                if u.kind == "C" and units[k + 1].kind == "C":
                    j = k + 1
                    while j < len(units) and units[j].kind in ("C", "X"):
                        j += 1
                    slots["before a vowel" if j < len(units) and units[j].kind == "V" else "undecided"] += 1
            k = 0
            while k + 3 < len(units):
                w = units[k : k + 4]
                if ([x.kind for x in w] == ["C", "V", "C", "V"] and w[1].base == w[3].base
                        and w[1].marks == w[1].tone and not set(w[1].tone) & LONG_TONE_MARKS):
                    full["same tone" if w[1].tone == w[3].tone else "different tone"] += 1
                    if w[1].tone == w[3].tone:
                        full[f"same tone: {'marked' if w[1].tone else 'both unmarked'}"] += 1
                    k += 4
                else:
                    k += 1
    compressed, full_total = slots["before a vowel"], full["same tone"] + full["different tone"]
    total = compressed + full_total
    return {"compressed_pairs": dict(slots), "full_same_vowel_pairs": dict(full), "full_same_vowel_total": full_total,
            # share of same-vowel pairs each rule spells as the writers did
            "pairs_as_written": {"toneless_compress_on": round(compressed / total, 4),
                                 "toneless_compress_off": round(full_total / total, 4),
                                 "same_vowel_and_same_tone": round((compressed + full["different tone"]) / total, 4)}}


def validity(lines: list[str]) -> dict:
    raw, normalised, chars = Counter(), Counter(), Counter()
    for line in lines:
        for counter, text in ((raw, line), (normalised, normalize(line))):
            groups = offences_by_class(nko_offences(text, accept=ACCEPT_TEXT))
            counter.update(groups.keys())
            if counter is normalised:
                for klass, found in groups.items():
                    chars.update(f"{klass} U+{ord(o.char):04X}" for o in found)
    return {"accepted": list(ACCEPT_TEXT), "lines": len(lines), "lines_flagged_raw_by_class": dict(raw),
            "lines_flagged_by_class": dict(normalised), "top_chars": dict(chars.most_common(12))}


def measure(data: Path) -> dict:
    nko = read_lines(data, "nqo_Nkoo")
    latin = read_lines(data, "bam_Latn")
    reading = [nko_to_latin(x) for x in nko]
    flat = [toneless(normalize(x)) for x in nko]
    out = {
        "nqo_Nkoo_lines": len(nko), "bam_Latn_lines": len(latin),
        "stable_latin_reading": {
            "gbarali_off": accuracy(reading, [nko_to_latin(latin_to_nko(r)) for r in reading]),
            "gbarali_on": accuracy(reading, [nko_to_latin(latin_to_nko(r, gbarali=True)) for r in reading]),
            "undecided_slots": sum(r.count(UNDECIDED) for r in reading),
        },
        "pairs": pair_counts(nko),
        "toneless_round_trip": {  # toneless N'Ko -> Latin -> N'Ko against the toneless original
            "gbarali_off": accuracy(flat, [latin_to_nko(r) for r in reading]),
            "gbarali_on": accuracy(flat, [latin_to_nko(r, gbarali=True) for r in reading]),
            "compress_only_off": accuracy(flat, [gbarali_expand(x) for x in flat]),
            "compress_only_on": accuracy(flat, [gbarali_compress(gbarali_expand(x)) for x in flat]),
        },
        "toned_round_trip": {  # N'Ko -> expand (copied tone) -> compress (same vowel and tone)
            "tone_aware": accuracy([normalize(x) for x in nko], [gbarali_compress(gbarali_expand(x)) for x in nko]),
            "expanded_only": accuracy([normalize(x) for x in nko], [gbarali_expand(x) for x in nko]),
        },
        "latin_round_trip": {
            "gbarali_off": accuracy([normalize_latin(x) for x in latin], [nko_to_latin(latin_to_nko(x)) for x in latin]),
            "gbarali_on": accuracy([normalize_latin(x) for x in latin],
                                   [nko_to_latin(latin_to_nko(x, gbarali=True)) for x in latin]),
        },
        "validity": validity(nko),
    }
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--json", type=Path, help="also write the results here")
    args = ap.parse_args()
    result = measure(args.data)
    text = json.dumps(result, ensure_ascii=False, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text + "\n", encoding="utf-8")


if __name__ == "__main__":
    main()
