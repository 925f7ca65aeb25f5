"""Adapters: Thunder Train LoRA adapter runs as recorded in state.db, with the loss curve of
the selected run. Read-only here."""

from __future__ import annotations

from dataclasses import dataclass

import sqlite_utils
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.widgets import DataTable, Static

from console import queries
from console.queries import AdapterRow
from console.widgets import Curve, EmptyState, Pane, Table, duration, num, selected_key, styled

COLUMNS = ("id", "name", "status", "hosts", "ranks", "iteration", "train loss", "val loss", "tokens/s", "last report")
EMPTY = ("No adapter runs recorded in this state.db. Thunder Train (MLX LoRA across two Macs) "
         "writes its runs and metrics here.")


@dataclass(frozen=True)
class AdaptersData:
    rows: tuple[AdapterRow, ...]
    selected: str | None
    curves: tuple


def cells(r: AdapterRow) -> tuple:
    tps = "—" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}"
    age = Text(duration(r.heartbeat_age_s) + " ago" if r.heartbeat_age_s is not None else "—",
               style="bold red" if r.status == "hung" else "")
    return (r.id, r.name or "—", styled(r.status), r.hosts or "—", "—" if r.world_size is None else str(r.world_size),
            "—" if r.iteration is None else str(r.iteration), num(r.train_loss), num(r.val_loss), tps, age)


def load_curves(db: sqlite_utils.Database, adapter_run_id: str) -> tuple:
    return (("train", queries.adapter_curve(db, adapter_run_id, queries.TRAIN_LOSS)),
            ("val", queries.adapter_curve(db, adapter_run_id, queries.VAL_LOSS)))


class AdaptersPane(Pane):
    title = "Adapters"
    help = ("Thunder Train adapter runs: hosts, ranks, iteration, latest losses and tokens/s "
            "(rank 0), time since the last report; hung and failed runs in red. The plot is the "
            "selected run's loss by iteration. Read-only.")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._rows: tuple | None = None
        self.selected: str | None = None

    def compose(self) -> ComposeResult:
        yield EmptyState(EMPTY, id="adapters-empty")
        yield Table(COLUMNS, cells, id="adapters-table")
        yield Static(id="adapters-error")
        yield Curve("adapter loss", "iteration", id="adapters-curve")

    def load(self, db: sqlite_utils.Database, now: float) -> AdaptersData:
        rows = tuple(queries.adapters(db, now))
        selected = self.selected if any(r.id == self.selected for r in rows) else (rows[0].id if rows else None)
        return AdaptersData(rows, selected, load_curves(db, selected) if selected else ())

    def show(self, data: AdaptersData) -> None:
        self.query_one("#adapters-empty").display = not data.rows
        for w in ("#adapters-table", "#adapters-curve", "#adapters-error"):
            self.query_one(w).display = bool(data.rows)
        if data.rows != self._rows:
            self._rows = data.rows
            self.query_one("#adapters-table", Table).show([(r.id, r) for r in data.rows])
        if data.selected == (self.selected or data.selected):
            self._show_selected(data.selected, data.curves)

    def _show_selected(self, adapter_id: str | None, curves: tuple) -> None:
        row = next((r for r in self._rows or () if r.id == adapter_id), None)
        error = self.query_one("#adapters-error", Static)
        error.update(Text.assemble(("error ", "bold red"), row.error) if row and row.error else "")
        self.query_one("#adapters-curve", Curve).show(curves)

    @on(DataTable.RowHighlighted, "#adapters-table")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value if event.row_key else None
        if key and key != self.selected:
            self.selected = key
            self._load_selected(key)

    @work(thread=True, exclusive=True, group="adapter-detail")
    def _load_selected(self, adapter_id: str) -> None:
        curves = self.app.read(lambda db, now: load_curves(db, adapter_id))  # type: ignore[attr-defined]
        if curves is not None and self.selected == adapter_id:
            self.app.call_from_thread(self._show_selected, adapter_id, curves)

    def current(self) -> str | None:
        return selected_key(self.query_one("#adapters-table", DataTable))
