"""Small pieces the panes share: the pane base class, table syncing, plots, formatting."""

from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence

import sqlite_utils
from rich.cells import cell_len
from rich.console import Console, ConsoleOptions, RenderResult
from rich.measure import Measurement
from rich.text import Text
from textual.containers import Vertical
from textual.widgets import DataTable, Static
from textual_plotext import PlotextPlot

from console import bidi


class Pane(Vertical):
    """One tab of the console.

    ``load`` runs in a worker thread with the database (reads only, no widgets);
    ``show`` gets its result on the UI thread and updates the widgets.
    """

    title = ""
    help = ""  # one paragraph for the help screen

    def load(self, db: sqlite_utils.Database, now: float) -> Any:
        raise NotImplementedError

    def show(self, data: Any) -> None:
        raise NotImplementedError

    def request_refresh(self) -> None:
        """Ask the app to reload this pane now (e.g. after a filter change)."""
        self.app.refresh_panes([self])  # type: ignore[attr-defined]


class Table(DataTable):
    """A row-cursor table fed with (key, item) pairs; ``render(item)`` gives a row's cells.

    ``show`` redraws as little as possible: items equal to the ones on screen are skipped,
    changed ones get their changed cells updated, and only a different set or order of keys
    rebuilds the table (keeping the cursor on the row it was on, by key).
    """

    def __init__(self, columns: Sequence[str], render: Callable[[Any], Sequence[Any]], **kwargs: Any) -> None:
        super().__init__(cursor_type="row", zebra_stripes=True, **kwargs)
        self.render_row = render
        self.items: dict[str, Any] = {}
        for c in columns:
            self.add_column(c, key=c)

    def show(self, items: Sequence[tuple[Hashable, Any]]) -> None:
        new = {str(k): item for k, item in items}
        if list(new) == list(self.items):
            columns = list(self.columns)
            for key, item in new.items():
                if item != self.items[key]:
                    old = self.render_row(self.items[key])
                    for col, cell, before in zip(columns, self.render_row(item), old):
                        if cell != before:
                            self.update_cell(key, col, cell)
            self.items = new
            return
        selected = selected_key(self)
        self.clear()
        for key, item in new.items():
            self.add_row(*self.render_row(item), key=key)
        self.items = new
        if selected in new:
            self.move_cursor(row=list(new).index(selected), animate=False)


def selected_key(table: DataTable) -> str | None:
    if table.row_count == 0 or table.cursor_row < 0:
        return None
    return table.coordinate_to_cell_key((table.cursor_row, 0)).row_key.value


class Curve(PlotextPlot):
    """A line plot of a few named series; redraws only when the data changes."""

    def __init__(self, title: str, xlabel: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._title, self._xlabel = title, xlabel
        self._series: tuple = ()

    def show(self, series: Sequence[tuple[str, Sequence[tuple[float, float]]]], title: str | None = None) -> None:
        series = tuple((name, tuple(points)) for name, points in series)
        if series == self._series and (title is None or title == self._title):
            return
        self._series = series
        self._title = title or self._title
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(self._title)
        plt.xlabel(self._xlabel)
        for name, points in series:
            if points:
                plt.plot([p[0] for p in points], [p[1] for p in points], label=name, marker="braille")
        self.refresh()


class Bars(PlotextPlot):
    """A horizontal bar chart of named values; redraws only when the data changes."""

    def __init__(self, title: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._title = title
        self._items: tuple[tuple[str, float], ...] = ()

    def show(self, items: Sequence[tuple[str, float]]) -> None:
        items = tuple(items)
        if items == self._items:
            return
        self._items = items
        plt = self.plt
        plt.clear_data()
        plt.clear_figure()
        plt.title(self._title)
        if items:
            plt.bar([name for name, _ in items], [value for _, value in items], orientation="horizontal", width=0.4)
        self.refresh()


def num(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def pct(value: float | None) -> str:
    return "—" if value is None else f"{100 * value:.2f}%"


def usd(value: float | None) -> str:
    return "—" if value is None else f"${value:,.2f}"


def nbytes(n: int | None) -> str:
    if n is None:
        return "—"
    if n < 1024:
        return f"{n} B"
    for unit in ("KB", "MB", "GB"):
        n /= 1024
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}"
    return ""


def duration(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    s = int(seconds)
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{(s % 3600) // 60:02d}m"
    return f"{s // 86400}d{(s % 86400) // 3600:02d}h"


STATUS_STYLES = {"running": "bold green", "completed": "green", "failed": "bold red", "hung": "bold red",
                 "interrupted": "yellow", "queued": "cyan", "planned": "dim", "cancelled": "dim",
                 "destroyed": "dim", "missing": "bold red", "remote-only": "yellow",
                 "transferring": "cyan", "verified": "green", "mirrored": "green"}


def styled(value: str) -> Text:
    return Text(value, style=STATUS_STYLES.get(value, ""))


class EmptyState(Static):
    """The message a pane shows instead of its table when the store has nothing for it."""

    DEFAULT_CSS = "EmptyState { padding: 1 2; color: $text-muted; height: auto; }"


class BidiText:
    """A Rich renderable for one paragraph that may hold right-to-left script.

    Rich would wrap a string already put in visual order, so a long N'Ko sentence would
    start on its last screen line. This wraps the logical text at the width it is given
    and then reorders each line (``bidi.visual_lines``); a wrapped right-to-left paragraph
    is right-aligned. ``text`` is in logical order with its plain string normalised (build
    it with ``bidi.normalize``), styled per character: the styles follow their letters.
    ``prefix`` leads the first line (later lines are indented by its width), ``suffix``
    ends the last one (or gets a line of its own when it does not fit)."""

    def __init__(self, text: Text, prefix: Text | str = "", suffix: Text | str = "") -> None:
        self.text = text
        self.prefix = Text(prefix) if isinstance(prefix, str) else prefix
        self.suffix = Text(suffix) if isinstance(suffix, str) else suffix

    def __rich_measure__(self, console: Console, options: ConsoleOptions) -> Measurement:
        lead = self.prefix.cell_len
        longest = max((cell_len(w) for w in self.text.plain.split(" ")), default=0)
        return Measurement(lead + max(longest, 1), lead + self.text.cell_len + self.suffix.cell_len)

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        lead = self.prefix.cell_len
        width = max(1, options.max_width - lead)
        plain = self.text.plain
        starts, at = [], 0
        for cluster in bidi.clusters(plain):
            starts.append(at)
            at += len(cluster)
        lines = bidi.visual_lines(plain, width) or [[]]
        widths = [sum(cell_len(c) for c, _ in line) for line in lines]
        pad = max(widths) if len(lines) > 1 and bidi.paragraph_is_rtl(plain) else 0
        for n, (line, w) in enumerate(zip(lines, widths)):
            out = Text()
            out.append_text(self.prefix if n == 0 else Text(" " * lead))  # its style on it alone
            out.append(" " * (pad - w) if pad else "")
            for cluster, i in line:
                out.append(cluster, style=self.text.get_style_at_offset(console, starts[i]))
            if n == len(lines) - 1 and self.suffix:
                if out.cell_len + self.suffix.cell_len <= options.max_width:
                    out.append_text(self.suffix)
                else:
                    yield out
                    out = Text(" " * lead).append_text(self.suffix)
            yield out


def bidi_lines(text: str, style: str = "", highlight: str = "", prefix: Text | str = "") -> list[BidiText]:
    """One BidiText per line of ``text``; ``highlight``: a word to show reversed (any case);
    ``prefix`` leads the first line and indents the others."""
    lead = prefix.cell_len if isinstance(prefix, Text) else cell_len(prefix)
    out = []
    for n, line in enumerate(text.split("\n")):
        t = Text(bidi.normalize(line), style=style)
        if highlight:
            t.highlight_words([highlight], style="reverse", case_sensitive=False)
        out.append(BidiText(t, prefix if n == 0 else " " * lead))
    return out
