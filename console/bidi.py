"""Visual ordering of right-to-left text for a terminal: the project's glue around python-bidi.

Terminals draw cells left to right in the order they receive them and do no bidi
processing, so an N'Ko string (stored in logical order, first letter first) would show
mirrored. Before display we put it in *visual* order ourselves. The Unicode Bidirectional
Algorithm is python-bidi's (``bidi.algorithm``: paragraph level P2/P3, weak types W1-W7,
neutrals N1/N2, implicit levels I1/I2, run reversal L2, mirrored glyphs from its table for
L4). What stays here is what a terminal needs on top of it:

* Reordering is done on grapheme clusters (a base character plus the combining marks that
  follow it, each cluster at its base's level), so every tone mark (U+07EB..U+07F3) and the
  nasalisation mark stays after its own base letter (UBA L3 leaves that to the renderer).
* Text that wraps is broken into lines in logical order first and each line is reordered on
  its own (``visual_lines``), with the levels of the whole paragraph: reordering a whole
  paragraph and letting the terminal wrap it would put the end of a right-to-left sentence
  on its first screen line.

N'Ko is also a joining script; terminals do not shape it, so letters show in their
isolated forms. Only the order is fixed here.
"""

from __future__ import annotations

import unicodedata
from typing import Sequence

from bidi import algorithm as uba
from bidi.mirror import MIRRORED
from rich.cells import cell_len

from models.text import normalize

__all__ = ["normalize", "clusters", "has_rtl", "paragraph_is_rtl", "units", "breaks", "visual_lines",
           "visual_clusters", "visual"]


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


def has_rtl(text: str) -> bool:
    """True when ``text`` holds a right-to-left letter (N'Ko, Arabic, Hebrew...)."""
    return any(unicodedata.bidirectional(ch) in ("R", "AL") for ch in text)


def paragraph_is_rtl(text: str) -> bool:
    """True when the first strong letter is right-to-left (UBA rules P2/P3)."""
    return uba.get_base_level(text) == 1


def _levels(text: str) -> list[int]:
    """The resolved embedding level of every code point of one paragraph (UBA up to I2)."""
    storage = uba.get_empty_storage()
    base = uba.get_base_level(text)
    storage["base_level"], storage["base_dir"] = base, "LR"[base]
    uba.get_embedding_levels(text, storage)
    uba.explicit_embed_and_overrides(storage)
    uba.resolve_weak_types(storage)
    uba.resolve_neutral_types(storage, False)
    uba.resolve_implicit_levels(storage, False)
    return [ch["level"] for ch in storage["chars"]]


def _reorder(indices: Sequence[int], lv: Sequence[int]) -> list[int]:
    """UBA L2 on one line: ``indices`` (logical, with levels ``lv``) in visual order."""
    if not indices:
        return []
    items = [{"ch": i, "level": lv[i]} for i in indices]
    top = max(it["level"] for it in items)
    lowest_odd = min((it["level"] for it in items if it["level"] % 2), default=top + 1)
    uba.reverse_contiguous_sequence(items, 0, len(items) - 1, top, lowest_odd)
    return [it["ch"] for it in items]


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
    before reordering. Clusters at a right-to-left level that are mirrored characters are
    swapped for their mirror (L4).
    """
    units_ = units(text)
    point_levels = _levels("".join(units_))
    lv, at = [], 0
    for u in units_:  # a cluster is at its base's level (W1 gives its marks the same one)
        lv.append(point_levels[at])
        at += len(u)
    spans = [(0, len(units_))] if width is None else breaks(units_, max(1, width))
    return [[(MIRRORED.get(units_[i], units_[i]) if lv[i] % 2 else units_[i], i)
             for i in _reorder(range(start, stop), lv)] for start, stop in spans]


def visual_clusters(text: str) -> list[tuple[str, int]]:
    """(cluster, logical index into ``units(text)``) pairs in visual order, on one line."""
    return visual_lines(text)[0]


def visual(text: str) -> str:
    """Display string for a terminal: ``visual("ߌ ߦߋ")`` puts ߌ at the right end."""
    return "".join(c for c, _ in visual_clusters(text))
