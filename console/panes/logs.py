"""Logs: a live tail of one run or instance, with follow/pause and search.

A run on a live Vast instance is tailed over SSH: ``train.log``'s new complete lines are read
with the lane's LogFollower (backend/vast/logs.py) from the byte offset state.db had stored,
every ``SSH_POLL_S``. The console only shows those lines; storing them stays with the lane's
own follower (the executor, ``nko-ops vast logs``), so the two never write a line twice.
Everything else (a local run, a finished run, the lane's own events such as syncs and
destroys) comes from the ``events`` table, polled for new rows every ``EVENTS_POLL_S``.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass

import sqlite_utils
from rich.console import Group, RenderableType
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.timer import Timer
from textual.widgets import DataTable, Input, RichLog, Static
from textual.worker import get_current_worker

from backend.vast.ssh import HostKeyChanged, SSHError
from console import bidi, queries
from console.ops import OpsUnavailable, TrainLogTail
from console.queries import LogEvent, LogSource, TailPlan
from console.widgets import EmptyState, Pane, Table, bidi_lines, styled

COLUMNS = ("source", "status", "where")
EMPTY = "No runs or instances in this state.db yet: nothing to follow."
SSH_POLL_S = 0.25
EVENTS_POLL_S = 0.5
MAX_LINES = 5000
SETTLE_S = 0.3  # a source is opened once the cursor rests on it this long (arrowing past opens nothing)


@dataclass(frozen=True)
class Line:
    text: str
    kind: str = "log"  # 'log' for trainer output, else the event kind ('sync', 'note', ...)
    level: str = "info"

    @classmethod
    def of(cls, e: LogEvent) -> "Line":
        return cls(e.message if e.kind == "log" else f"{e.ts[11:19]} [{e.kind}] {e.message}", e.kind, e.level)

    def render(self, term: str = "") -> RenderableType:
        style = {"error": "bold red", "warning": "yellow"}.get(self.level, "" if self.kind == "log" else "cyan")
        if bidi.has_rtl(self.text):  # N'Ko: put in display order line by line, after wrapping
            return Group(*bidi_lines(self.text, style, term))
        t = Text(self.text, style=style)
        if term:
            t.highlight_words([term], style="reverse", case_sensitive=False)
        return t


def cells(s: LogSource) -> tuple:
    return (f"{s.kind} {s.id}", styled(s.status), s.where)


class LogsPane(Pane):
    title = "Logs"
    help = ("Live tail of a run or instance, chosen in the list on the left (or with l in the "
            "Matrix and Instances tabs). A run on a live Vast instance is read over SSH "
            f"(train.log, every {SSH_POLL_S:g} s); other runs and the lane's events (syncs, "
            "destroys, errors) come from state.db. f pauses/follows (while paused, new lines are "
            "counted, then shown on follow); / searches (only matching lines, highlighted); "
            "escape clears the search.")
    BINDINGS = [
        Binding("f", "toggle_follow", "Follow/pause"),
        Binding("slash", "search", "Search"),
        Binding("escape", "clear_search", "Clear search", show=False),
    ]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self._sources: tuple[LogSource, ...] | None = None
        self.source: LogSource | None = None
        self.lines: deque[Line] = deque(maxlen=MAX_LINES)
        self.following = True
        self.unseen = 0  # lines received while paused
        self.term = ""
        self.mode = ""  # what the tail reads, for the header
        self.problem = ""  # the tail's latest connection trouble, '' when fine
        self._timer: Timer | None = None
        # Bumped by every open: a replaced tail (even of the same source, reopened) may still
        # post a batch it had in flight; only the current generation's posts are shown.
        self._generation = 0

    def compose(self) -> ComposeResult:
        yield EmptyState(EMPTY, id="logs-empty")
        with Horizontal(id="logs-body"):
            yield Table(COLUMNS, cells, id="logs-sources")
            with Vertical(id="logs-main"):
                yield Static(id="logs-header")
                yield RichLog(id="logs-view", max_lines=MAX_LINES, wrap=True, markup=False)
                yield Input(placeholder="search (enter), escape to clear", id="logs-search")

    def on_mount(self) -> None:
        self.query_one("#logs-search").display = False
        self._header()

    def load(self, db: sqlite_utils.Database, now: float) -> tuple[LogSource, ...]:
        return tuple(queries.log_sources(db))

    def show(self, sources: tuple[LogSource, ...]) -> None:
        self.query_one("#logs-empty").display = not sources
        self.query_one("#logs-body").display = bool(sources)
        if sources != self._sources:
            self._sources = sources
            table = self.query_one("#logs-sources", Table)
            table.show([(s.key, s) for s in sources])
            if self.source is not None and self.source.key in table.items:  # keep the cursor on what we follow
                table.move_cursor(row=list(table.items).index(self.source.key), animate=False)
        if self.source is None and sources:
            self.open(sources[0])

    # ---------------------------------------------------------------- choosing a source

    @on(DataTable.RowHighlighted, "#logs-sources")
    def _highlighted(self, event: DataTable.RowHighlighted) -> None:
        key = event.row_key.value if event.row_key else None
        src = self.query_one("#logs-sources", Table).items.get(key or "")
        if self._timer is not None:
            self._timer.stop()
        if src is None or (self.source is not None and src.key == self.source.key):
            return
        self._timer = self.set_timer(SETTLE_S, lambda: self.open(src))

    def open(self, source: LogSource) -> None:
        """Start following ``source`` (the previous tail stops)."""
        if self._timer is not None:
            self._timer.stop()
        self.source = source
        self.lines.clear()
        self.unseen, self.mode, self.problem = 0, "connecting…", ""
        self.query_one("#logs-view", RichLog).clear()
        table = self.query_one("#logs-sources", Table)
        if source.key in table.items and table.cursor_row != list(table.items).index(source.key):
            table.move_cursor(row=list(table.items).index(source.key), animate=False)
        self._header()
        self._generation += 1
        self._tail(source, self._generation)

    def open_key(self, kind: str, source_id: str) -> None:
        """Follow a run or instance chosen elsewhere (l in the Matrix and Instances tabs)."""
        items = self.query_one("#logs-sources", Table).items
        self.open(items.get(f"{kind}:{source_id}") or LogSource(kind, source_id, "?", ""))

    # ---------------------------------------------------------------- the tail (a thread worker)

    @work(thread=True, exclusive=True, group="logs-tail")
    def _tail(self, source: LogSource, gen: int) -> None:
        worker = get_current_worker()
        app = self.app

        ops = app.ops  # type: ignore[attr-defined]

        def plan(db: sqlite_utils.Database, now: float) -> tuple[TailPlan, TrainLogTail | None, str]:
            with queries.read_snapshot(db):  # history and the log offset of one moment
                p = queries.tail_plan(db, source.kind, source.id)
                if not p.ssh_host:
                    return p, None, ""
                try:  # the SSH session comes from the console's ops, like every cloud action
                    return p, ops.train_log_tail(db, p.run_id, p.instance_id, p.ssh_host, p.ssh_port), ""
                except OpsUnavailable as e:  # a bad configs/vast.toml: events only, and say why
                    return p, None, str(e)

        got = app.read(plan)  # type: ignore[attr-defined]
        if got is None or worker.is_cancelled:
            if got is not None and got[1] is not None:
                got[1].close()
            return
        p, remote, config_error = got
        if remote is not None:
            mode = f"{remote.where} + events"
        else:
            why = f" (no SSH: {config_error})" if config_error and p.ssh_host else ""
            mode = "events in state.db" + why

        def post(fn, *args) -> bool:
            try:
                app.call_from_thread(fn, *args)
                return True
            except RuntimeError:  # the app is closing
                return False

        if not post(self._started, gen, mode, [Line.of(e) for e in p.history]):
            return
        last_event, next_events, backoff, retry_at = p.last_event_id, 0.0, SSH_POLL_S, 0.0
        try:
            while not worker.is_cancelled:
                now = time.monotonic()
                if remote is not None and now >= retry_at:
                    retry_at = now + SSH_POLL_S
                    try:
                        lines = remote.lines()
                        if lines and not post(self._append, gen, [Line(x) for x in lines]):
                            break
                        if self.problem:
                            post(self._trouble, gen, "")
                        backoff = SSH_POLL_S
                    except HostKeyChanged as e:
                        post(self._trouble, gen, str(e))
                        remote.close()
                        remote = None  # never retried: a changed host key needs a person
                    except SSHError as e:
                        backoff = min(max(backoff * 2, 1.0), 30.0)
                        retry_at = now + backoff
                        remote.close()
                        post(self._trouble, gen, f"{e}; retrying in {backoff:.0f} s")
                if now >= next_events and not worker.is_cancelled:
                    next_events = now + EVENTS_POLL_S
                    events = app.read(lambda db, _: queries.new_events(db, p.run_id, p.instance_id, last_event))
                    if events:
                        last_event = events[-1].id
                        # Over SSH the trainer's lines come from the file itself; the lane stores
                        # the same lines as 'log' events later, which would show them twice.
                        shown = [Line.of(e) for e in events if not (remote is not None and e.kind == "log")]
                        if shown and not post(self._append, gen, shown):
                            break
                time.sleep(0.05)
        finally:
            if remote is not None:
                remote.close()

    def _started(self, gen: int, mode: str, history: list[Line]) -> None:
        if gen != self._generation:
            return
        self.mode = mode
        self._append(gen, history)

    def _trouble(self, gen: int, problem: str) -> None:
        if gen == self._generation:
            self.problem = problem
            self._header()

    def _append(self, gen: int, lines: list[Line]) -> None:
        if gen != self._generation:
            return  # a tail that was replaced meanwhile (perhaps by one of the same source)
        self.lines.extend(lines)
        if self.following:
            view = self.query_one("#logs-view", RichLog)
            for line in lines:
                if self._matches(line):
                    view.write(line.render(self.term))
        else:
            self.unseen += len(lines)
        self._header()

    # ---------------------------------------------------------------- follow, pause, search

    def _matches(self, line: Line) -> bool:
        return not self.term or self.term.lower() in line.text.lower()

    def redraw(self) -> None:
        view = self.query_one("#logs-view", RichLog)
        view.clear()
        for line in self.lines:
            if self._matches(line):
                view.write(line.render(self.term), scroll_end=False)
        view.scroll_end(animate=False)
        self._header()

    def action_toggle_follow(self) -> None:
        self.following = not self.following
        if self.following:
            self.unseen = 0
            self.redraw()
        else:
            self._header()

    def action_search(self) -> None:
        box = self.query_one("#logs-search", Input)
        box.display = True
        box.value = self.term
        box.focus()

    @on(Input.Submitted, "#logs-search")
    def _search(self, event: Input.Submitted) -> None:
        self.term = event.value.strip()
        if not self.term:
            event.input.display = False
        self.query_one("#logs-sources").focus()
        self.redraw()

    def action_clear_search(self) -> None:
        box = self.query_one("#logs-search", Input)
        box.value, box.display = "", False
        if self.term:
            self.term = ""
            self.redraw()
        self.query_one("#logs-sources").focus()

    def _header(self) -> None:
        if self.source is None:
            self.query_one("#logs-header", Static).update(Text("choose a run or instance on the left", style="dim"))
            return
        s = self.source
        text = Text.assemble((f"{s.kind} ", "dim"), (s.id, "bold"), ("  ", ""), (self.mode, "dim"), "  ")
        if self.following:
            text.append("following", style="green")
        else:
            text.append(f"paused ({self.unseen} new line{'s' * (self.unseen != 1)})", style="bold yellow")
        if self.term:
            n = sum(1 for line in self.lines if self._matches(line))
            text.append(f"  search '{self.term}': {n} of {len(self.lines)} lines", style="bold")
        else:
            text.append(f"  {len(self.lines)} lines", style="dim")
        if self.problem:
            text.append(f"\n{self.problem}", style="bold red")
        self.query_one("#logs-header", Static).update(text)

    def shown_text(self) -> str:
        """What the log view holds on screen (plain text, one line per row)."""
        return "\n".join(strip.text for strip in self.query_one("#logs-view", RichLog).lines)
