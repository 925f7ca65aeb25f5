"""The operations console (console/): queries, N'Ko display order and headless pilot tests
of every pane on a small, fixed state.db built through state.store like the real lanes."""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import sqlite3
import threading
import time
import unicodedata
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from rich.cells import cell_len
from textual.content import Content
from textual.widgets import DataTable, Input, Static, TabbedContent

from console import bidi, queries
from console.app import ConsoleApp, HelpScreen
from console.panes.gate import GatePane, OverrideScreen
from console.widgets import Bars, Curve

from state.store import add_metrics, open_db, record_artifacts, transaction, upsert_run
from backend.vast.cost import ts as iso_ts
from models.bundle import BUNDLE_FILES
from models.text import row_edits

# 2025-01-02T12:00:00Z: the console's clock in the tests, so uptimes and ages are fixed.
NOW = 1735819200.0

# (asr, proposal, reference, partition, accepted, rules, edit distance)
DECISIONS = [
    ("ߌ ߦߋ ߛߊ ߖߏߟߌ ߦߋ", "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", "boundary", True, [], 1),
    ("ߒ ߓߊ߯ ߕߊ߯", "ߒ ߓߊ ߕߊ߯", "ߒ ߓߊ߯ ߕߊ߯", "uncertain", False, ["new_word"], 1),
    ("ߊ߬ ߦߋ߫ ߣߊ߬", "ߊ߬ ߦߋ߫ ߣߊ߬", "ߊ߬ ߦߋ߫ ߣߊ߬", "stable", False, ["frozen", "no_op"], 0),
    ("ߞߏ ߓߍ ߘߌ", "ߞߏ ߓߍ߯ ߘߌ߫", "ߞߏ ߓߍ߯ ߘߌ", "boundary", True, [], 2),
    ("ߛߏ߫ ߞߊ߲", "ߛߏ߫ ߞߊ߲ ߞߊ߲ ߞߊ߲", "ߛߏ߫ ߞߊ߲", "novelty", False, ["quarantine", "length_ratio"], 10),
]


# A sentence too long for one line of the gate's diff at 60 columns.
LONG = "ߒ ߓߊ߯ ߕߊ߯ ߛߏ߫ ߞߊ߲ ߞߏ ߓߍ߯ ߘߌ ߊ߬ ߦߋ߫ ߣߊ߬ ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ ߞߏ ߓߍ߯ ߘߌ ߛߏ߫ ߞߊ߲"

def build(path: Path, *, runs: bool = True, gate: bool = True, cloud: bool = True, adapters: bool = True):
    db = open_db(path)
    if runs:
        with transaction(db):
            db.execute("INSERT INTO matrices(id, path) VALUES ('demo', 'configs/matrix/demo.json')")
        specs = [("demo-nko-baseline", "nko", "baseline", "completed", 9, "verified"),
                 ("demo-nko-trajectory", "nko", "trajectory", "completed", 9, "mixed"),
                 ("demo-latin-baseline", "latin", "baseline", "running", 4, "remote-only"),
                 ("demo-nko-tar", "nko", "tar", "failed", 0, None)]
        for i, (rid, script, mode, status, n_art, sync) in enumerate(specs):
            epochs = 12 if status == "completed" else 5
            upsert_run(db, rid, matrix_id="demo", script=script, mode=mode, seed=42, status=status,
                       executor="local", out_dir=f"work/demo/runs/{rid}",
                       config=(f"work/demo/configs/{rid}.json" if status == "failed"
                               else {"run_id": rid, "script": script, "mode": mode, "seed": 42}),
                       epoch=epochs, val_loss=1.5 - 0.05 * epochs - 0.01 * i,
                       best_val_loss=1.45 - 0.05 * epochs - 0.01 * i, best_epoch=epochs - 1,
                       test_cer=(0.2057 + 0.03 * i) if status == "completed" else None,
                       test_cer_toneless=(0.15 + 0.03 * i) if status == "completed" else None,
                       heartbeat_at="2025-01-02T11:59:30.000Z",
                       error="CUDA out of memory" if status == "failed" else None,
                       created_at=f"2025-01-02T10:0{i}:00.000Z")
            add_metrics(db, rid, [{"kind": "epoch", "epoch": e, "train_loss": 3.0 / (e + 1) + 0.2,
                                   "val_loss": 3.2 / (e + 1) + 0.4, "time": NOW - 3600 + 60 * e}
                                  for e in range(epochs)])
            files = []
            for j, name in enumerate(BUNDLE_FILES[:n_art]):
                state = sync if sync != "mixed" else ("verified" if j < 6 else "remote-only")
                files.append({"name": name, "path": f"work/demo/runs/{rid}/{name}", "sha256": f"{j:064x}",
                              "size": 100 + j, "sync_state": state, "verified_at": "2025-01-02T11:00:00.000Z"})
            record_artifacts(db, rid, files)
        with transaction(db):
            db.execute("INSERT INTO promotions(run_id, path, record_sha256) VALUES (?, ?, ?)",
                       ["demo-nko-baseline", "reports/promotions/demo-nko-baseline.json", "0" * 64])
    if gate:
        with transaction(db):
            for i, (asr, prop, ref, part, acc, rules, dist) in enumerate(DECISIONS):
                checked = part in ("boundary", "uncertain")  # rule acoustic's partitions
                db.execute("INSERT INTO gate_decisions(feat_id, run_id, partition, accepted, rules, edit_distance, "
                           "policy_hash, witness, asr_text, proposal, reference_text, created_at, acoustic_delta, "
                           "acoustic_margin, ref_edit_change) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                           [f"bam_test_{i:04d}", "demo-nko-trajectory", part, int(acc), json.dumps(rules), dist,
                            "a1b2c3d4e5f60718" * 4, f"{i:016x}" * 4, asr, prop, ref, "2025-01-02T11:30:00.000Z",
                            -0.0125 * i, 0.05 if checked else None,
                            row_edits(ref, prop)[0] - row_edits(ref, asr)[0]])
    if cloud:
        with transaction(db):
            db.execute("INSERT INTO budgets(name, cap_usd, warn_usd, spent_usd) VALUES ('bundle', 100, 80, 12.5)")
            for i, (status, util, dph, destroyed) in enumerate([("running", 97.0, 1.25, None),
                                                                ("running", 0.0, 0.85, None),
                                                                ("exited", None, 0.40, "2025-01-02T09:00:00.000Z")]):
                iid = str(1000 + i)
                low = {"low_util_since": NOW - 3600} if util == 0.0 else {}  # as backend/vast/idle.py tracks it
                db.execute("INSERT INTO instances(id, label, run_id, gpu_name, num_gpus, dph_total, actual_status, "
                           "gpu_util, start_date, destroyed_at, created_at, data) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                           [iid, f"demo-run-{i}", f"demo-run-{i}", "RTX_4090" if i else "A100_SXM4", 1, dph,
                            status, util, NOW - 7200 * (i + 1), destroyed, f"2025-01-02T0{i}:00:00.000Z",
                            json.dumps(low)])
                for k in range(4):
                    db.execute("INSERT INTO cost_samples(instance_id, ts, dph_total, running_s, total_usd) "
                               "VALUES (?,?,?,?,?)",
                               [iid, f"2025-01-02T1{k}:00:00.000Z", dph, 3600.0 * k, round(dph * (k + 1), 4)])
    if adapters:
        with transaction(db):
            for aid, status, beat in [("tt-001", "completed", "2025-01-02T11:00:00.000Z"),
                                      ("tt-002", "hung", "2025-01-02T11:40:00.000Z")]:
                db.execute("INSERT INTO adapter_runs(id, name, status, hosts, world_size, iteration, heartbeat_at, "
                           "error, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                           [aid, f"gemma-lora-{aid}", status, json.dumps(["mac-a", "mac-b"]), 2, 200,
                            beat, "no report for 300 s: ranks stopped" if status == "hung" else None,
                            f"2025-01-02T0{int(aid[-1])}:00:00.000Z"])
                for rank in (0, 1):
                    for it in range(10, 210, 10):
                        db.execute("INSERT INTO adapter_metrics(adapter_run_id, rank, iteration, name, value) "
                                   "VALUES (?,?,?,?,?)", [aid, rank, it, "train_loss", 2.0 / (1 + it / 50)])
                        db.execute("INSERT INTO adapter_metrics(adapter_run_id, rank, iteration, name, value) "
                                   "VALUES (?,?,?,?,?)", [aid, rank, it, "tokens_per_second", 900.0 + it])
                        if it % 50 == 0:
                            db.execute("INSERT INTO adapter_metrics(adapter_run_id, rank, iteration, name, value) "
                                       "VALUES (?,?,?,?,?)", [aid, rank, it, "val_loss", 2.2 / (1 + it / 60)])
    db.conn.close()
    return path


def add_decision(path: Path, asr: str, proposal: str, reference: str, note: str | None = None) -> None:
    """One more (rejected) gate decision, with an override review when ``note`` is given."""
    db = open_db(path)
    with transaction(db):
        cur = db.execute("INSERT INTO gate_decisions(feat_id, partition, accepted, rules, edit_distance, policy_hash, "
                         "witness, asr_text, proposal, reference_text) VALUES (?,?,?,?,?,?,?,?,?,?)",
                         ["bam_test_9999", "boundary", 0, '["new_word"]', 1, "0" * 64, "1" * 64, asr, proposal,
                          reference])
        if note is not None:
            db.execute("INSERT INTO reviews(decision_id, verdict, note, reviewer) VALUES (?, 'override', ?, 'ana')",
                       [cur.lastrowid, note])
    db.conn.close()


@pytest.fixture
def state(tmp_path: Path) -> Path:
    return build(tmp_path / "state.db")


def make_app(path: Path) -> ConsoleApp:
    return ConsoleApp(path, interval=3600, clock=lambda: NOW, cloud_poll=0)  # polls only when asked


async def settle(pilot, timeout: float = 60.0) -> None:
    """Wait until every worker (polls, detail loads, review writes) has finished; a log tail
    (which follows until closed) does not count."""
    deadline = time.monotonic() + timeout
    while not all(w.is_finished for w in pilot.app.workers if w.group != "logs-tail"):
        if time.monotonic() > deadline:
            raise AssertionError(f"workers still running after {timeout:.0f} s: {list(pilot.app.workers)}")
        await pilot.pause()
        await asyncio.sleep(0.01)
    await pilot.pause()


async def until(pilot, cond, timeout: float = 60.0, what: str = "") -> None:
    """Poll ``cond`` until it holds (a deadline, not a count: CI machines can be slow)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or cond}")
        await asyncio.sleep(0.05)
        await pilot.pause()


def rows(app: ConsoleApp, table_id: str) -> list[list[str]]:
    table = app.screen_stack[0].query_one(table_id, DataTable)  # the main screen, even under a dialog
    return [[str(c) for c in table.get_row(k)] for k in table.rows]


def screen_lines(app: ConsoleApp, widget_id: str) -> list[str]:
    """The rows of the screen that ``widget_id`` covers, as drawn (cells, not characters)."""
    r = app.query_one(widget_id).region.intersection(app.screen.region)
    strips = app.screen._compositor.render_strips()
    return [strip.crop(r.x, r.right).text for strip in strips[r.y:r.bottom]]


def text_of(app: ConsoleApp, widget_id: str) -> str:
    content = app.query_one(widget_id, Static).render()
    return str(content) if isinstance(content, Content) else "\n".join(screen_lines(app, widget_id))


# --------------------------------------------------------------------------- N'Ko display order

def test_visual_reverses_nko_and_keeps_marks_on_their_letters():
    s = "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ"  # "i ye san joli ye"; ߊ߲ = a + nasal mark U+07F2
    v = bidi.visual(s)
    assert v == "ߋߦ ߌߟߏߖ ߊ߲ߛ ߋߦ ߌ"
    assert "ߊ߲" in v and "߲ߊ" not in v  # the mark still follows its base letter
    assert bidi.visual("ߓߊ߯ߙߊ߫") == "ߊ߫ߙߊ߯ߓ"


def test_visual_keeps_latin_and_digits_left_to_right():
    assert bidi.visual("i ye san joli ye") == "i ye san joli ye"
    assert bidi.visual("ߛߊ߲ 2024 ߦߋ") == "ߋߦ 2024 ߊ߲ߛ"
    assert bidi.visual("ߛߊ߲ (abc) ߦߋ") == "ߋߦ (abc) ߊ߲ߛ"  # parentheses mirrored in RTL text
    assert bidi.visual("run ߛߊ߲ ߦߋ ok") == "run ߋߦ ߊ߲ߛ ok"


def test_visual_strips_bidi_controls_and_applies_nfc():
    # U+07F2 (ccc 220) typed after a tone mark (ccc 230): NFC puts it first.
    assert bidi.visual("\u200fߛߊ\u07eb\u07f2") == bidi.visual("ߛߊ\u07f2\u07eb") == "ߊ\u07f2\u07ebߛ"


def test_visual_keeps_numbers_readable_next_to_nko():
    assert bidi.visual("ߛߊ 12.5 ߦߋ") == "ߋߦ 12.5 ߊߛ"  # W4: a separator between digits joins them
    assert bidi.visual("ߛߊ 1,000,000 ߦߋ") == "ߋߦ 1,000,000 ߊߛ"
    assert bidi.visual("ߛߊ 12:30 ߦߋ") == "ߋߦ 12:30 ߊߛ"
    assert bidi.visual("ߛߊ 50% ߦߋ") == "ߋߦ 50% ߊߛ"  # W5: terminators next to digits go with them
    assert bidi.visual("ߛߊ $5 ߦߋ") == "ߋߦ $5 ߊߛ"
    assert bidi.visual("ߛߊ 12. ߦߋ") == "ߋߦ .12 ߊߛ"  # W6: a full stop after the number is neutral
    assert bidi.visual("abc 12 ߛߊ") == "abc 12 ߊߛ"  # W7: digits after a Latin letter are Latin
    assert bidi.visual("ߛߊ abc 12 ߦߋ") == "ߋߦ abc 12 ߊߛ"  # ... also inside a right-to-left sentence
    assert bidi.visual("ߛߊ 12 ߦߋ 3.5% ߓߊ") == "ߊߓ 3.5% ߋߦ 12 ߊߛ"


def test_visual_lines_break_in_logical_order_then_reorder_each_line():
    def shown(text: str, width: int) -> list[str]:
        return ["".join(c for c, _ in line) for line in bidi.visual_lines(text, width)]

    # the first line holds the beginning of the sentence (its right end is the first word)
    assert shown("ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", 6) == ["ߋߦ ߌ", "ߊ߲ߛ", "ߌߟߏߖ", "ߋߦ"]
    assert shown("ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ", 100) == [bidi.visual("ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ")]
    assert shown("abc 12 ߛߊ ߦߋ", 9) == ["abc 12 ߊߛ", "ߋߦ"]  # levels come from the whole paragraph
    assert shown("ߖߏߟߌߖߏߟߌ", 4) == ["ߌߟߏߖ", "ߌߟߏߖ"]  # a word longer than the line is cut
    assert shown("", 10) == []


def test_mixed_nko_latin_digit_line_is_shown_in_uba_order():
    """One log-like line: N'Ko words, a Latin run id, a number with its separator and %, in
    the order UBA gives (python-bidi): the paragraph is right-to-left (first strong letter is
    N'Ko), Latin and numbers keep left-to-right order inside it."""
    line = "ߛߊ߲ run-7 ߦߋ 12.5% ok 3 ߓߊ"
    assert bidi.visual(line) == "ߊߓ ok 3 12.5% ߋߦ run-7 ߊ߲ߛ"
    # left-to-right paragraph: a number after N'Ko continues the right-to-left run (N1), as UBA says
    assert bidi.visual("epoch 3: ߛߊ߲ 40%") == "epoch 3: 40% ߊ߲ߛ"


mixed_letters = st.sampled_from([chr(c) for c in range(0x07CA, 0x07EB)] + list("ab12 .%$-+:,"))


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=mixed_letters, max_size=30))
def test_visual_agrees_with_python_bidi_display_without_marks(text):
    """Without combining marks (which we keep after their base, unlike a plain L2 reversal)
    the console shows what python-bidi's own get_display shows for the normalised line."""
    from bidi import algorithm

    flat = bidi.normalize(text)
    assert bidi.visual(text) == algorithm.get_display(flat)


nko_letters = st.sampled_from([chr(c) for c in range(0x07CA, 0x07EB)] + [" ", "ߒ", "1", "a"])
nko_marks = st.lists(st.sampled_from([chr(c) for c in range(0x07EB, 0x07F4)]), max_size=2)


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(nko_letters, nko_marks), max_size=30))
def test_reordering_moves_whole_clusters(parts):
    text = "".join(base + "".join(marks) for base, marks in parts)
    logical = bidi.units(text)
    shown = [c for c, _ in bidi.visual_clusters(text)]
    assert sorted(shown) == sorted(logical)  # a permutation of clusters: no mark moved off its base
    is_mark = [unicodedata.category(ch).startswith("M") for ch in "".join(shown)]
    for cluster in shown:  # a base followed by its marks; only a leading orphan mark starts one
        assert all(unicodedata.category(ch).startswith("M") for ch in cluster[1:])
        assert not unicodedata.category(cluster[0]).startswith("M") or cluster == logical[0]
    assert sum(is_mark) == sum(unicodedata.category(ch).startswith("M") for ch in "".join(logical))
    if bidi.paragraph_is_rtl(text) and not any(ch in "1a" for ch in text):
        assert shown == logical[::-1]


# --------------------------------------------------------------------------- queries

def test_matrix_query_counts_bundle_and_summarises_sync(state):
    from state.store import open_db

    db = open_db(state)
    runs = {r.id: r for r in queries.matrix(db)}
    assert runs["demo-nko-baseline"].artifacts == 9 and runs["demo-nko-baseline"].sync == "verified"
    assert runs["demo-nko-trajectory"].sync == "3 remote-only, 6 verified"
    assert runs["demo-latin-baseline"].artifacts == 4 and runs["demo-nko-tar"].sync == "—"
    detail = queries.run_detail(db, "demo-nko-baseline")
    assert len(detail.val_curve) == 12 and detail.val_curve[0] == (0, pytest.approx(3.6))
    assert detail.command.splitlines() == [  # promoted: its config sits next to the record
        "nko-ops train --config reports/promotions/demo-nko-baseline.config.json "
        "--out-dir runs/reproduce/demo-nko-baseline",
        "nko-ops evaluate --run work/demo/runs/demo-nko-baseline"]
    assert queries.run_detail(db, "demo-nko-trajectory").command.splitlines() == [  # completed, not promoted
        "nko-ops promote demo-nko-trajectory",
        "nko-ops train --config reports/promotions/demo-nko-trajectory.config.json "
        "--out-dir runs/reproduce/demo-nko-trajectory",
        "nko-ops evaluate --run work/demo/runs/demo-nko-trajectory"]
    assert queries.run_detail(db, "demo-latin-baseline").command == (  # not complete: through its matrix
        "nko-ops matrix run configs/matrix/demo.json --executor local --only demo-latin-baseline")
    assert queries.run_detail(db, "demo-nko-tar").command == (
        "nko-ops train --config work/demo/configs/demo-nko-tar.json")


def test_gate_filters(state):
    from state.store import open_db

    db = open_db(state)
    assert queries.gate_decisions(db).total == 5
    boundary = queries.gate_decisions(db, queries.GateFilter(partition="boundary"))
    assert [d.feat_id for d in boundary.rows] == ["bam_test_0003", "bam_test_0000"]
    rejected = queries.gate_decisions(db, queries.GateFilter(accepted=False))
    assert rejected.total == 3 and not any(d.accepted for d in rejected.rows)
    assert rejected.rows[0].rules == ("quarantine", "length_ratio")
    page = queries.gate_decisions(db, queries.GateFilter(limit=2, offset=2))
    assert page.total == 5 and [d.id for d in page.rows] == [3, 2]


def test_record_review_validates_and_stores(state):
    from state.agp import add_review
    from state.store import open_db

    db = open_db(state)
    with pytest.raises(ValueError, match="note"):
        add_review(db, 1, "override", "  ")
    with pytest.raises(ValueError, match="verdict"):
        add_review(db, 1, "maybe")
    with pytest.raises(ValueError, match="decision_id"):
        add_review(db, 999, "agree")
    assert db.execute("SELECT count(*) FROM reviews").fetchone()[0] == 0
    add_review(db, 1, "override", "tone mark was right", "ana")
    unreviewed = queries.gate_decisions(db, queries.GateFilter(unreviewed=True))
    assert unreviewed.total == 4 and 1 not in [d.id for d in unreviewed.rows]


def test_instances_budget_and_status(state):
    from state.store import open_db

    db = open_db(state)
    inst = {i.id: i for i in queries.instances(db, NOW)}
    assert inst["1000"].idle_s is None and inst["1000"].spend_usd == 5.0  # busy GPU: not idle
    # 0% util for the last hour, no heartbeat: idle since the GPU went low, not since it started
    assert inst["1001"].idle_s == 3600 and inst["1001"].uptime_s == 14400
    assert inst["1002"].status == "destroyed" and inst["1002"].uptime_s is None
    b = queries.budget(db)
    assert (b.cap_usd, b.spent_usd) == (100, 12.5)  # ledger 12.50 > samples 5.00 + 3.40 + 1.60
    s = queries.status(db, NOW)
    assert s.running_instances == 2
    assert "1 hung adapter run" in s.alerts and "1 failed run" in s.alerts


def test_spend_curve_samples_evenly_in_time(state, tmp_path):
    db = open_db(state)
    t10 = NOW - 7200  # the samples are at 10:00, 11:00, 12:00 and 13:00, for three instances
    curve = queries.spend_curve(db, points=4)
    assert [t for t, _ in curve] == [t10, t10 + 3600, t10 + 7200, t10 + 10800]
    assert [v for _, v in curve] == pytest.approx([2.5, 5.0, 7.5, 10.0])
    half = queries.spend_curve(db, points=7)  # between two polls the total stays where it was
    assert [t for t, _ in half] == [t10 + 1800 * k for k in range(7)]
    assert [v for _, v in half] == pytest.approx([2.5, 2.5, 5.0, 5.0, 7.5, 7.5, 10.0])
    assert len(queries.spend_curve(db)) == 200 and queries.spend_curve(db)[-1][1] == pytest.approx(10.0)
    assert queries.total_spend(db) == pytest.approx(10.0)
    empty = open_db(tmp_path / "empty.db")
    assert queries.spend_curve(empty) == () and queries.total_spend(empty) == 0.0


def _samples(db, instances: int, per_instance: int, rng: random.Random, gaps: bool = False) -> list[tuple]:
    """Cost samples of staggered instances over the same ten hours, inserted out of time order."""
    rows = []
    for i in range(instances):
        start, total = NOW + 1800 * i, 0.0
        for k in range(per_instance):
            total += rng.random()
            t = start + (36000 - 1800 * i) * k // max(per_instance - 1, 1)
            rows.append((f"i{i}", iso_ts(t), None if gaps and rng.random() < 0.1 else round(total, 4)))
    rng.shuffle(rows)
    with transaction(db):
        db.conn.executemany("INSERT INTO cost_samples(instance_id, ts, total_usd) VALUES (?, ?, ?)", rows)
    return rows


def test_spend_curve_matches_a_replay_of_every_sample(tmp_path):
    db = open_db(tmp_path / "state.db")
    rows = _samples(db, 5, 37, random.Random(7), gaps=True)
    curve = queries.spend_curve(db, points=50)

    def replay(t: float) -> float:  # each instance's latest total at t, summed
        latest: dict[str, tuple[str, float]] = {}
        for iid, ts, usd in rows:
            if usd is not None and queries._ts(ts) <= t and ts >= latest.get(iid, ("", 0.0))[0]:
                latest[iid] = (ts, usd)
        return sum(usd for _, usd in latest.values())

    timed = [queries._ts(ts) for _, ts, usd in rows if usd is not None]
    assert len(curve) == 50 and curve[0][0] == min(timed) and curve[-1][0] == max(timed)
    step = (curve[-1][0] - curve[0][0]) / 49
    assert all(abs(b - a - step) < 0.01 for (a, _), (b, _) in itertools.pairwise(curve))  # even, to the ms
    for t, v in curve:
        assert v == pytest.approx(replay(t)), t


def test_spend_queries_do_not_grow_with_the_samples(tmp_path):
    """The work SQLite does (virtual machine steps) for the curve and the total is the same
    for 100 and 3000 samples per instance: index seeks, never a scan of the samples."""
    def steps(n: int) -> tuple[int, int]:
        db = open_db(tmp_path / f"state-{n}.db")
        _samples(db, 4, n, random.Random(1))
        count = [0, 0]
        for k, query in enumerate((lambda: queries.spend_curve(db, points=100), lambda: queries.total_spend(db))):
            db.conn.set_progress_handler(lambda k=k: count.__setitem__(k, count[k] + 1), 10)  # returns None: go on
            query()
            db.conn.set_progress_handler(None, 10)
        return count[0], count[1]

    small, large = steps(100), steps(3000)
    assert large[0] < 1.3 * small[0] and large[1] < 1.3 * small[1] + 5, (small, large)


# --------------------------------------------------------------------------- pilot: panes

@pytest.mark.asyncio
async def test_every_pane_renders_on_a_populated_db(state):
    app = make_app(state)
    async with app.run_test(size=(140, 40)) as pilot:
        await settle(pilot)
        matrix = rows(app, "#matrix-table")
        assert [r[0] for r in matrix] == ["demo-nko-baseline", "demo-nko-trajectory", "demo-latin-baseline",
                                          "demo-nko-tar"]
        assert matrix[0][1:] == ["nko", "baseline", "42", "completed", "12", "0.9000", "0.8500 (11)", "20.57%",
                                 "9/9", "verified"]
        assert "nko-ops evaluate --run work/demo/runs/demo-nko-baseline" in text_of(app, "#matrix-command")
        # the finished runs of the matrix side by side: test CER in %
        assert app.query_one("#matrix-cer", Bars)._items == (("nko baseline s42", 20.57), ("nko trajectory s42", 23.57))
        status = text_of(app, "#status-bar")
        assert "$12.50 / $100.00" in status and "2 running instances" in status and "1 hung adapter run" in status

        await pilot.press("down", "down")  # detail follows the cursor
        await settle(pilot)
        assert "demo-latin-baseline" in text_of(app, "#matrix-summary")
        assert app.query_one("#matrix-curve").display

        await pilot.press("2")
        await settle(pilot)
        assert [r[0] for r in rows(app, "#gate-table")] == ["5", "4", "3", "2", "1"]
        diff = text_of(app, "#gate-diff")
        assert bidi.visual(DECISIONS[4][0]) in diff and bidi.visual(DECISIONS[4][1]) in diff
        assert "quarantine, length_ratio" in text_of(app, "#gate-info")

        await pilot.press("3")
        await settle(pilot)
        inst = rows(app, "#instances-table")
        assert [r[0] for r in inst] == ["1000", "1001", "1002"]
        assert inst[1][5:] == ["4h00m", "$3.40", "0%", "1h00m"]
        assert "$12.50 / $100.00 (12%)" in text_of(app, "#instances-budget")

        await pilot.press("4")
        await settle(pilot)
        adapters = rows(app, "#adapters-table")
        assert [(r[0], r[2]) for r in adapters] == [("tt-002", "hung"), ("tt-001", "completed")]
        assert adapters[0][3:] == ["mac-a, mac-b", "2", "200", "0.4000", "0.5077", "1,100", "20m00s ago"]
        assert "ranks stopped" in text_of(app, "#adapters-error")

        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)


@pytest.mark.asyncio
async def test_empty_db_shows_empty_states(tmp_path):
    """Each tab shows its message where its table would be: the message is on screen and the
    table and detail widgets take no room (an EmptyState is displayed by default, so only
    what the screen holds proves the pane decided)."""
    app = make_app(build(tmp_path / "state.db", runs=False, gate=False, cloud=False, adapters=False))
    hidden = {"matrix": ("#matrix-table", "#matrix-detail"), "gate": ("#gate-table", "#gate-detail"),
              "instances": ("#instances-table", "#instances-spend"),
              "adapters": ("#adapters-table", "#adapters-curve", "#adapters-error"), "logs": ("#logs-body",),
              "sync": ("#sync-runs", "#sync-header", "#sync-artifacts", "#sync-detail")}
    async with app.run_test(size=(120, 30)) as pilot:
        for key, (pane, widgets) in enumerate(hidden.items(), start=1):
            await pilot.press(str(key))
            await settle(pilot)
            await until(pilot, lambda w=widgets[0]: not app.query_one(w).display, what=f"the {pane} pane's first load")
            for w in widgets:
                assert not app.query_one(w).display and app.query_one(w).region.area == 0, w
            message = " ".join(str(app.query_one(f"#{pane}-empty", Static).render()).split())
            shown = " ".join(" ".join(screen_lines(app, f"#{pane}-empty")).split())
            assert message and message in shown, pane
        assert "no alerts" in text_of(app, "#status-bar")
        await pilot.press("3")
        await pilot.pause()
        assert "budget: none recorded" in " ".join(screen_lines(app, "#instances-budget"))


@pytest.mark.asyncio
async def test_wrapped_nko_diff_reads_from_its_first_line(tmp_path):
    """At a narrow width each sentence of the diff wraps: its first screen line holds its
    beginning (read right to left), the next line the rest."""
    path = build(tmp_path / "state.db", runs=False, gate=False, cloud=False, adapters=False)
    add_decision(path, LONG.replace("ߛߊ߲", "ߛߊ"), LONG, LONG)
    app = make_app(path)
    async with app.run_test(size=(60, 40)) as pilot:
        await pilot.press("2")
        await settle(pilot)
        await until(pilot, lambda: any(x.startswith("reference ") for x in screen_lines(app, "#gate-diff")),
                    what="the diff")
        lines = screen_lines(app, "#gate-diff")
        first = next(i for i, x in enumerate(lines) if x.startswith("reference "))
        rows_ = [lines[first]] + list(itertools.takewhile(lambda x: x.startswith(" " * 10) and x.strip(),
                                                          lines[first + 1:]))
        shown = [x[10:].strip() for x in rows_]
        assert len(shown) >= 2 and all(cell_len(x) <= 48 for x in shown)  # wrapped to the 48 cells left
        assert shown[0].endswith(bidi.visual("ߒ ߓߊ߯ ߕߊ߯"))  # the first words, at the right of the first line
        # every screen line read right to left, top line first, is the sentence
        assert " ".join(bidi.visual(x) for x in shown) == bidi.normalize(LONG)
        assert lines[0].startswith("ASR ") and lines[0].rstrip().endswith(bidi.visual("ߒ ߓߊ߯ ߕߊ߯"))
        assert "edits)" not in lines[0]  # the edit count follows the sentence's end, on its last line


@pytest.mark.asyncio
async def test_review_note_in_nko_is_shown_in_reading_order(tmp_path):
    path = build(tmp_path / "state.db", runs=False, gate=False, cloud=False, adapters=False)
    add_decision(path, "ߒ ߓߊ ߕߊ߯", "ߒ ߓߊ߯ ߕߊ߯", "ߒ ߓߊ߯ ߕߊ߯", note="ߓߊ߯ ߦߋ 12.5 ߘߌ\nwrong tone on ߕߊ߯")
    app = make_app(path)
    async with app.run_test(size=(140, 40)) as pilot:
        await pilot.press("2")
        await settle(pilot)
        await until(pilot, lambda: "review" in text_of(app, "#gate-info"), what="the decision's review")
        info = text_of(app, "#gate-info").splitlines()
        review = next(i for i, x in enumerate(info) if x.startswith("review"))
        assert info[review].rstrip() == "review override — ߌߘ 12.5 ߋߦ ߊ߯ߓ"
        assert info[review + 1].strip() == "wrong tone on " + bidi.visual("ߕߊ߯")  # each line its own paragraph


@pytest.mark.asyncio
async def test_gate_filter_keys(state):
    app = make_app(state)
    async with app.run_test(size=(140, 40)) as pilot:
        await pilot.press("2")
        await settle(pilot)
        await pilot.press("p")  # all -> stable
        await settle(pilot)
        assert [r[0] for r in rows(app, "#gate-table")] == ["3"]
        await pilot.press("p")  # -> boundary
        await settle(pilot)
        assert [r[0] for r in rows(app, "#gate-table")] == ["4", "1"]
        await pilot.press("d", "d")  # all -> accepted -> rejected
        await settle(pilot)
        assert rows(app, "#gate-table") == []
        assert "partition boundary" in text_of(app, "#gate-filter") and "rejected" in text_of(app, "#gate-filter")
        await pilot.press("p", "p", "p", "d")  # -> uncertain, novelty, all; rejected -> all
        await settle(pilot)
        assert len(rows(app, "#gate-table")) == 5


@pytest.mark.asyncio
async def test_gate_shows_acoustic_evidence_and_filters_accepted_but_worse(state):
    db = open_db(state)
    with transaction(db):  # an accepted proposal that moved the row away from its reference
        db.execute("INSERT INTO gate_decisions(feat_id, run_id, partition, accepted, rules, edit_distance, policy_hash, "
                   "witness, asr_text, proposal, reference_text, acoustic_delta, acoustic_margin, ref_edit_change) "
                   "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                   ["bam_test_0099", "demo-nko-trajectory", "boundary", 1, "[]", 1, "a1b2c3d4e5f60718" * 4, "f" * 64,
                    "ߞߏ ߓߍ߯ ߘߌ", "ߞߏ ߓߍ ߘߌ", "ߞߏ ߓߍ߯ ߘߌ", -0.031, 0.04, 1])
    db.close()
    app = make_app(state)
    async with app.run_test(size=(140, 40)) as pilot:
        await pilot.press("2")
        await settle(pilot)
        assert len(rows(app, "#gate-table")) == 6
        await pilot.press("w")
        await settle(pilot)
        table = rows(app, "#gate-table")
        assert [r[0] for r in table] == ["6"] and "-0.0310" in table[0] and "0.0400" in table[0]
        assert "accepted but worse only yes" in text_of(app, "#gate-filter")
        info = text_of(app, "#gate-info")
        assert "acoustic Δ -0.0310" in info and "margin 0.0400" in info
        await pilot.press("w")
        await settle(pilot)
        assert len(rows(app, "#gate-table")) == 6


@pytest.mark.asyncio
async def test_review_keys_store_verdicts(state):
    app = make_app(state)
    async with app.run_test(size=(140, 40)) as pilot:
        await pilot.press("2")
        await settle(pilot)
        await pilot.press("a")  # agree with decision 5 (cursor moves on to 4)
        await settle(pilot)
        await pilot.press("o")  # override decision 4: the modal asks for a note
        await pilot.pause()
        assert isinstance(app.screen, OverrideScreen)
        await pilot.press("enter")  # empty note refused
        await pilot.pause()
        assert isinstance(app.screen, OverrideScreen)
        app.screen.query_one("#override-note", Input).value = "ߓߍ߯ is right but ߘߌ߫ is a new tone"
        await pilot.press("enter")
        await settle(pilot)
        assert not isinstance(app.screen, OverrideScreen)
        await pilot.press("o", "escape")  # cancelled: nothing stored for decision 3
        await settle(pilot)

    from state.store import open_db

    db = open_db(state)
    got = [(r["decision_id"], r["verdict"], r["note"]) for r in db.query("SELECT * FROM reviews ORDER BY id")]
    assert got == [(5, "agree", None), (4, "override", "ߓߍ߯ is right but ߘߌ߫ is a new tone")]
    assert all(r["reviewer"] for r in db.query("SELECT reviewer FROM reviews"))


@pytest.mark.asyncio
async def test_review_shows_in_table_after_refresh(state):
    app = make_app(state)
    async with app.run_test(size=(140, 40)) as pilot:
        await pilot.press("2")
        await settle(pilot)
        await pilot.press("a")
        await settle(pilot)
        assert rows(app, "#gate-table")[0][-1] == "agree"
        await pilot.press("u")  # unreviewed only
        await settle(pilot)
        assert [r[0] for r in rows(app, "#gate-table")] == ["4", "3", "2", "1"]


@pytest.mark.asyncio
async def test_poll_picks_up_new_rows_without_blocking(state):
    from state.store import open_db, upsert_run

    app = ConsoleApp(state, interval=0.2, clock=lambda: NOW, cloud_poll=0)
    async with app.run_test(size=(140, 40)) as pilot:
        await settle(pilot)
        upsert_run(open_db(state), "demo-latin-tar", matrix_id="demo", script="latin", mode="tar", seed=7,
                   status="queued")
        await until(pilot, lambda: "demo-latin-tar" in [r[0] for r in rows(app, "#matrix-table")], what="the new run")
        assert rows(app, "#matrix-table")[-1][:5] == ["demo-latin-tar", "latin", "tar", "7", "queued"]

        table = app.query_one("#matrix-table", DataTable)
        table.move_cursor(row=2)
        upsert_run(open_db(state), "demo-latin-baseline", status="completed", epoch=6, test_cer=0.3166)
        await until(pilot, lambda: rows(app, "#matrix-table")[2][4] == "completed", what="the status update")
        assert rows(app, "#matrix-table")[2][4:6] == ["completed", "6"]
        assert rows(app, "#matrix-table")[2][8] == "31.66%"
        assert table.cursor_row == 2 and len(rows(app, "#matrix-table")) == 5  # updated in place


@pytest.mark.asyncio
async def test_polls_keep_running_while_a_dialog_is_open(state):
    """The poll timer ticks under a modal dialog; it must update the main screen, not look
    for the panes on the dialog (which once crashed the console after ``interval`` seconds)."""
    from state.store import open_db, upsert_run

    app = ConsoleApp(state, interval=0.05, clock=lambda: NOW, cloud_poll=0)
    async with app.run_test(size=(140, 40)) as pilot:
        await settle(pilot)
        await pilot.press("question_mark")
        await pilot.pause()
        assert isinstance(app.screen, HelpScreen)
        upsert_run(open_db(state), "demo-latin-tar", matrix_id="demo", script="latin", mode="tar", seed=7,
                   status="queued")
        await until(pilot, lambda: "demo-latin-tar" in [r[0] for r in rows(app, "#matrix-table")],
                    what="the new run, polled under the dialog (many ticks)")
        assert isinstance(app.screen, HelpScreen)
        assert "demo-latin-tar" in [r[0] for r in rows(app, "#matrix-table")]
        assert not app.error
        await pilot.press("escape")
        await pilot.pause()
        assert not isinstance(app.screen, HelpScreen)


@pytest.mark.asyncio
async def test_gate_paging(state):
    app = make_app(state)
    async with app.run_test(size=(140, 40)) as pilot:
        await pilot.press("2")
        gate = app.query_one("#gate", GatePane)
        gate.filter = queries.GateFilter(limit=2)
        await settle(pilot)
        await pilot.press("r")
        await settle(pilot)
        assert [r[0] for r in rows(app, "#gate-table")] == ["5", "4"]
        await pilot.press("right_square_bracket")
        await settle(pilot)
        assert [r[0] for r in rows(app, "#gate-table")] == ["3", "2"]
        assert "showing 3–4 of 5" in text_of(app, "#gate-filter")
        await pilot.press("right_square_bracket", "right_square_bracket")  # past the end: stays on the last page
        await settle(pilot)
        assert [r[0] for r in rows(app, "#gate-table")] == ["1"]
        await pilot.press("left_square_bracket")
        await settle(pilot)
        assert [r[0] for r in rows(app, "#gate-table")] == ["3", "2"]


@pytest.mark.asyncio
async def test_keys_are_answered_while_a_poll_is_stuck(state):
    """The UI thread never waits on the database: with a poll stuck in its worker, tabs
    switch and the help opens; the switched-to tab's refresh waits its turn and lands after."""
    app = make_app(state)
    async with app.run_test(size=(140, 40)) as pilot:
        await settle(pilot)
        started, release = threading.Event(), threading.Event()
        load_all = app.load_all

        def stuck(db, now, panes):
            started.set()
            release.wait(60)
            return load_all(db, now, panes)

        app.load_all = stuck
        try:
            app.refresh_panes()
            await until(pilot, started.is_set, what="the stuck poll")
            await pilot.press("2")
            await until(pilot, lambda: app.query_one("#tabs", TabbedContent).active == "tab-gate", what="tab 2")
            await pilot.press("question_mark")
            await until(pilot, lambda: isinstance(app.screen, HelpScreen), what="the help screen")
            assert not release.is_set() and app._polling  # all of that while the poll was still stuck
            await pilot.press("escape")
        finally:
            release.set()
        await settle(pilot)
        await until(pilot, lambda: rows(app, "#gate-table"), what="the gate tab's queued refresh")


@pytest.mark.asyncio
async def test_database_error_is_shown_not_fatal(tmp_path):
    bad = tmp_path / "state.db"
    bad.write_bytes(b"this is not a database" * 100)
    app = make_app(bad)
    async with app.run_test(size=(120, 30)) as pilot:
        await settle(pilot)
        assert "state.db error" in text_of(app, "#status-bar")
        assert app.is_running


@pytest.mark.asyncio
async def test_quit_does_not_wait_for_a_database_call_in_flight(state):
    """A read or write still running (a write can sit in SQLite's busy timeout for a minute)
    does not hold quitting up; it closes the connection itself when it is done."""
    app = make_app(state)
    started, release = threading.Event(), threading.Event()
    got: list = []

    def slow(db, now):
        started.set()
        release.wait(120)
        return db.execute("SELECT count(*) FROM runs").fetchone()[0]

    holder = threading.Thread(target=lambda: got.append(app.read(slow)))
    try:
        async with app.run_test(size=(120, 30)) as pilot:
            await settle(pilot)
            conn = app._db.conn
            holder.start()
            assert started.wait(30)
            quit_at = time.monotonic()
        waited = time.monotonic() - quit_at
        assert waited < 60, f"quitting waited {waited:.0f} s for the call in flight"
        assert holder.is_alive()  # still in flight: quitting did not wait for it
    finally:
        release.set()
        holder.join(60)
    assert got == [4] and app._db is None
    with pytest.raises(sqlite3.ProgrammingError):
        conn.execute("SELECT 1")  # closed by the call that held it


# --------------------------------------------------------------------------- snapshots

def _snapshot_run_before(keys: tuple[str, ...]):
    async def run_before(pilot) -> None:
        await settle(pilot)
        for k in keys:
            await pilot.press(k)
            await settle(pilot)
    return run_before


def test_snapshot_matrix(state, snap_compare):
    assert snap_compare(make_app(state), terminal_size=(130, 36), run_before=_snapshot_run_before(("down",)))


def test_snapshot_gate(state, snap_compare):
    assert snap_compare(make_app(state), terminal_size=(130, 36), run_before=_snapshot_run_before(("2", "down")))


def _table_and_plot_run_before(key: str, table: str, plot: str):
    """Open tab ``key`` and wait until its table and its plot hold data."""
    async def run_before(pilot) -> None:
        await settle(pilot)
        await pilot.press(key)
        await settle(pilot)
        await until(pilot, lambda: rows(pilot.app, table) and pilot.app.query_one(plot, Curve)._series,
                    what=f"{table} and {plot}")
    return run_before


def test_snapshot_instances(state, snap_compare):
    run_before = _table_and_plot_run_before("3", "#instances-table", "#instances-spend")
    assert snap_compare(make_app(state), terminal_size=(130, 40), run_before=run_before)


def test_snapshot_adapters(state, snap_compare):
    run_before = _table_and_plot_run_before("4", "#adapters-table", "#adapters-curve")
    assert snap_compare(make_app(state), terminal_size=(130, 36), run_before=run_before)
