"""Small pieces the panes share: the pane base class, table syncing, plots, formatting."""

from __future__ import annotations

from typing import Any, Callable, Hashable, Sequence

import sqlite_utils
from rich.text import Text
from textual.containers import Vertical
from textual.widgets import DataTable, Static
from textual_plotext import PlotextPlot


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
