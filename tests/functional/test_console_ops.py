"""The console's cloud actions, live logs and sync, headless, against the Vast emulator
(through the real vastai SDK) and a real OpenSSH sshd (tests/vast_helpers.py): kill idle
refused while a file is unsynced and allowed after a sync, with the instance really gone
from the emulator; log lines appended on the sshd side appearing on screen; the sync pane's
states and retry; what the actions say without a provider."""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time

import pytest
from textual.widgets import Button, DataTable

from state import store
from console.app import ConsoleApp
from console.panes.instances import ConfirmDestroyScreen, OrphansScreen
from console import bidi
from console.panes.logs import Line, LogsPane
from console.panes.sync import SyncPane
from test_console import LONG, NOW, build
from pilot_helpers import rows, text_of, wait_for
from vast_helpers import write_remote, write_user_configs


class App(ConsoleApp):
    """The console, remembering its notifications."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.notes: list[str] = []

    def notify(self, message, **kwargs) -> None:  # type: ignore[override]
        self.notes.append(str(message))
        super().notify(message, **kwargs)


def sha(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def corrupt(f, n: int) -> bytes:
    b = bytearray(f.read(n))
    if b:
        b[0] ^= 0xFF
    return bytes(b)


@pytest.fixture
def console_cfg(vast_env, tmp_path) -> dict:
    """configs/vast.toml and configs/budget.toml for the emulator, as a user writes them."""
    settings, budget = write_user_configs(vast_env, tmp_path, "ssh_timeout_s = 10.0\n[idle]\ngpu_util_below = 5.0\n"
                                                              "window_s = 0.3\nheartbeat_timeout_s = 2.0")
    return {"db_path": vast_env.tmp / "state" / "state.db", "vast_settings": settings, "budget": budget}


def make_app(cfg: dict, interval: float = 0.5, cloud_poll: float | None = 0) -> App:
    """The console on the emulator; its own account polling is off unless asked for, so each
    test decides when the account is looked at."""
    return App(cfg["db_path"], interval=interval, vast_settings=cfg["vast_settings"], budget=cfg["budget"],
               cloud_poll=cloud_poll)


async def ready(pilot) -> None:
    """Wait for the first refresh (a tab switched before it would be switched back)."""
    await wait_for(pilot, lambda: pilot.app.status is not None or pilot.app.error, timeout=30, what="the first refresh")


def artifact_state(db, run_id: str, name: str) -> str | None:
    r = db.execute("SELECT sync_state FROM artifacts WHERE run_id = ? AND name = ?", [run_id, name]).fetchone()
    return r[0] if r else None


# --------------------------------------------------------------------------- kill idle, destroy, sweep

@pytest.mark.asyncio
async def test_kill_idle_refused_while_unsynced_then_allowed_after_sync(vast_env, console_cfg):
    row = vast_env.new_instance("run-x", "run-x")
    iid = str(row.id)
    data = os.urandom(200_000)
    write_remote(vast_env, iid, "run-x/best.pt", data)
    # instance rows and the start of its low GPU utilisation, 0.4 s ago: past the idle window
    # (0.3 s) by the time the console looks; no trainer heartbeat
    earlier = vast_env.fresh_fleet(lambda: time.time() - 0.4)
    earlier.poll()
    earlier.close()

    app = make_app(console_cfg)
    async with app.run_test(size=(150, 45)) as pilot:
        await ready(pilot)
        await pilot.press("3")
        fleet = app.ops.fleet()
        fleet.syncer.read_block = corrupt  # every transfer arrives damaged: nothing can be verified
        await pilot.press("k")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDestroyScreen), what="the kill-idle dialog")
        dialog = app.screen
        body = text_of(dialog, "#destroy-body")
        assert f"instance {iid}" in body and "idle: GPU below 5%" in body
        assert "1 of its 1 file(s) have no verified local copy and would be LOST" in body
        assert "run-x/best.pt" in body and "195.3 KB" in body
        assert "REFUSED" in text_of(dialog, "#destroy-verdict")
        assert dialog.query_one("#destroy-ok", Button).disabled
        dialog._confirm()  # even if the button could be pressed: nothing happens
        await pilot.pause()
        assert app.screen is dialog and vast_env.provider.instance(iid) is not None

        await pilot.press("s")  # sync now: the transfer fails its sha256 check, still refused
        await wait_for(pilot, lambda: not dialog.busy, what="the failed sync")
        assert any("NOT synced" in n for n in app.notes)
        assert "run-x/best.pt" in text_of(dialog, "#destroy-body")
        assert dialog.query_one("#destroy-ok", Button).disabled
        assert artifact_state(vast_env.db, "run-x", "best.pt") == "remote-only"
        assert not fleet.cas.has(sha(data))

        fleet.syncer.read_block = lambda f, n: f.read(n)  # the link is healthy again
        await pilot.press("s")
        await wait_for(pilot, lambda: not dialog.busy, what="the sync")
        assert "all 1 file(s) on its disk are verified in the local store: nothing is lost" in \
            text_of(dialog, "#destroy-body")
        ok = dialog.query_one("#destroy-ok", Button)
        assert not ok.disabled and str(ok.label) == "Destroy 1 instance"
        await pilot.click("#destroy-ok")
        await wait_for(pilot, lambda: any("destroyed" in n for n in app.notes), what="the destroy")
        assert app.screen is not dialog
        await wait_for(pilot, lambda: ["destroyed"] == [r[4] for r in rows(app, "#instances-table") if r[0] == iid],
                       what="the destroyed row")

    assert vast_env.provider.instance(iid) is None  # really gone from the emulator
    assert not vast_env.instance_dir(iid).exists()
    assert fleet.cas.path(sha(data)).read_bytes() == data
    assert artifact_state(vast_env.db, "run-x", "best.pt") == "verified"
    ev = vast_env.db.execute("SELECT message FROM events WHERE kind = 'instance-destroyed' AND instance_id = ?",
                             [iid]).fetchone()
    assert ev and "idle" in ev[0] and "every file verified locally" in ev[0]


@pytest.mark.asyncio
async def test_poll_sweep_and_orphan_destroy_refused(vast_env, console_cfg):
    known = vast_env.new_instance("run-k", "run-k")
    orphan = str(vast_env.provider.create(1003, "img", 20, label="made by hand"))
    app = make_app(console_cfg)
    async with app.run_test(size=(150, 45)) as pilot:
        await ready(pilot)
        await pilot.press("3")
        await pilot.press("p")  # poll the account: both instances enter state.db
        await wait_for(pilot, lambda: {str(known.id), orphan} <= {r[0] for r in rows(app, "#instances-table")},
                       what="the polled instances")
        assert any("2 instance(s) on the account" in n for n in app.notes)

        await pilot.press("o")
        await wait_for(pilot, lambda: isinstance(app.screen, OrphansScreen), what="the orphan list")
        body = text_of(app.screen, "#orphans-body")
        assert f"ORPHAN {orphan}" in body and "made by hand" in body and str(known.id) not in body
        await pilot.press("escape")
        await pilot.pause()

        table = app.query_one("#instances-table", DataTable)
        table.move_cursor(row=[r[0] for r in rows(app, "#instances-table")].index(orphan))
        await pilot.press("x")
        await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDestroyScreen), what="the destroy dialog")
        assert "left alone: not created by nko-ops" in text_of(app.screen, "#destroy-body")
        assert app.screen.query_one("#destroy-ok", Button).disabled
        await pilot.press("escape")
    assert vast_env.provider.instance(orphan) is not None


@pytest.mark.asyncio
async def test_console_polls_the_account_by_itself(vast_env, console_cfg):
    """With a provider configured the console polls the account every budget poll_interval_s
    (5 s in console_cfg): an instance created after it opened, and its cost, appear without a key."""
    app = make_app(console_cfg, interval=0.2, cloud_poll=None)
    async with app.run_test(size=(150, 45)) as pilot:
        await ready(pilot)
        await pilot.press("3")
        await wait_for(pilot, lambda: "cloud polled" in str(app.cloud), timeout=30, what="the first account poll")
        # Created on the account behind the console's back: only a poll can bring it into state.db.
        iid = str(vast_env.provider.create(1003, "img", 20, label="started elsewhere"))
        dph = vast_env.provider.instance(iid).usd_per_h

        def polled_row() -> list[str] | None:
            return next((r for r in rows(app, "#instances-table") if r[0] == iid and r[3] != "—"), None)

        await wait_for(pilot, polled_row, timeout=30, what="the new instance, polled in the background")
        assert polled_row()[3] == f"{dph:.3f}"
        assert "cloud polled" in text_of(app, "#status-bar")
        assert not any("polling the Vast account" in n for n in app.notes)  # nobody pressed p
    assert vast_env.db.execute("SELECT label FROM instances WHERE id = ?", [iid]).fetchone()[0] == "started elsewhere"


def test_a_users_action_waits_for_the_background_poll(console_cfg):
    """The console's own poll never makes a key press fail with 'busy'; two user actions at once still do."""
    from console.ops import Ops, OpsBusy

    ops = Ops(console_cfg["db_path"], console_cfg["vast_settings"], console_cfg["budget"])
    try:
        with ops.action("poll", background=True):
            done: list[str] = []
            t = threading.Thread(target=lambda: done.append(ops.poll()))
            t.start()
            time.sleep(0.3)
            assert not done  # waiting, not refused
        t.join(30)
        assert done and "instance(s) on the account" in done[0]
        with ops.action("sync"):
            with pytest.raises(OpsBusy, match="sync is still running"):
                ops.poll()
            with pytest.raises(OpsBusy):
                ops.poll(background=True)
    finally:
        ops.close()


@pytest.mark.asyncio
async def test_actions_without_a_provider_say_so(tmp_path, monkeypatch):
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no vastai key file either
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path / "home" / ".config"))
    path = build(tmp_path / "state.db")
    app = App(path, interval=3600, clock=lambda: NOW, vast_settings=tmp_path / "absent.toml",
              budget=tmp_path / "absent-budget.toml")
    async with app.run_test(size=(140, 40)) as pilot:
        await ready(pilot)
        await wait_for(pilot, lambda: "no provider" in str(app.cloud), what="the background poll giving up")
        app.refresh_panes()
        await wait_for(pilot, lambda: "cloud not polled (no provider)" in text_of(app, "#status-bar"))
        assert not app.notes  # said once, quietly, in the status bar
        await pilot.press("3")
        for key in ("p", "k", "x", "o"):
            app.notes.clear()
            await pilot.press(key)
            await wait_for(pilot, lambda: any("no Vast provider configured" in n for n in app.notes), timeout=20,
                           what=f"the message for {key}")
            assert any("VAST_API_KEY" in n for n in app.notes)
            assert app.is_running and not isinstance(app.screen, ConfirmDestroyScreen)
        await pilot.press("6")
        sync = app.query_one("#sync", SyncPane)
        await wait_for(pilot, lambda: sync.selected is not None, what="the Sync pane's first load")
        app.notes.clear()
        await pilot.press("s")  # sync retry of the selected run
        await wait_for(pilot, lambda: any("no Vast provider configured" in n or "no Vast instance" in n
                                          for n in app.notes), timeout=20, what="the sync message")


# --------------------------------------------------------------------------- logs

@pytest.mark.asyncio
async def test_log_lines_from_a_real_sshd_tail(vast_env, console_cfg):
    row = vast_env.new_instance("run-log", "run-log")
    iid = str(row.id)
    store.upsert_run(vast_env.db, "run-log", executor="vast", instance_id=iid, status="running")
    store.add_event(vast_env.db, "trainer started on instance", run_id="run-log", instance_id=iid,
                    kind="trainer-start", source="vast")
    vast_env.fleet.poll()  # the instance's SSH address into state.db
    log = vast_env.instance_dir(iid) / "runs" / "run-log" / "train.log"
    log.parent.mkdir(parents=True)
    log.write_text("epoch 1 loss 2.50\n")

    def append(text: str) -> None:
        with open(log, "a") as f:
            f.write(text)

    app = make_app(console_cfg, interval=3600)
    async with app.run_test(size=(160, 40)) as pilot:
        await ready(pilot)
        app.open_logs("run", "run-log")
        pane = app.query_one("#logs", LogsPane)
        await wait_for(pilot, lambda: "epoch 1 loss 2.50" in pane.shown_text(), timeout=30, what="the first line")
        header = text_of(app, "#logs-header")
        assert "SSH" in header and "run-log/train.log" in header and "following" in header
        assert "[trainer-start] trainer started on instance" in pane.shown_text()  # the run's events too

        append("epoch 2 loss 2.10\nhalf a li")
        await wait_for(pilot, lambda: "epoch 2 loss 2.10" in pane.shown_text(), what="an appended line")
        assert "half a li" not in pane.shown_text()  # only complete lines
        append("ne\n")
        await wait_for(pilot, lambda: "half a line" in pane.shown_text(), what="the completed line")

        await pilot.press("f")  # pause: lines are counted, not shown
        append("epoch 3 loss 1.90\n")
        await wait_for(pilot, lambda: pane.unseen == 1, what="the line received while paused")
        assert "epoch 3" not in pane.shown_text() and "paused (1 new line)" in text_of(app, "#logs-header")
        await pilot.press("f")
        await pilot.pause()
        assert "epoch 3 loss 1.90" in pane.shown_text() and "following" in text_of(app, "#logs-header")

        await pilot.press("slash")
        await pilot.press(*"LOSS 2.1", "enter")
        await pilot.pause()
        assert pane.shown_text().splitlines() == ["epoch 2 loss 2.10"]
        assert "search 'LOSS 2.1': 1 of" in text_of(app, "#logs-header")
        await pilot.press("escape")
        await pilot.pause()
        assert "epoch 3 loss 1.90" in pane.shown_text() and "epoch 1 loss 2.50" in pane.shown_text()

        # The lane's follower stores the same lines as 'log' events: not shown a second time;
        # its other events are.
        store.add_events(vast_env.db, [{"run_id": "run-log", "kind": "log", "source": "trainer",
                                        "message": "epoch 1 loss 2.50"},
                                       {"run_id": "run-log", "instance_id": iid, "kind": "sync", "level": "error",
                                        "source": "vast", "message": "sync from instance: 1 NOT synced"}])
        await wait_for(pilot, lambda: "[sync] sync from instance: 1 NOT synced" in pane.shown_text(),
                       what="the sync event")
        assert pane.shown_text().count("epoch 1 loss 2.50") == 1
    # the console only reads: the lines it showed were not written into state.db
    assert vast_env.db.execute("SELECT count(*) FROM events WHERE kind = 'log'").fetchone()[0] == 1


@pytest.mark.asyncio
async def test_local_run_logs_come_from_events(tmp_path):
    path = build(tmp_path / "state.db")
    db = store.open_db(path)
    store.add_events(db, [{"run_id": "demo-latin-baseline", "kind": "log", "source": "trainer",
                           "message": f"epoch {e} train_loss {3 / (e + 1):.3f}"} for e in range(5)])
    app = App(path, interval=3600, clock=lambda: NOW, cloud_poll=0)
    async with app.run_test(size=(160, 40)) as pilot:
        await ready(pilot)
        await pilot.press("1", "down", "down")  # the running local run, then l in the Matrix tab
        await pilot.pause()
        await pilot.press("l")
        pane = app.query_one("#logs", LogsPane)
        await wait_for(pilot, lambda: "epoch 4 train_loss 0.600" in pane.shown_text(), timeout=20, what="history")
        assert pane.source.id == "demo-latin-baseline" and "events in state.db" in text_of(app, "#logs-header")
        store.add_event(db, "epoch 5 train_loss 0.500", run_id="demo-latin-baseline", kind="log", source="trainer")
        await wait_for(pilot, lambda: "epoch 5 train_loss 0.500" in pane.shown_text(), timeout=20, what="a new event")
        assert pane.shown_text().splitlines()[:2] == ["epoch 0 train_loss 3.000", "epoch 1 train_loss 1.500"]
    db.close()


@pytest.mark.asyncio
async def test_nko_log_lines_are_shown_in_reading_order(tmp_path):
    """Log lines and event messages holding N'Ko are reordered for display, a long one
    wrapped first so that it reads from its first screen line down."""
    path = build(tmp_path / "state.db")
    db = store.open_db(path)
    store.add_events(db, [{"run_id": "demo-latin-baseline", "kind": "log", "source": "trainer", "message": m}
                          for m in ("start", "ߛߊ߲ 12.5 ߦߋ", f"{LONG} {LONG}", "end")] +
                     [{"run_id": "demo-latin-baseline", "kind": "note", "source": "vast", "message": "ߌ ߦߋ ߛߊ߲"}])
    db.close()
    app = App(path, interval=3600, clock=lambda: NOW, cloud_poll=0)
    async with app.run_test(size=(100, 40)) as pilot:
        await ready(pilot)
        app.open_logs("run", "demo-latin-baseline")
        pane = app.query_one("#logs", LogsPane)
        await wait_for(pilot, lambda: "[note]" in pane.shown_text(), timeout=20, what="the events")
        lines = [x.strip() for x in pane.shown_text().splitlines()]
        assert lines[1] == "ߋߦ 12.5 ߊ߲ߛ"
        wrapped = lines[2:lines.index("end")]
        assert len(wrapped) >= 2  # 123 cells: wider than the log view
        assert " ".join(bidi.visual(x) for x in wrapped) == f"{LONG} {LONG}"
        assert lines[-1].endswith("[note] " + bidi.visual("ߌ ߦߋ ߛߊ߲"))


@pytest.mark.asyncio
async def test_reopening_a_source_shows_each_line_once(tmp_path, monkeypatch):
    """l pressed twice on the same run: the first tail, cancelled while it held a batch of
    new lines, must not add them next to the second tail's copy."""
    path = build(tmp_path / "state.db")
    db = store.open_db(path)
    store.add_events(db, [{"run_id": "demo-latin-baseline", "kind": "log", "source": "trainer",
                           "message": f"epoch {e}"} for e in range(3)])
    app = App(path, interval=3600, clock=lambda: NOW, cloud_poll=0)
    async with app.run_test(size=(160, 40)) as pilot:
        await ready(pilot)
        app.open_logs("run", "demo-latin-baseline")
        pane = app.query_one("#logs", LogsPane)
        await wait_for(pilot, lambda: "epoch 2" in pane.shown_text(), timeout=20, what="the history")
        first = next(w for w in app.workers if w.group == "logs-tail" and not w.is_finished)

        held, release = threading.Event(), threading.Event()
        of = Line.of.__func__

        def slow_of(cls, e):  # the first tail stalls holding the new line, before it posts it
            if e.message == "epoch 3" and not held.is_set():
                held.set()
                release.wait(30)
            return of(cls, e)

        monkeypatch.setattr(Line, "of", classmethod(slow_of))
        store.add_event(db, "epoch 3", run_id="demo-latin-baseline", kind="log", source="trainer")
        await wait_for(pilot, held.is_set, timeout=20, what="the first tail holding the new line")
        app.open_logs("run", "demo-latin-baseline")  # the same source again
        await wait_for(pilot, lambda: "epoch 3" in pane.shown_text(), timeout=20, what="the second tail's history")
        release.set()
        await wait_for(pilot, lambda: first.is_finished, timeout=20, what="the first tail to end")
        await pilot.pause()
        assert pane.shown_text().splitlines().count("epoch 3") == 1
        assert [line.text for line in pane.lines].count("epoch 3") == 1
    db.close()


# --------------------------------------------------------------------------- sync

@pytest.mark.asyncio
async def test_sync_pane_states_alert_and_retry(vast_env, console_cfg):
    row = vast_env.new_instance("run-s", "run-s")
    iid = str(row.id)
    store.upsert_run(vast_env.db, "run-s", executor="vast", instance_id=iid, status="running")
    weights, log = os.urandom(300_000), b"epoch 1\nepoch 2\n"
    write_remote(vast_env, iid, "run-s/best.pt", weights)
    write_remote(vast_env, iid, "run-s/train.log", log)
    vast_env.fleet.syncer.read_block = corrupt  # the lane's sync fails (damaged transfers)
    [rep] = vast_env.fleet.sync_instance(row)
    assert not rep.ok

    app = make_app(console_cfg)
    async with app.run_test(size=(160, 45)) as pilot:
        await ready(pilot)
        await pilot.press("6")
        await wait_for(pilot, lambda: rows(app, "#sync-artifacts"), what="the artifact table")
        assert rows(app, "#sync-runs")[0][:4] == ["run-s", "running", iid, "2"]
        arts = {r[0]: r for r in rows(app, "#sync-artifacts")}
        assert arts["best.pt"][1] == "remote-only" and arts["best.pt"][3] == sha(weights)[:16]
        assert arts["train.log"][1] == "remote-only" and arts["train.log"][2] == "16 B"
        assert "sync failed for 1 run (run-s)" in text_of(app, "#status-bar")
        assert "NOT synced" in text_of(app, "#sync-header")
        assert sha(weights) in text_of(app, "#sync-detail")  # full hash of the highlighted file

        await pilot.press("s")  # retry through the console's own fleet (healthy transfers)
        await wait_for(pilot, lambda: any("2 file(s) verified locally" in n for n in app.notes), what="the retry")
        await wait_for(pilot, lambda: {r[1] for r in rows(app, "#sync-artifacts")} == {"verified"},
                       what="verified states")
        assert rows(app, "#sync-runs")[0][5] == "verified"
        assert "cas" in rows(app, "#sync-artifacts")[0][4] and f"instance {iid}" in rows(app, "#sync-artifacts")[0][4]
        assert "sync failed" not in text_of(app, "#status-bar")
    assert (vast_env.settings.cas_dir / "sha256" / sha(weights)[:2] / sha(weights)).read_bytes() == weights
    assert json.loads(vast_env.db.execute("SELECT data FROM events WHERE kind = 'sync' ORDER BY id DESC LIMIT 1")
                      .fetchone()[0])["failed"] == []


# --------------------------------------------------------------------------- snapshots

def test_snapshot_sync(tmp_path, snap_compare):
    path = build(tmp_path / "state.db")

    async def run_before(pilot) -> None:
        await ready(pilot)
        await pilot.press("6")
        await wait_for(pilot, lambda: rows(pilot.app, "#sync-artifacts"), timeout=20)
        await pilot.press("down")  # the second run (3 remote-only, 6 verified)
        await wait_for(pilot, lambda: "demo-nko-trajectory" in text_of(pilot.app, "#sync-header"), timeout=20)

    assert snap_compare(App(path, interval=3600, clock=lambda: NOW, cloud_poll=0), terminal_size=(130, 36), run_before=run_before)


def test_snapshot_logs(tmp_path, snap_compare):
    path = build(tmp_path / "state.db")
    db = store.open_db(path)
    store.add_events(db, [{"run_id": "demo-latin-baseline", "kind": "log", "source": "trainer",
                           "ts": "2025-01-02T11:5%d:00.000Z" % e, "message": f"epoch {e} train_loss {3 / (e + 1):.3f}"}
                          for e in range(5)] +
                     [{"run_id": "demo-latin-baseline", "kind": "sync", "level": "error", "source": "vast",
                       "ts": "2025-01-02T11:59:30.000Z", "message": "sync from instance 1001: 1 NOT synced"}])
    db.close()

    async def run_before(pilot) -> None:
        await ready(pilot)
        await pilot.press("5")
        await wait_for(pilot, lambda: rows(pilot.app, "#logs-sources"), timeout=20, what="the log sources")
        pilot.app.open_logs("run", "demo-latin-baseline")
        pane = pilot.app.query_one("#logs", LogsPane)
        await wait_for(pilot, lambda: "NOT synced" in pane.shown_text(), timeout=20)
        await pilot.press("slash", *"epoch", "enter")
        await wait_for(pilot, lambda: "NOT synced" not in pane.shown_text(), timeout=20)
        table = pilot.app.query_one("#logs-sources", DataTable)
        await wait_for(pilot, lambda: rows(pilot.app, "#logs-sources")[table.cursor_row][0] == "run demo-latin-baseline",
                       timeout=20, what="the cursor on the followed run")

    assert snap_compare(App(path, interval=3600, clock=lambda: NOW, cloud_poll=0), terminal_size=(130, 36), run_before=run_before)
