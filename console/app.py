"""``nko-ops console``: the operations console (Textual).

Tabs: Matrix, Gate, Instances, Adapters, Logs, Sync; a status bar (budget, running
instances, alerts); a footer of bindings and a help screen. All database work happens in
thread workers: a poll every ``interval`` seconds reloads the status bar and the visible tab,
and the panes start their own workers for detail views, review writes, log tails and cloud
actions. One connection is shared by the reading workers under a lock, so the UI thread
never waits on SQLite; cloud actions (console/ops.py) use a connection of their own.
"""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any, Callable, Iterable, TypeVar

import sqlite_utils
from rich.text import Text
from textual import work
from textual.app import App, ComposeResult
from textual.binding import Binding
from textual.containers import VerticalScroll
from textual.screen import ModalScreen
from textual.widgets import Footer, Markdown, Static, TabbedContent, TabPane

from backend.sandbox import is_sandbox
from state.store import StoreReadOnly, open_db
from console import queries
from console.panes.adapters import AdaptersPane
from console.panes.gate import GatePane
from console.ops import Ops, OpsBusy, OpsUnavailable, explain
from console.panes.instances import InstancesPane
from console.panes.logs import LogsPane
from console.panes.matrix import MatrixPane
from console.panes.sync import SyncPane
from console.queries import EventAlerts, Status
from console.widgets import Pane, usd

T = TypeVar("T")

QUIT_WAIT_S = 0.5  # how long quitting waits for a database call in flight

PANES: tuple[tuple[str, type[Pane]], ...] = (
    ("matrix", MatrixPane), ("gate", GatePane), ("instances", InstancesPane), ("adapters", AdaptersPane),
    ("logs", LogsPane), ("sync", SyncPane))


SANDBOX_LABEL = Text("SANDBOX", style="bold black on yellow")


def status_text(s: Status | None, error: str = "", cloud: Text | str = "", sandbox: bool = False) -> Text:
    """The status bar; a sandbox's (``nko-ops sandbox``) starts with SANDBOX, so nothing
    emulated passes for a real account."""
    text = status_line(s, error, cloud)
    return Text.assemble(SANDBOX_LABEL, ("  emulated account, no real money  │  ", "yellow"), text) if sandbox else text


def status_line(s: Status | None, error: str = "", cloud: Text | str = "") -> Text:
    if error:
        return Text.assemble(("state.db error: ", "bold red"), error)
    if s is None:
        return Text("loading…", style="dim")
    b = s.budget
    if b is None:
        budget = Text("budget —", style="dim")
    else:
        over = b.cap_usd is not None and b.spent_usd >= b.cap_usd
        budget = Text.assemble("budget ", (usd(b.spent_usd), "bold red" if over else "bold"),
                               " / ", usd(b.cap_usd) if b.cap_usd else "no cap")
    runs = " ".join(f"{n} {st}" for st, n in s.runs_by_status) or "none"
    alerts = Text("⚠ " + "; ".join(s.alerts), style="bold red") if s.alerts else Text("no alerts", style="green")
    sep = ("  │  ", "dim")
    return Text.assemble(budget, sep, f"{s.running_instances} running instance{'s' * (s.running_instances != 1)}",
                         sep, alerts, sep, ("runs ", "dim"), runs, *((sep, cloud) if cloud else ()))


class HelpScreen(ModalScreen[None]):
    BINDINGS = [Binding("escape,q,question_mark", "app.pop_screen", "Close")]

    def __init__(self, panes: Iterable[Pane]) -> None:
        super().__init__()
        self.panes = list(panes)

    def compose(self) -> ComposeResult:
        parts = ["# nko-ops console", "",
                 f"Keys everywhere: `1`–`{len(PANES)}` switch tabs, `r` reloads now, `?` this help, `q` quits; "
                 "arrows/PgUp/PgDn move in tables. The status bar shows budget spend/cap, running "
                 "instances, run counts and alerts (over budget, hung adapter, sync failures, missing "
                 "artifacts, failed destroys, failed runs, stale heartbeats). Data refreshes every few "
                 "seconds.", ""]
        for pane in self.panes:
            parts += [f"## {pane.title}", "", pane.help, ""]
            keys = [f"`{b.key}` {b.description}" for b in getattr(pane, "BINDINGS", []) if isinstance(b, Binding)]
            if keys:
                parts += ["Keys: " + " · ".join(keys), ""]
        with VerticalScroll(id="help-dialog"):
            yield Markdown("\n".join(parts))


class ConsoleApp(App):
    CSS_PATH = Path(__file__).with_name("console.tcss")  # absolute: subclasses live elsewhere
    TITLE = "nko-ops console"
    BINDINGS = [
        Binding("q", "quit", "Quit"),
        Binding("question_mark", "help", "Help"),
        Binding("r", "reload", "Reload"),
        *[Binding(str(i + 1), f"show_tab('{name}')", name.title(), show=False) for i, (name, _) in enumerate(PANES)],
    ]

    def __init__(self, db_path: str | Path = "state.db", interval: float = 2.0,
                 clock: Callable[[], float] = time.time, vast_settings: str | Path | None = "configs/vast.toml",
                 budget: str | Path | None = "configs/budget.toml", cloud_poll: float | None = None) -> None:
        """``cloud_poll``: seconds between the console's own polls of the Vast account (instance
        rows, costs, idle timers); None takes the budget's poll_interval_s, 0 turns it off."""
        super().__init__()
        self.db_path = str(db_path)
        self.sandbox = is_sandbox(db_path)
        self.ops = Ops(db_path, vast_settings, budget)
        self.event_alerts = EventAlerts()
        self.interval = interval
        self.clock = clock
        self._db: sqlite_utils.Database | None = None
        self._lock = threading.Lock()
        self._closed = False
        self.status: Status | None = None
        self.error = ""
        self._polling = False
        self._pending: dict[Pane, None] = {}
        self.cloud_poll = cloud_poll
        self.cloud = ""  # the status bar's word on the background account poll
        self.cloud_error = ""

    # ---------------------------------------------------------------- layout

    def compose(self) -> ComposeResult:
        # Widgets of the main screen are held directly: the poll timer can tick while the app
        # tears its screens down, when a query would find nothing (CI saw exactly that).
        self._panes: dict[str, Pane] = {name: cls(id=name) for name, cls in PANES}
        self._tabs = TabbedContent(id="tabs")
        self._status_bar = Static(status_text(None, sandbox=self.sandbox), id="status-bar")
        with self._tabs:
            for name, pane in self._panes.items():
                with TabPane(pane.title, id=f"tab-{name}"):
                    yield pane
        yield self._status_bar
        yield Footer()

    def on_mount(self) -> None:
        self.sub_title = ("SANDBOX · " if self.sandbox else "") + Path(self.db_path).name
        self.refresh_panes()
        self.set_interval(self.interval, self.refresh_panes)
        if self.cloud_poll != 0:
            self._start_cloud_poll()

    def panes(self) -> list[Pane]:
        return list(self._panes.values())

    def active_pane(self) -> Pane:
        active = self._tabs.active or f"tab-{PANES[0][0]}"
        return self._panes[active.removeprefix("tab-")]

    def on_tabbed_content_tab_activated(self, event: TabbedContent.TabActivated) -> None:
        pane = self.active_pane()
        pane.query_one("DataTable").focus()
        self.refresh_panes([pane])

    def call_from_thread(self, callback: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        """As ``App.call_from_thread``, but a callback that reaches the UI thread after shutdown
        began is dropped: the widgets it would update are being removed, and a thread worker
        (a poll, a sync, a log tail) cannot be cancelled before it reports."""
        def if_running() -> Any:
            return callback(*args, **kwargs) if self.is_running else None
        return super().call_from_thread(if_running)

    # ---------------------------------------------------------------- database

    def read(self, fn: Callable[[sqlite_utils.Database, float], T]) -> T | None:
        """Run ``fn(db, now)`` in the calling (worker) thread; on a database error show it in
        the status bar and return None instead of taking the console down."""
        try:
            with self._lock:
                if self._closed:
                    return None
                if self._db is None:
                    try:
                        self._db = open_db(self.db_path)
                    except StoreReadOnly:  # a backup on a read-only disk: browse it, writes fail
                        self._db = open_db(self.db_path, read_only=True)
                try:
                    return fn(self._db, self.clock())
                finally:
                    if self._closed:  # the console quit meanwhile and left the connection to us
                        self._close_db()
        except Exception as exc:  # noqa: BLE001 - any failure is shown, the console keeps running
            self.call_from_thread(self._show_error, f"{type(exc).__name__}: {exc}")
            return None

    def write(self, fn: Callable[[sqlite_utils.Database], T]) -> T | None:
        return self.read(lambda db, now: fn(db))

    def _show_error(self, message: str) -> None:
        self.error = message
        self._status_bar.update(status_text(self.status, message, self.cloud, self.sandbox))
        self.notify(message, severity="error", timeout=6)

    def load_all(self, db: sqlite_utils.Database, now: float, panes: list[Pane]) -> tuple[Status, list[Any]]:
        """Everything one refresh reads (also what the refresh benchmark times)."""
        return queries.status(db, now, self.event_alerts), [p.load(db, now) for p in panes]

    def apply(self, status: Status, panes: list[Pane], results: list[Any]) -> None:
        self.status, self.error = status, ""
        self._status_bar.update(status_text(status, cloud=self.cloud, sandbox=self.sandbox))
        for pane, data in zip(panes, results):
            pane.show(data)

    def refresh_panes(self, panes: list[Pane] | None = None) -> None:
        """Reload the status bar and ``panes`` (default: the visible one) in a worker.

        One poll at a time: a request while one runs is queued and served right after it,
        so a slow database delays updates instead of cancelling every poll in turn."""
        if not self.is_running:  # a timer tick while the app shuts down
            return
        panes = panes if panes is not None else [self.active_pane()]
        if self._polling:
            self._pending.update(dict.fromkeys(panes))
            return
        self._polling = True
        self._poll(panes)

    @work(thread=True, group="poll")
    def _poll(self, panes: list[Pane]) -> None:
        try:
            loaded = self.read(lambda db, now: self.load_all(db, now, panes))
            if loaded is not None:
                self.call_from_thread(self.apply, loaded[0], panes, loaded[1])
        finally:
            with contextlib.suppress(RuntimeError):  # the app may be closing
                self.call_from_thread(self._poll_done)

    def _poll_done(self) -> None:
        self._polling = False
        if self._pending:
            panes, self._pending = list(self._pending), {}
            self.refresh_panes(panes)

    # ---------------------------------------------------------------- the Vast account

    @work(thread=True, group="cloud")
    def _start_cloud_poll(self) -> None:
        try:
            every = self.cloud_poll or self.ops.background_interval()
        except OpsUnavailable:  # no API key or no settings: the console works on state.db alone
            self.cloud = Text("cloud not polled (no provider)", style="dim")
            return
        except Exception as e:  # noqa: BLE001 - a broken configuration: say what, keep running
            message, _ = explain(e)
            self.cloud = Text("cloud not polled (configuration error)", style="bold red")
            self.call_from_thread(self.notify, f"the Vast account will not be polled: {message}",
                                  severity="error", timeout=10)
            return
        self.call_from_thread(self.set_interval, every, self._poll_cloud)
        self.call_from_thread(self._poll_cloud)

    @work(thread=True, group="cloud")
    def _poll_cloud(self) -> None:
        """Poll the account so costs and idle timers stay live without `nko-ops vast watch`.
        Skipped while a user's action runs; a new error is notified once, then shown in the
        status bar until a poll succeeds."""
        try:
            self.ops.poll(background=True)
        except OpsBusy:
            return
        except Exception as e:  # noqa: BLE001 - shown, the console keeps running
            message, _ = explain(e)
            if message != self.cloud_error:
                self.call_from_thread(self.notify, f"polling the Vast account failed: {message}",
                                      severity="error", timeout=8)
            self.cloud_error = message
            self.cloud = Text("cloud poll failed", style="bold red")
            return
        self.cloud_error = ""
        self.cloud = Text("cloud polled " + time.strftime("%H:%M:%S", time.localtime(self.clock())), style="dim")
        self.call_from_thread(self.refresh_panes)

    # ---------------------------------------------------------------- actions

    def action_show_tab(self, name: str) -> None:
        self._tabs.active = f"tab-{name}"

    def action_reload(self) -> None:
        self.refresh_panes()

    def action_help(self) -> None:
        self.push_screen(HelpScreen(self.panes()))

    def open_logs(self, kind: str, source_id: str) -> None:
        """Show the Logs tab following a run or an instance."""
        self.action_show_tab("logs")
        logs = self._panes["logs"]
        assert isinstance(logs, LogsPane)
        logs.open_key(kind, source_id)

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.conn.close()
            self._db = None

    def on_unmount(self) -> None:
        """Quit without waiting on a database call in flight (a write can sit in SQLite's busy
        timeout for a minute): the worker holding the lock closes the connection when done."""
        self._closed = True
        if self._lock.acquire(timeout=QUIT_WAIT_S):
            try:
                self._close_db()
            finally:
                self._lock.release()
        self.ops.close()  # waits at most 2 s for a cloud action, then leaves it be


def run(db: str = "state.db", interval: float = 2.0, vast_settings: str | Path | None = "configs/vast.toml",
        budget: str | Path | None = "configs/budget.toml", cloud_poll: float | None = None) -> None:
    ConsoleApp(db, interval, vast_settings=vast_settings, budget=budget, cloud_poll=cloud_poll).run()
