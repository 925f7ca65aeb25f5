"""Visual ordering of right-to-left text for a terminal.

Terminals draw cells left to right in the order they receive them and do no bidi
processing, so an N'Ko string (stored in logical order, first letter first) would show
mirrored. Before display we reorder it into *visual* order ourselves: split the text into
grapheme clusters (a base character plus the combining marks that follow it), give each
cluster an embedding level (the Unicode Bidirectional Algorithm for one paragraph without
explicit embeddings: weak rules W2-W7 for numbers and their separators, neutrals N1/N2,
implicit levels I1/I2), then reverse runs from the highest level down (rule L2). Reversing
whole clusters rather than code points keeps each tone mark (U+07EB..U+07F3) and the
nasalisation mark attached to its own base letter.

Text that wraps is broken into lines in logical order first and each line is reordered on
its own (``visual_lines``): reordering a whole paragraph and letting the terminal wrap it
would put the end of a right-to-left sentence on its first screen line.

N'Ko is also a joining script; terminals do not shape it, so letters show in their
isolated forms. Only the order is fixed here.
"""

from __future__ import annotations

import unicodedata
from typing import Sequence, TypeVar

from rich.cells import cell_len

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


def _class(cluster: str) -> str:
    """The bidi class of a cluster's base character; every neutral class reads 'N'."""
    cls = unicodedata.bidirectional(cluster[0])
    return cls if cls in ("L", "R", "AL", "EN", "AN", "ES", "ET", "CS") else "N"


def has_rtl(text: str) -> bool:
    """True when ``text`` holds a right-to-left letter (N'Ko, Arabic, Hebrew...)."""
    return any(unicodedata.bidirectional(ch) in ("R", "AL") for ch in text)


def paragraph_is_rtl(text: str) -> bool:
    """True when the first strong letter is right-to-left (UBA rules P2/P3)."""
    for ch in text:
        cls = unicodedata.bidirectional(ch)
        if cls in ("R", "AL", "L"):
            return cls != "L"
    return False


def levels(units: Sequence[str], rtl: bool) -> list[int]:
    """Embedding level of each cluster in a paragraph of the given direction.

    Weak types first: a number after an Arabic letter is an Arabic number (W2); a single
    ``+``/``-`` between European digits, or ``.``/``,``/``:`` between digits of one kind,
    joins them (W4: "12.5"); ``%``, ``$``, ``°``... next to European digits count as digits
    (W5: "50%", "$5"); other separators are neutral (W6); European digits after a Latin
    letter are Latin (W7: "abc 12"). Then a run of neutrals between two same-direction
    neighbours takes that direction, numbers counting as R (N1), else the paragraph's (N2).
    Levels (I1/I2): R letters odd, Latin the paragraph's even level, numbers 2 so their
    digits keep left-to-right order in either paragraph.
    """
    t = [_class(u) for u in units]
    n = len(t)
    sos = "R" if rtl else "L"
    last = sos  # W2, W3
    for i, c in enumerate(t):
        if c in ("L", "R", "AL"):
            last = c
        elif c == "EN" and last == "AL":
            t[i] = "AN"
    t = ["R" if c == "AL" else c for c in t]
    for i in range(1, n - 1):  # W4
        if t[i] == "ES" and t[i - 1] == t[i + 1] == "EN":
            t[i] = "EN"
        elif t[i] == "CS" and t[i - 1] == t[i + 1] and t[i - 1] in ("EN", "AN"):
            t[i] = t[i - 1]
    i = 0
    while i < n:  # W5: a run of terminators touching a European number joins it
        if t[i] != "ET":
            i += 1
            continue
        j = i
        while j < n and t[j] == "ET":
            j += 1
        if (i > 0 and t[i - 1] == "EN") or (j < n and t[j] == "EN"):
            t[i:j] = ["EN"] * (j - i)
        i = j
    t = ["N" if c in ("ES", "ET", "CS") else c for c in t]  # W6
    last = sos  # W7
    for i, c in enumerate(t):
        if c in ("L", "R"):
            last = c
        elif c == "EN" and last == "L":
            t[i] = "L"
    i = 0
    while i < n:  # N1, N2
        if t[i] != "N":
            i += 1
            continue
        j = i
        while j < n and t[j] == "N":
            j += 1
        before = sos if i == 0 else ("L" if t[i - 1] == "L" else "R")
        after = sos if j == n else ("L" if t[j] == "L" else "R")
        t[i:j] = [before if before == after else sos] * (j - i)
        i = j
    if rtl:
        return [1 if c == "R" else 2 for c in t]
    return [{"L": 0, "R": 1}.get(c, 2) for c in t]


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


def breaks(units_: Sequence[str], width: int) -> list[tuple[int, int]]:
    """Greedy word wrap in logical order: [start, end) of each line of at most ``width``
    cells, broken after a space (a word longer than a line is cut); the spaces at a break
    belong to no line."""
    widths = [cell_len(u) for u in units_]
    n, out, start = len(units_), [], 0
    while start < n:
        used, end, space = 0, start, None
        while end < n and used + widths[end] <= width:
            used += widths[end]
            if units_[end] == " ":
                space = end
            end += 1
        if end < n and units_[end] != " ":
            end = space if space is not None and space > start else max(end, start + 1)
        stop = end
        while stop > start and units_[stop - 1] == " ":
            stop -= 1
        out.append((start, stop))
        start = end
        while start < n and units_[start] == " ":
            start += 1
    return out


def visual_lines(text: str, width: int | None = None) -> list[list[tuple[str, int]]]:
    """``text`` (one paragraph) broken into lines of at most ``width`` cells (None: one
    line), each in visual order as (cluster, logical index into ``units(text)``) pairs.

    Levels are resolved on the whole paragraph, lines are broken in logical order and each
    is reordered on its own (UBA, "reordering resolved levels"), so the first line holds
    the beginning of the text. The logical index lets a caller style clusters (e.g. a diff)
    before reordering. Right-to-left clusters that are mirrored characters are swapped for
    their mirror.
    """
    units_ = units(text)
    lv = levels(units_, paragraph_is_rtl("".join(units_)))
    spans = [(0, len(units_))] if width is None else breaks(units_, max(1, width))
    out = []
    for start, stop in spans:
        order = reorder(list(range(start, stop)), lv[start:stop])
        out.append([(_MIRROR.get(units_[i], units_[i]) if lv[i] % 2 else units_[i], i) for i in order])
    return out


def visual_clusters(text: str) -> list[tuple[str, int]]:
    """(cluster, logical index into ``units(text)``) pairs in visual order, on one line."""
    return visual_lines(text)[0]


def visual(text: str) -> str:
    """Display string for a terminal: ``visual("ߌ ߦߋ")`` puts ߌ at the right end."""
    return "".join(c for c, _ in visual_clusters(text))
