"""Sync: each run's artifacts and where their verified copies are (remote-only →
transferring → verified → mirrored, with sha256), and a retry that pulls the run's
directory from its instance through the Vast lane's sync (in a worker)."""

from __future__ import annotations

from dataclasses import dataclass

import sqlite_utils
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.widgets import DataTable, Static

from console import queries
from console.ops import explain
from console.queries import ArtifactRow, LogEvent, SyncRunRow
from console.widgets import EmptyState, Pane, Table, nbytes, selected_key, styled

RUN_COLUMNS = ("run", "status", "instance", "files", "size", "sync")
ARTIFACT_COLUMNS = ("file", "state", "size", "sha256", "copies", "verified at")
EMPTY = ("No artifacts recorded in this state.db yet. Runs register their bundle files here; "
         "the Vast lane tracks each file's copies (instance, local store, mirror).")


@dataclass(frozen=True)
class SyncData:
    runs: tuple[SyncRunRow, ...]
    selected: str | None
    artifacts: tuple[ArtifactRow, ...]
    last_sync: LogEvent | None


def run_cells(r: SyncRunRow) -> tuple:
    return (r.run_id, styled(r.status), r.instance_id or "—", str(r.files), nbytes(r.bytes), styled(r.sync))


def artifact_cells(a: ArtifactRow) -> tuple:
    return (a.name, styled(a.state), nbytes(a.size), a.sha256[:16] or "—", ", ".join(a.locations) or "—",
            a.verified_at or "—")


def load_run(db: sqlite_utils.Database, run_id: str) -> tuple[tuple[ArtifactRow, ...], LogEvent | None]:
    return tuple(queries.run_artifacts(db, run_id)), queries.last_sync(db, run_id)


class SyncPane(Pane):
    title = "Sync"
    help = ("Runs with artifacts, those needing attention first, and the selected run's files: "
            "state (remote-only, transferring, verified, mirrored; missing = given up by a forced "
            "destroy), size, sha256, where copies are. s pulls the run's directory from its "
            "instance again (each file verified by sha256 before it enters the local store); "
            "the result and any failure show here and in the status bar.")
    BINDINGS = [Binding("s", "retry", "Sync run")]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._runs: tuple[SyncRunRow, ...] | None = None
        self._artifacts: tuple[ArtifactRow, ...] | None = None
        self.selected: str | None = None
        self.syncing: set[str] = set()

    def compose(self) -> ComposeResult:
        yield EmptyState(EMPTY, id="sync-empty")
        yield Table(RUN_COLUMNS, run_cells, id="sync-runs")
        yield Static(id="sync-header")
        yield Table(ARTIFACT_COLUMNS, artifact_cells, id="sync-artifacts")
        yield Static(id="sync-detail")

    def load(self, db: sqlite_utils.Database, now: float) -> SyncData:
        runs = tuple(queries.sync_runs(db))
        selected = self.selected if any(r.run_id == self.selected for r in runs) else (runs[0].run_id if runs else None)
        artifacts, last = load_run(db, selected) if selected else ((), None)
        return SyncData(runs, selected, artifacts, last)

    def show(self, data: SyncData) -> None:
        empty = not data.runs
        self.query_one("#sync-empty").display = empty
        for w in ("#sync-runs", "#sync-header", "#sync-artifacts", "#sync-detail"):
            self.query_one(w).display = not empty
        if data.runs != self._runs:
            self._runs = data.runs
            self.query_one("#sync-runs", Table).show([(r.run_id, r) for r in data.runs])
        if self.selected is None or data.selected == self.selected:
            self.selected = data.selected
            self._show_run(data.selected, data.artifacts, data.last_sync)

    def _show_run(self, run_id: str | None, artifacts: tuple[ArtifactRow, ...], last: LogEvent | None) -> None:
        if run_id != self.selected:
            return
        if artifacts != self._artifacts:
            self._artifacts = artifacts
            self.query_one("#sync-artifacts", Table).show([(a.name, a) for a in artifacts])
        run = next((r for r in self._runs or () if r.run_id == run_id), None)
        head = Text.assemble(("run ", "dim"), (run_id or "—", "bold"))
        if run is not None and run.instance_id:
            head.append_text(Text.assemble(("  instance ", "dim"), run.instance_id))
        if run_id in self.syncing:
            head.append("  syncing…", style="bold cyan")
        if last is not None:
            head.append_text(Text.assemble("\n", ("last sync ", "dim"), last.ts[:19].replace("T", " "), " ",
                                           (last.message, "bold red" if last.level == "error" else "")))
        else:
            head.append("\nno sync recorded for this run", style="dim")
        self.query_one("#sync-header", Static).update(head)
        self._show_artifact()

    def _show_artifact(self) -> None:
        table = self.query_one("#sync-artifacts", Table)
        key = selected_key(table)
        a = table.items.get(key) if key else None
        detail = self.query_one("#sync-detail", Static)
        if a is None:
            detail.update("")
            return
        detail.update(Text.assemble((a.name, "bold"), "  ", styled(a.state), ("  sha256 ", "dim"), a.sha256 or "—",
                                    ("\ncopies ", "dim"), ", ".join(a.locations) or "none recorded"))

    @on(DataTable.RowHighlighted, "#sync-runs")
    def _run_highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value if event.row_key else None
        if key and key != self.selected:
            self.selected = key
            self._load_run(key)

    @on(DataTable.RowHighlighted, "#sync-artifacts")
    def _artifact_highlighted(self) -> None:
        self._show_artifact()

    @work(thread=True, exclusive=True, group="sync-detail")
    def _load_run(self, run_id: str) -> None:
        got = self.app.read(lambda db, now: load_run(db, run_id))  # type: ignore[attr-defined]
        if got is not None:
            self.app.call_from_thread(self._show_run, run_id, *got)

    # ---------------------------------------------------------------- retry

    def action_retry(self) -> None:
        run_id = self.selected
        if run_id is None:
            self.app.notify("no run selected (none with artifacts yet)", timeout=3)
            return
        if run_id in self.syncing:
            self.app.notify(f"{run_id}: a sync is already running", timeout=3)
            return
        self.syncing.add(run_id)
        self.app.notify(f"{run_id}: syncing from its instance…", timeout=3)
        self.request_refresh()
        self._retry(run_id)

    @work(thread=True, group="sync-retry")
    def _retry(self, run_id: str) -> None:
        try:
            reports = self.app.ops.sync_run(run_id)  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001 - shown, the console keeps running
            self.app.call_from_thread(self._synced, run_id, *explain(e))
            return
        ok = all(r.ok for r in reports)
        message = "; ".join(str(r) for r in reports) or f"{run_id}: nothing on the instance for this run"
        self.app.call_from_thread(self._synced, run_id, message, "information" if ok else "error")

    def _synced(self, run_id: str, message: str, severity: str) -> None:
        self.syncing.discard(run_id)
        self.app.notify(message, severity=severity, timeout=8)  # type: ignore[arg-type]
        self.app.refresh_panes([self])  # type: ignore[attr-defined]
