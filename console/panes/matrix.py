"""Matrix: every run in the store, and the selected run's learning curve and reproduction command."""

from __future__ import annotations

from dataclasses import dataclass

import sqlite_utils
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.widgets import DataTable, Static

from console import queries
from console.queries import RunDetail, RunRow
from models.bundle import BUNDLE_FILES
from console.widgets import Bars, Curve, EmptyState, Pane, Table, num, pct, selected_key, styled

COLUMNS = ("run", "script", "mode", "seed", "status", "epoch", "val loss", "best (ep)", "test CER",
           "artifacts", "sync")
EMPTY = ("No runs in this state.db yet. `nko-ops demo` or `nko-ops matrix run FILE` "
         "records them here.")


@dataclass(frozen=True)
class MatrixData:
    runs: tuple[RunRow, ...]
    detail: RunDetail | None


def cells(r: RunRow) -> tuple:
    n = len(BUNDLE_FILES)
    art = Text(f"{r.artifacts}/{n}", style="green" if r.artifacts == n else ("yellow" if r.artifacts else "dim"))
    best = "—" if r.best_val_loss is None else f"{r.best_val_loss:.4f} ({r.best_epoch})"
    return (r.id, r.script, r.mode, "—" if r.seed is None else str(r.seed), styled(r.status),
            "—" if r.epoch is None else str(r.epoch), num(r.val_loss), best, pct(r.test_cer), art,
            styled(r.sync))


class MatrixPane(Pane):
    title = "Matrix"
    help = ("Runs of every matrix in the store: script, mode, seed, status, progress, losses, "
            "test CER, how many of the nine bundle files exist and their sync state. The panel "
            "below follows the cursor: learning curve (train and validation CTC loss per epoch), "
            "the test CER of every finished run of the same matrix, and the command that "
            "reproduces the run. l opens the run's live log.")
    BINDINGS = [Binding("l", "logs", "Logs")]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._runs: tuple[RunRow, ...] | None = None
        self.selected: str | None = None

    def compose(self) -> ComposeResult:
        yield EmptyState(EMPTY, id="matrix-empty")
        yield Table(COLUMNS, cells, id="matrix-table")
        with Horizontal(id="matrix-detail"):
            yield Curve("learning curve", "epoch", id="matrix-curve")
            yield Bars("test CER (%) in this matrix", id="matrix-cer")
            with Vertical(id="matrix-info"):
                yield Static(id="matrix-summary")
                yield Static(id="matrix-command")

    def load(self, db: sqlite_utils.Database, now: float) -> MatrixData:
        runs = tuple(queries.matrix(db))
        selected = self.selected or (runs[0].id if runs else None)
        return MatrixData(runs, queries.run_detail(db, selected) if selected else None)

    def show(self, data: MatrixData) -> None:
        empty = not data.runs
        self.query_one("#matrix-empty").display = empty
        self.query_one("#matrix-table").display = not empty
        self.query_one("#matrix-detail").display = not empty
        if data.runs != self._runs:
            self._runs = data.runs
            self.query_one("#matrix-table", Table).show([(r.id, r) for r in data.runs])
        self.show_detail(data.detail)
        self.show_cer()

    def show_cer(self) -> None:
        """Test CER of the finished runs in the selected run's matrix (same snapshot and split)."""
        runs = self._runs or ()
        chosen = next((r for r in runs if r.id == self.selected), runs[0] if runs else None)
        if chosen is None:
            return
        self.query_one("#matrix-cer", Bars).show(
            [(f"{r.script} {r.mode}" + ("" if r.seed is None else f" s{r.seed}"), round(100 * r.test_cer, 2))
             for r in runs if r.matrix_id == chosen.matrix_id and r.test_cer is not None])

    def show_detail(self, d: RunDetail | None) -> None:
        # a detail loaded for a row the cursor has since left (the next load brings the right one)
        if d is None or (self.selected is not None and d.id != self.selected):
            return
        self.query_one("#matrix-curve", Curve).show([("train", d.train_curve), ("val", d.val_curve)])
        lines = Text.assemble(("run ", "dim"), (d.id, "bold"), "  ", styled(d.status), "\n",
                              ("best val loss ", "dim"), num(d.best_val_loss),
                              ("" if d.best_epoch is None else f" @ epoch {d.best_epoch}"), "\n",
                              ("test CER ", "dim"), pct(d.test_cer), ("  toneless ", "dim"), pct(d.test_cer_toneless))
        if d.out_dir:
            lines.append_text(Text.assemble("\n", ("dir ", "dim"), d.out_dir))
        if d.error:
            lines.append_text(Text.assemble("\n", ("error ", "bold red"), d.error))
        self.query_one("#matrix-summary", Static).update(lines)
        self.query_one("#matrix-command", Static).update(Text.assemble(("reproduce\n", "dim"), (d.command, "bold")))

    @on(DataTable.RowHighlighted, "#matrix-table")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value if event.row_key else None
        if key and key != self.selected:
            self.selected = key
            self.show_cer()
            self._load_detail(key)

    @work(thread=True, exclusive=True, group="matrix-detail")
    def _load_detail(self, run_id: str) -> None:
        detail = self.app.read(lambda db, now: queries.run_detail(db, run_id))  # type: ignore[attr-defined]
        if detail is not None and self.selected == run_id:
            self.app.call_from_thread(self.show_detail, detail)

    def current(self) -> str | None:
        return selected_key(self.query_one("#matrix-table", DataTable))

    def action_logs(self) -> None:
        run_id = self.current()
        if run_id is not None:
            self.app.open_logs("run", run_id)  # type: ignore[attr-defined]
