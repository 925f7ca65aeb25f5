"""Instances: cloud instances and their cost as the Vast lane recorded them in state.db,
with the budget bar and spend over time, and the cloud actions: poll the account, kill idle,
destroy, orphan sweep (console/ops.py, i.e. the lane's Fleet, in thread workers).

Kill idle and destroy go through a confirm dialog that lists, per instance, every file on
its disk without a verified local copy; while there is one, the dialog refuses (it offers a
sync instead)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Callable

import sqlite_utils
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical, VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Button, Label, Static

from console import queries
from console.ops import Candidate, explain
from console.queries import Budget, InstanceRow
from console.widgets import Curve, EmptyState, Pane, Table, duration, nbytes, selected_key, styled, usd

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


def sandbox_cells(r: InstanceRow) -> tuple:
    """A sandbox's row (``nko-ops sandbox``): its label says so, whatever the instance is called."""
    row = list(cells(r))
    row[1] = Text.assemble(("SANDBOX ", "bold black on yellow"), str(row[1]))
    return tuple(row)


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


def candidate_text(c: Candidate) -> Text:
    """One instance in the confirm dialog: what it is, why, and what destroying it loses."""
    t = Text.assemble(("instance ", "dim"), (c.instance_id, "bold"), "  ", c.run_id or c.label or "(no run)", "  ",
                      c.gpu, "  ", "—" if c.dph is None else f"${c.dph:.3f}/h", "\n  ", (c.reason, "dim"), "\n")
    if not c.ours:
        return t.append_text(Text(f"  – left alone: {c.refusal}\n", style="yellow"))
    if c.error:
        t.append(f"  ✗ {c.error}\n", style="bold red")
        if c.at_risk:
            t.append(f"    state.db lists {len(c.at_risk)} file(s) on it without a verified local copy:\n", style="red")
    elif c.at_risk:
        t.append(f"  ✗ {len(c.at_risk)} of its {c.files} file(s) have no verified local copy and would be LOST:\n",
                 style="bold red")
    else:
        t.append(f"  ✓ all {c.files} file(s) on its disk are verified in the local store: nothing is lost\n",
                 style="green")
    for a in c.at_risk:
        t.append(f"      {a.name}  ({'size unknown' if a.size is None else nbytes(a.size)})\n", style="red")
    return t


class ConfirmDestroyScreen(ModalScreen[list[Candidate] | None]):
    """Lists what destroying ``candidates`` would lose; returns the ones to destroy, or None.

    Refuses (the destroy button stays disabled) while any instance holds a file without a
    verified local copy, or could not be checked; orphans are listed and left alone. ``s``
    syncs the instances at risk (in a worker), then ``recheck`` lists them again."""

    BINDINGS = [Binding("escape", "cancel", "Cancel"), Binding("s", "sync", "Sync now")]

    def __init__(self, title: str, candidates: list[Candidate], recheck: Callable[[], list[Candidate]]) -> None:
        super().__init__()
        self.title_text, self.candidates, self.recheck = title, candidates, recheck
        self.busy = False

    def compose(self) -> ComposeResult:
        with Vertical(id="destroy-dialog"):
            yield Label(Text(self.title_text, style="bold"))
            with VerticalScroll(id="destroy-list"):
                yield Static(id="destroy-body")
            yield Static(id="destroy-verdict")
            with Horizontal(id="destroy-buttons"):
                yield Button("Destroy", variant="error", id="destroy-ok")
                yield Button("Sync now", variant="primary", id="destroy-sync")
                yield Button("Cancel", id="destroy-cancel")

    def on_mount(self) -> None:
        self.update_list(self.candidates)

    @property
    def destroyable(self) -> list[Candidate]:
        return [c for c in self.candidates if c.ours and not c.refusal]

    @property
    def blocked(self) -> list[Candidate]:
        """Instances ours whose files are not all verified (or could not be checked)."""
        return [c for c in self.candidates if c.ours and c.refusal]

    def update_list(self, candidates: list[Candidate]) -> None:
        self.candidates = candidates
        body = Text()
        for c in candidates:
            body.append_text(candidate_text(c))
        if not candidates:
            body = Text("no instance qualifies any more", style="dim")
        self.query_one("#destroy-body", Static).update(body)
        ok, blocked = self.destroyable, self.blocked
        if blocked:
            verdict = Text(f"REFUSED: {len(blocked)} instance(s) hold files without a verified local copy (or could "
                           "not be checked). Sync first (s), then destroy.", style="bold red")
        elif ok:
            verdict = Text(f"Destroying {len(ok)} instance(s) removes them and their disks and stops their billing. "
                           "Each is synced and verified once more just before.", style="yellow")
        else:
            verdict = Text("nothing to destroy", style="dim")
        self.query_one("#destroy-verdict", Static).update(verdict)
        button = self.query_one("#destroy-ok", Button)
        button.label = f"Destroy {len(ok)} instance{'s' * (len(ok) != 1)}"
        button.disabled = bool(blocked) or not ok or self.busy
        self.query_one("#destroy-sync", Button).disabled = not blocked or self.busy

    @on(Button.Pressed, "#destroy-ok")
    def _confirm(self) -> None:
        if not self.blocked and self.destroyable and not self.busy:
            self.dismiss(self.destroyable)

    @on(Button.Pressed, "#destroy-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)

    @on(Button.Pressed, "#destroy-sync")
    def action_sync(self) -> None:
        ids = [c.instance_id for c in self.blocked]
        if not ids or self.busy:
            return
        self.busy = True
        self.update_list(self.candidates)
        self.query_one("#destroy-verdict", Static).update(Text(f"syncing {', '.join(ids)}…", style="bold cyan"))
        self._sync(ids)

    @work(thread=True, group="destroy-sync")
    def _sync(self, ids: list[str]) -> None:
        ops = self.app.ops  # type: ignore[attr-defined]
        message, severity = "", "information"
        try:
            reports = ops.sync_instances(ids)
            message = "; ".join(str(r) for r in reports) or "nothing to sync"
            severity = "information" if all(r.ok for r in reports) else "error"
        except Exception as e:  # noqa: BLE001 - shown; the list below says what is still at risk
            message, severity = explain(e)
        try:
            fresh = self.recheck()
        except Exception as e:  # noqa: BLE001
            message, severity = explain(e)
            fresh = self.candidates
        self.app.call_from_thread(self._synced, fresh, message, severity)

    def _synced(self, fresh: list[Candidate], message: str, severity: str) -> None:
        self.busy = False
        self.app.notify(message, severity=severity, timeout=8)  # type: ignore[arg-type]
        if self.is_attached:  # not cancelled meanwhile
            self.update_list(fresh)


class OrphansScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,enter", "app.pop_screen", "Close")]

    def __init__(self, orphans: list) -> None:
        super().__init__()
        self.orphans = orphans

    def compose(self) -> ComposeResult:
        body = Text.assemble((f"{len(self.orphans)} instance(s) on the account that state.db does not know. ", "bold"),
                             "nko-ops did not create them, so what their disks hold is unknown here and the console "
                             "never destroys them; look at them, then `nko-ops vast destroy ID --force`.\n\n")
        for o in self.orphans:
            since = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(o.start_date or 0))
            body.append_text(Text.assemble(("ORPHAN ", "bold yellow"), (o.id, "bold"), "  ",
                                           o.label or "(no label)", "  ", str(o.status), "  ",
                                           f"{o.num_gpus or 1}× {o.gpu_name}",
                                           f"  ${o.usd_per_h or 0:.3f}/h  since {since}\n"))
        with VerticalScroll(id="orphans-dialog"):
            yield Static(body, id="orphans-body")
            yield Button("Close", id="orphans-close")

    @on(Button.Pressed, "#orphans-close")
    def _close(self) -> None:
        self.app.pop_screen()


class InstancesPane(Pane):
    title = "Instances"
    help = ("Cloud instances recorded by the Vast lane: GPU, price, uptime, spend (latest cost "
            "sample), GPU utilisation and how long an instance has been idle (GPU utilisation under "
            "the [idle] threshold of configs/vast.toml and no trainer heartbeat, as kill-idle counts it). The bar compares the spend with "
            "the budget cap; the plot shows spend over time. Actions (the Vast provider from "
            "configs/vast.toml and VAST_API_KEY, as `nko-ops vast` uses): p polls the account, "
            "k kills idle instances and x destroys the selected one (both behind a dialog that "
            "lists every file that would be lost and refuses while one is unsynced), o lists "
            "orphans, l opens the instance's log.")
    BINDINGS = [
        Binding("p", "poll", "Poll Vast"),
        Binding("k", "kill_idle", "Kill idle"),
        Binding("x", "destroy", "Destroy"),
        Binding("o", "sweep", "Orphans"),
        Binding("l", "logs", "Logs"),
    ]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._data: InstancesData | None = None

    def cells(self, r: InstanceRow) -> tuple:
        return sandbox_cells(r) if getattr(self.app, "sandbox", False) else cells(r)

    def compose(self) -> ComposeResult:
        yield Static(id="instances-budget")
        yield EmptyState(EMPTY, id="instances-empty")
        yield Table(COLUMNS, self.cells, id="instances-table")
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

    # ---------------------------------------------------------------- cloud actions

    def current(self) -> InstanceRow | None:
        table = self.query_one("#instances-table", Table)
        key = selected_key(table)
        return table.items.get(key) if key else None

    def _fail(self, e: Exception) -> None:
        message, severity = explain(e)
        self.app.call_from_thread(self.app.notify, message, severity=severity, timeout=8)

    def action_poll(self) -> None:
        self.app.notify("polling the Vast account…", timeout=2)
        self._poll()

    @work(thread=True, group="ops")
    def _poll(self) -> None:
        try:
            summary = self.app.ops.poll()  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001 - shown, the console keeps running
            return self._fail(e)
        self.app.call_from_thread(self.app.notify, summary, timeout=6)
        self.app.call_from_thread(self.request_refresh)

    def action_kill_idle(self) -> None:
        self.app.notify("looking for idle instances and checking their files over SSH…", timeout=3)
        self._preview("Kill idle instances", lambda ops: ops.preview_kill_idle())

    def action_destroy(self) -> None:
        row = self.current()
        if row is None:
            return
        if row.status == "destroyed":
            self.app.notify(f"instance {row.id} is already destroyed", timeout=3)
            return
        self.app.notify(f"checking the files on instance {row.id} over SSH…", timeout=3)
        iid = row.id
        self._preview(f"Destroy instance {iid}", lambda ops: [ops.preview_destroy(iid)])

    @work(thread=True, group="ops")
    def _preview(self, title: str, check: Callable) -> None:
        ops = self.app.ops  # type: ignore[attr-defined]
        try:
            candidates = check(ops)
        except Exception as e:  # noqa: BLE001
            return self._fail(e)
        if not candidates:
            self.app.call_from_thread(self.app.notify, "no idle instances: nothing to destroy", timeout=5)
            return
        self.app.call_from_thread(self._confirm, title, candidates, lambda: check(ops))

    def _confirm(self, title: str, candidates: list[Candidate], recheck: Callable[[], list[Candidate]]) -> None:
        def done(chosen: list[Candidate] | None) -> None:
            if chosen:
                self._destroy(chosen)

        self.app.push_screen(ConfirmDestroyScreen(title, candidates, recheck), done)

    @work(thread=True, group="ops")
    def _destroy(self, chosen: list[Candidate]) -> None:
        try:
            outcomes = self.app.ops.destroy(chosen)  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001
            return self._fail(e)
        for o in outcomes:
            self.app.call_from_thread(self.app.notify, str(o), severity="information" if o.destroyed else "error",
                                      timeout=10)
        self.app.call_from_thread(self.request_refresh)

    def action_sweep(self) -> None:
        self.app.notify("listing the account's instances…", timeout=2)
        self._sweep()

    @work(thread=True, group="ops")
    def _sweep(self) -> None:
        try:
            orphans = self.app.ops.sweep()  # type: ignore[attr-defined]
        except Exception as e:  # noqa: BLE001
            return self._fail(e)
        if orphans:
            self.app.call_from_thread(self.app.push_screen, OrphansScreen(orphans))
        else:
            self.app.call_from_thread(self.app.notify, "no orphans: every instance on the account belongs to a "
                                                       "known run", timeout=5)

    def action_logs(self) -> None:
        row = self.current()
        if row is not None:
            self.app.open_logs("instance", row.id)  # type: ignore[attr-defined]
