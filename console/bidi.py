"""Visual ordering of right-to-left text for a terminal.

Terminals draw cells left to right in the order they receive them and do no bidi
processing, so an N'Ko string (stored in logical order, first letter first) would show
mirrored. Before display we reorder it into *visual* order ourselves: split the text into
grapheme clusters (a base character plus the combining marks that follow it), give each
cluster an embedding level (a simplified Unicode Bidirectional Algorithm: strong R/AL
letters odd, strong L letters and digits even, neutrals take the direction of
their neighbours when both sides agree, else the paragraph's), then reverse runs from the
highest level down (rule L2). Reversing whole clusters rather than code points keeps each
tone mark (U+07EB..U+07F3) and the nasalisation mark attached to its own base letter.

N'Ko is also a joining script; terminals do not shape it, so letters show in their
isolated forms. Only the order is fixed here.
"""

from __future__ import annotations

import unicodedata
from typing import Sequence, TypeVar

from models.text import normalize

T = TypeVar("T")

_MIRROR = dict(zip("()[]{}<>«»‹›", ")(][}{><»«›‹"))


def clusters(text: str) -> list[str]:
    """Split into grapheme clusters: each base with its following combining marks.

    Marks with no base (at the very start) form a cluster of their own.
    """
    out: list[str] = []
    for ch in text:
        if out and _is_mark(ch):
            out[-1] += ch
        else:
            out.append(ch)
    return out


def _is_mark(ch: str) -> bool:
    return unicodedata.category(ch) in ("Mn", "Mc", "Me") or ch in ("\u200d",)


def _kind(cluster: str) -> str | None:
    """'R' (right-to-left letter), 'L' (left-to-right letter), 'N' (number) or None."""
    cls = unicodedata.bidirectional(cluster[0])
    if cls in ("R", "AL"):
        return "R"
    if cls == "L":
        return "L"
    if cls in ("EN", "AN"):
        return "N"
    return None


def paragraph_is_rtl(text: str) -> bool:
    """True when the first strong letter is right-to-left (UBA rules P2/P3)."""
    for ch in text:
        k = _kind(ch)
        if k in ("R", "L"):
            return k == "R"
    return False


def levels(units: Sequence[str], rtl: bool) -> list[int]:
    """Embedding level of each cluster in a paragraph of the given direction.

    R letters get level 1; L letters get the paragraph's even level (0, or 2 inside RTL);
    numbers get level 2 so their digits keep left-to-right order in either paragraph.
    A neutral between two same-direction neighbours takes that direction (numbers count
    as R there, rule N1), otherwise the paragraph direction (N2).
    """
    kinds = [_kind(u) for u in units]
    strong = [("R" if k == "N" else k) for k in kinds]
    after: list[str | None] = [None] * len(kinds)  # next strong direction to the right
    nxt = None
    for i in range(len(kinds) - 1, -1, -1):
        after[i] = nxt
        nxt = strong[i] or nxt
    even = 2 if rtl else 0
    out: list[int] = []
    before = None
    for i, k in enumerate(kinds):
        if k is None:
            d = before if before is not None and before == after[i] else ("R" if rtl else "L")
            out.append(1 if d == "R" else even)
        else:
            before = strong[i]
            out.append({"R": 1, "L": even, "N": 2}[k])
    return out


def reorder(units: Sequence[T], lv: Sequence[int]) -> list[T]:
    """Rule L2: from the highest level down to the lowest odd level, reverse every
    maximal run of units at that level or higher."""
    items = list(zip(units, lv))
    if not items:
        return []
    top = max(lv)
    lowest_odd = min((x for x in lv if x % 2), default=top + 1)
    for level in range(top, lowest_odd - 1, -1):
        i = 0
        while i < len(items):
            if items[i][1] >= level:
                j = i
                while j < len(items) and items[j][1] >= level:
                    j += 1
                items[i:j] = items[i:j][::-1]
                i = j
            else:
                i += 1
    return [u for u, _ in items]


def units(text: str) -> list[str]:
    """The clusters of the normalised text (NFC, no bidi controls), in logical order."""
    return clusters(normalize(text))


def visual_clusters(text: str) -> list[tuple[str, int]]:
    """(cluster, logical index into ``units(text)``) pairs in visual (display) order.

    The logical index lets a caller style clusters (e.g. a diff) before reordering.
    Right-to-left clusters that are mirrored characters are swapped for their mirror.
    """
    units_ = units(text)
    lv = levels(units_, paragraph_is_rtl("".join(units_)))
    order = reorder(list(range(len(units_))), lv)
    return [(_MIRROR.get(units_[i], units_[i]) if lv[i] % 2 else units_[i], i) for i in order]


def visual(text: str) -> str:
    """Display string for a terminal: ``visual("ߌ ߦߋ")`` puts ߌ at the right end."""
    return "".join(c for c, _ in visual_clusters(text))
