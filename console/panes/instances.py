"""Instances: cloud instances and their cost as the Vast lane recorded them in state.db,
with the budget bar and spend over time. Read-only here."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timezone

import sqlite_utils
from rich.text import Text
from textual.app import ComposeResult
from textual.widgets import Static

from console import queries
from console.queries import Budget, InstanceRow
from console.widgets import Curve, EmptyState, Pane, Table, duration, styled, usd

COLUMNS = ("id", "label / run", "GPU", "$/h", "status", "uptime", "spend", "GPU util", "idle")
EMPTY = ("No cloud instances recorded in this state.db. The Vast lane writes instances, cost "
         "samples and the budget here; local runs use none.")


@dataclass(frozen=True)
class InstancesData:
    rows: tuple[InstanceRow, ...]
    budget: Budget | None
    spend: tuple[tuple[float, float], ...]


def cells(r: InstanceRow) -> tuple:
    idle = Text(duration(r.idle_s), style="bold yellow") if r.idle_s is not None else Text("—", style="dim")
    util = "—" if r.gpu_util is None else f"{r.gpu_util:.0f}%"
    return (r.id, r.label or r.run_id or "—", r.gpu, "—" if r.dph is None else f"{r.dph:.3f}",
            styled(r.status), duration(r.uptime_s), usd(r.spend_usd), util, idle)


def budget_bar(b: Budget | None, width: int = 40) -> Text:
    if b is None:
        return Text("budget: none recorded (configs/budget.toml is read by the Vast lane)", style="dim")
    if not b.cap_usd:
        return Text.assemble(("budget ", "dim"), (b.name or "—", "bold"), "  spent ", usd(b.spent_usd), ("  no cap set", "dim"))
    frac = min(1.0, b.spent_usd / b.cap_usd)
    over = b.spent_usd >= b.cap_usd
    warn = b.warn_usd is not None and b.spent_usd >= b.warn_usd
    style = "bold red" if over else ("yellow" if warn else "green")
    filled = round(frac * width)
    text = Text.assemble(("budget ", "dim"), (b.name, "bold"), " ", ("█" * filled, style), ("░" * (width - filled), "dim"),
                         f" {usd(b.spent_usd)} / {usd(b.cap_usd)} ({100 * b.spent_usd / b.cap_usd:.0f}%)")
    if b.warn_usd is not None:
        text.append(f"  warn at {usd(b.warn_usd)}", style="dim")
    if over:
        text.append("  OVER CAP", style="bold red")
    return text


class InstancesPane(Pane):
    title = "Instances"
    help = ("Cloud instances recorded by the Vast lane: GPU, price, uptime, spend (latest cost "
            "sample), GPU utilisation and how long an instance has been idle (utilisation under "
            f"{queries.IDLE_UTIL:.0f}% and no trainer heartbeat). The bar compares the spend with "
            "the budget cap; the plot shows spend over time. Read-only.")

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._data: InstancesData | None = None

    def compose(self) -> ComposeResult:
        yield Static(id="instances-budget")
        yield EmptyState(EMPTY, id="instances-empty")
        yield Table(COLUMNS, cells, id="instances-table")
        yield Curve("spend (USD)", "hours since first sample", id="instances-spend")

    def load(self, db: sqlite_utils.Database, now: float) -> InstancesData:
        return InstancesData(tuple(queries.instances(db, now)), queries.budget(db), queries.spend_curve(db))

    def show(self, data: InstancesData) -> None:
        if data == self._data:
            return
        self._data = data
        self.query_one("#instances-budget", Static).update(budget_bar(data.budget))
        self.query_one("#instances-empty").display = not data.rows
        self.query_one("#instances-table").display = bool(data.rows)
        self.query_one("#instances-table", Table).show([(r.id, r) for r in data.rows])
        plot = self.query_one("#instances-spend", Curve)
        plot.display = bool(data.spend)
        if data.spend:
            t0 = data.spend[0][0]
            since = datetime.fromtimestamp(t0, timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
            plot.show([("spend", [((t - t0) / 3600, v) for t, v in data.spend])], title=f"spend (USD) since {since}")
