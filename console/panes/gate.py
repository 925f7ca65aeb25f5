"""Gate: the admissibility gate's decisions, a diff of ASR text / proposal / reference, the
rules that fired, and keys to record a human review verdict into ``reviews``."""

from __future__ import annotations

import difflib
from dataclasses import replace

import sqlite_utils
from rich.console import Group
from rich.text import Text
from textual import on, work
from textual.app import ComposeResult
from textual.binding import Binding
from textual.containers import Horizontal, Vertical
from textual.screen import ModalScreen
from textual.widgets import Button, DataTable, Input, Label, Static

from state import agp as state_agp
from state import store
from console import bidi, queries
from console.queries import DecisionRow, GateFilter, GatePage
from console.widgets import BidiText, EmptyState, Pane, Table, bidi_lines, selected_key
from models.bundle import PARTITIONS
from models.text import row_edits

COLUMNS = ("id", "feat_id", "partition", "decision", "edits", "Δ acoustic", "margin", "rules", "review")
PARTITION_CYCLE = (None, *PARTITIONS)
ACCEPT_CYCLE = (None, True, False)
EMPTY = "No gate decisions in this state.db yet. `nko-ops demo` (AGP lane) or `nko-ops agp gate` records them."


def _num(x: float | None) -> str:
    if x is None:
        return "—"
    return f"{x:+.4f}" if x == x and abs(x) != float("inf") else ("-inf" if x < 0 else "inf")


def cells(d: DecisionRow) -> tuple:
    decision = Text("accept", style="green") if d.accepted else Text("reject", style="red")
    if d.accepted and d.ref_edit_change is not None and d.ref_edit_change > 0:
        decision = Text("accept ✗", style="bold red")  # accepted but worse against the reference
    review = Text(d.verdict, style="green" if d.verdict == "agree" else "magenta") if d.verdict else Text("—", style="dim")
    margin = "—" if d.acoustic_margin is None else _num(d.acoustic_margin).lstrip("+")
    return (str(d.id), d.feat_id, d.partition, decision, "—" if d.edit_distance is None else str(d.edit_distance),
            _num(d.acoustic_delta), margin, ", ".join(d.rules) or "—", review)


def _ops(a: list[str], b: list[str]) -> tuple[set[int], set[int]]:
    """Indices of the clusters of ``a`` and of ``b`` that the alignment does not match."""
    bad_a, bad_b = set(), set()
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes():
        if tag != "equal":
            bad_a.update(range(i1, i2))
            bad_b.update(range(j1, j2))
    return bad_a, bad_b


def diff_text(units: list[str], wrong: set[int], changed: set[int]) -> Text:
    """The clusters in logical order, those not matching the reference in red and those the
    proposal touched underlined; BidiText puts them in display order after wrapping, so the
    highlights stay on their letters and a long sentence starts on the first line."""
    out = Text()
    for i, cluster in enumerate(units):
        style = ("bold red" if i in wrong else "") + (" underline" if i in changed else "")
        out.append(cluster, style=style.strip())
    return out


def diff_view(d: DecisionRow) -> Group:
    asr, prop, ref = bidi.units(d.asr_text), bidi.units(d.proposal), bidi.units(d.reference_text)
    asr_wrong, _ = _ops(asr, ref)
    prop_wrong, _ = _ops(prop, ref)
    asr_changed, prop_changed = _ops(asr, prop)
    e_asr = row_edits(d.reference_text, d.asr_text)[0]
    e_prop = row_edits(d.reference_text, d.proposal)[0]
    if e_prop < e_asr:
        effect = Text(f"proposal removes {e_asr - e_prop} edit(s) vs reference", style="green")
    elif e_prop > e_asr:
        effect = Text(f"proposal adds {e_prop - e_asr} edit(s) vs reference", style="red")
    else:
        effect = Text("proposal leaves the edit count unchanged", style="dim")
    return Group(
        BidiText(diff_text(asr, asr_wrong, asr_changed), Text("ASR       ", "dim"), f"   ({e_asr} edits)"),
        BidiText(diff_text(prop, prop_wrong, prop_changed), Text("proposal  ", "dim"), f"   ({e_prop} edits)"),
        BidiText(diff_text(ref, set(), set()), Text("reference ", "dim")),
        Text.assemble(effect, ("   red ≠ reference · underlined = changed by the proposal · N'Ko right to left", "dim")))


def info_view(d: DecisionRow) -> Group:
    verdict = Text("ACCEPTED", style="bold green") if d.accepted else Text("REJECTED", style="bold red")
    rules = ", ".join(d.rules) if d.rules else "none (accepted)"
    out = Text.assemble(verdict, ("  decision ", "dim"), str(d.id), ("  feat ", "dim"), d.feat_id,
                        ("  run ", "dim"), d.run_id or "—", ("  partition ", "dim"), d.partition or "—", "\n",
                        ("rules fired ", "dim"), (rules, "bold"), ("  edit distance ", "dim"),
                        "—" if d.edit_distance is None else str(d.edit_distance), "\n",
                        ("acoustic Δ ", "dim"), _num(d.acoustic_delta), ("  margin ", "dim"),
                        "not checked" if d.acoustic_margin is None else _num(d.acoustic_margin).lstrip("+"),
                        (f"  (accepts Δ ≥ {_num(-d.acoustic_margin)})" if d.acoustic_margin is not None else "", "dim"),
                        "\n",
                        ("policy ", "dim"), d.policy_hash[:16] or "—", ("  witness ", "dim"), d.witness[:16] or "—")
    review = Text.assemble(("review ", "dim"))
    if not d.verdict:
        return Group(out, review.append("none yet: a agree · o override (with a note)", style="dim"))
    review.append(d.verdict, style="green" if d.verdict == "agree" else "magenta")
    if not d.note:
        return Group(out, review)
    return Group(out, *bidi_lines(d.note, prefix=review.append(" — ")))  # the note may be N'Ko


class OverrideScreen(ModalScreen[str | None]):
    """Asks why the reviewer disagrees with the gate; returns the note, or None on cancel."""

    BINDINGS = [Binding("escape", "cancel", "Cancel")]

    def __init__(self, decision: DecisionRow) -> None:
        super().__init__()
        self.decision = decision

    def compose(self) -> ComposeResult:
        d = self.decision
        with Vertical(id="override-dialog"):
            yield Label(Text.assemble("Override the gate on decision ", (str(d.id), "bold"), " (",
                                      ("accepted" if d.accepted else "rejected"), ", ", d.partition or "—", ")"))
            yield Static(diff_view(d), id="override-diff")
            yield Input(placeholder="why the gate is wrong here (required)", id="override-note")
            yield Label("", id="override-error")
            with Horizontal(id="override-buttons"):
                yield Button("Record override", variant="warning", id="override-ok")
                yield Button("Cancel", id="override-cancel")

    @on(Input.Submitted, "#override-note")
    @on(Button.Pressed, "#override-ok")
    def _submit(self) -> None:
        note = self.query_one("#override-note", Input).value.strip()
        if not note:
            self.query_one("#override-error", Label).update(Text("a note is required", style="red"))
            return
        self.dismiss(note)

    @on(Button.Pressed, "#override-cancel")
    def action_cancel(self) -> None:
        self.dismiss(None)


class GatePane(Pane):
    title = "Gate"
    help = ("Gate decisions, newest first, with each proposal's acoustic score Δ and the margin it was held to. "
            "p cycles the partition filter, d accepted/rejected, u unreviewed only, w accepted but worse "
            "against the reference (marked ✗), [ and ] page. The panel shows ASR text, proposal and reference "
            "(N'Ko drawn right to left), the rules that fired and the review. a records 'agree', "
            "o records an override with a note; both go to the reviews table.")
    BINDINGS = [
        Binding("a", "agree", "Agree"),
        Binding("o", "override", "Override"),
        Binding("p", "cycle_partition", "Partition"),
        Binding("d", "cycle_accepted", "Accept/reject"),
        Binding("u", "toggle_unreviewed", "Unreviewed"),
        Binding("w", "toggle_worse", "Accepted but worse"),
        Binding("right_square_bracket", "page(1)", "Older", show=False),
        Binding("left_square_bracket", "page(-1)", "Newer", show=False),
    ]

    def __init__(self, **kwargs) -> None:
        super().__init__(**kwargs)
        self.filter = GateFilter()
        self.page: GatePage | None = None
        self.reviewer = store.user()

    def compose(self) -> ComposeResult:
        yield Static(id="gate-filter")
        yield EmptyState(EMPTY, id="gate-empty")
        yield Table(COLUMNS, cells, id="gate-table")
        with Vertical(id="gate-detail"):
            yield Static(id="gate-diff")
            yield Static(id="gate-info")

    def on_mount(self) -> None:
        self._show_filter(None)

    def load(self, db: sqlite_utils.Database, now: float) -> GatePage:
        return queries.gate_decisions(db, self.filter)

    def show(self, page: GatePage) -> None:
        if page.filter != self.filter:
            return  # a filter change is already reloading
        self.page = page
        self._show_filter(page)
        table = self.query_one("#gate-table", Table)
        none_at_all = page.total == 0 and page.filter == GateFilter(limit=page.filter.limit)
        self.query_one("#gate-empty").display = none_at_all
        table.display = not none_at_all
        self.query_one("#gate-detail").display = bool(page.rows)
        table.show([(d.id, d) for d in page.rows])
        self._show_detail()

    def _show_filter(self, page: GatePage | None) -> None:
        f = self.filter
        part = f.partition or "all"
        acc = {None: "all", True: "accepted", False: "rejected"}[f.accepted]
        text = Text.assemble(("partition ", "dim"), (part, "bold"), ("  decisions ", "dim"), (acc, "bold"),
                             ("  unreviewed only ", "dim"), ("yes" if f.unreviewed else "no", "bold"),
                             ("  accepted but worse only ", "dim"), ("yes" if f.worse else "no", "bold"))
        if page is not None:
            last = min(page.total, f.offset + len(page.rows))
            text.append(f"   showing {f.offset + 1 if page.rows else 0}–{last} of {page.total}", style="dim")
        self.query_one("#gate-filter", Static).update(text)

    def current(self) -> DecisionRow | None:
        table = self.query_one("#gate-table", Table)
        key = selected_key(table)
        return None if key is None else table.items.get(key)

    def _show_detail(self) -> None:
        d = self.current()
        if d is None:
            return
        self.query_one("#gate-diff", Static).update(diff_view(d))
        self.query_one("#gate-info", Static).update(info_view(d))

    @on(DataTable.RowHighlighted, "#gate-table")
    def _highlighted(self) -> None:
        self._show_detail()

    # ---------------------------------------------------------------- filters

    def _set_filter(self, **changes) -> None:
        self.filter = replace(self.filter, **changes)
        self._show_filter(None)
        self.request_refresh()

    def action_cycle_partition(self) -> None:
        i = PARTITION_CYCLE.index(self.filter.partition)
        self._set_filter(partition=PARTITION_CYCLE[(i + 1) % len(PARTITION_CYCLE)], offset=0)

    def action_cycle_accepted(self) -> None:
        i = ACCEPT_CYCLE.index(self.filter.accepted)
        self._set_filter(accepted=ACCEPT_CYCLE[(i + 1) % len(ACCEPT_CYCLE)], offset=0)

    def action_toggle_unreviewed(self) -> None:
        self._set_filter(unreviewed=not self.filter.unreviewed, offset=0)

    def action_toggle_worse(self) -> None:
        self._set_filter(worse=not self.filter.worse, offset=0)

    def action_page(self, step: int) -> None:
        total = self.page.total if self.page else 0
        offset = self.filter.offset + step * self.filter.limit
        if 0 <= offset < max(total, 1):
            self._set_filter(offset=offset)

    # ---------------------------------------------------------------- reviews

    def action_agree(self) -> None:
        d = self.current()
        if d is not None:
            self._record(d.id, "agree", "")

    def action_override(self) -> None:
        d = self.current()
        if d is None:
            return

        def done(note: str | None) -> None:
            if note:
                self._record(d.id, "override", note)

        self.app.push_screen(OverrideScreen(d), done)

    @work(thread=True, group="review")
    def _record(self, decision_id: int, verdict: str, note: str) -> None:
        review = self.app.write(  # type: ignore[attr-defined]
            lambda db: state_agp.add_review(db, decision_id, verdict, note, self.reviewer))
        if review is not None:
            self.app.call_from_thread(self._recorded, decision_id, verdict)

    def _recorded(self, decision_id: int, verdict: str) -> None:
        self.app.notify(f"decision {decision_id}: {verdict} recorded", timeout=3)
        table = self.query_one("#gate-table", DataTable)
        if selected_key(table) == str(decision_id) and table.cursor_row < table.row_count - 1:
            table.move_cursor(row=table.cursor_row + 1)  # on to the next decision to review
        self.request_refresh()
