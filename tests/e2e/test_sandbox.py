"""``nko-ops sandbox``, headless: the sandbox is built (emulator and sshd as its own
processes, a real Vast-executor run, an idle instance, a real 2-rank MLX ring, gate
decisions), the console is driven on it with Pilot (every pane has rows, everything is
labelled SANDBOX, kill-idle refuses while a file is unsynced and destroys after a sync), and
``stop`` leaves no process and nothing listening. No real API key is read at any point.

Also: the console, started in a fresh interpreter without a key, says "no provider" (the
vastai SDK, imported inside the running UI, used to fail on Textual's print capture)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from textual.widgets import Button

from pilot_helpers import rows, text_of, wait_for

REPO = Path(__file__).resolve().parents[2]

PANES = {"1": "#matrix-table", "2": "#gate-table", "3": "#instances-table", "4": "#adapters-table",
         "5": "#logs-sources", "6": "#sync-artifacts"}


@pytest.fixture
def decoy_home(tmp_path, monkeypatch):
    """A home whose vastai key files hold a 'real' key; every open of a vastai file under it
    is recorded (an audit hook), so the test can say the sandbox never read it."""
    home = tmp_path / "home"
    for f in (home / ".config" / "vastai" / "vast_api_key", home / ".vast_api_key"):
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("REAL-KEY-must-never-be-read\n")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    monkeypatch.delenv("VAST_API_KEY", raising=False)
    opened: list[str] = []

    def hook(event, args):
        if event == "open" and args and isinstance(args[0], (str, bytes, os.PathLike)):
            path = os.fsdecode(args[0])
            if path.startswith(str(home)) and "vast" in path:
                opened.append(path)

    sys.addaudithook(hook)  # cannot be removed; it only appends paths under this test's home
    yield home, opened
    home.rename(home.with_name("home-done"))  # later tests: nothing matches the prefix any more


@pytest.mark.slow
@pytest.mark.sshd
@pytest.mark.asyncio
async def test_sandbox_panes_kill_idle_and_clean_stop(tmp_path, monkeypatch, decoy_home):
    from backend.sandbox import build
    from state.store import open_db
    from backend.sandbox.procs import Record, alive, listening
    from backend.vast.emulator import _processes_in
    from backend.vast.provider import VastProvider
    from console.app import ConsoleApp
    from console.panes.instances import ConfirmDestroyScreen
    from console.panes.logs import LogsPane

    home, opened = decoy_home
    lines: list[str] = []
    root = tmp_path / "sb"
    t0 = time.monotonic()
    try:
        sb = build.start(root, log=lines.append, epochs=3, hang=False, live_epochs=40)
    except build.SandboxError as e:
        if "install OpenSSH" in str(e) and not os.environ.get("CI"):
            pytest.skip(str(e))
        raise
    built_s = time.monotonic() - t0
    p = sb.paths
    rec = Record(p.root)
    procs = {n: (v["pid"], v["started"]) for n, v in rec.data["processes"].items()}
    ports = dict(rec.data["ports"])
    assert set(procs) == {"sshd", "emulator", "executor"} and all(alive(*v) for v in procs.values())
    assert sb.console_command.startswith("nko-ops sandbox console")
    provider = VastProvider(p.key_file.read_text().strip(), sb.url)
    live = {r.id: r.label for r in provider.instances()}
    assert sb.idle_instance in live and build.LIVE_RUN_ID in live.values() and len(live) == 2

    try:
        for k, v in build.sandbox_env(p).items():  # what `nko-ops sandbox console` sets
            monkeypatch.setenv(k, v)
        app = ConsoleApp(p.db, interval=0.5, vast_settings=p.vast_toml, budget=p.budget_toml, cloud_poll=None)
        notes: list[str] = []
        notify = app.notify
        app.notify = lambda message, **kw: (notes.append(str(message)), notify(message, **kw))  # type: ignore
        async with app.run_test(size=(160, 48)) as pilot:
            await wait_for(pilot, lambda: "cloud polled" in str(app.cloud), what="the console's account poll")
            for key, table in PANES.items():
                await pilot.press(key)
                await wait_for(pilot, lambda: len(rows(app, table)) > 0, what=f"rows in {table}")
            bar = text_of(app, "#status-bar")
            assert bar.startswith("SANDBOX") and "budget" in bar
            assert "sandbox-nko-baseline" in [r[0] for r in rows(app, "#matrix-table")]
            assert any(r[2] == "completed" for r in rows(app, "#adapters-table"))
            assert any("verified" in " ".join(r) for r in rows(app, "#sync-artifacts"))

            # the live run's train.log, tailed over SSH, grows on screen
            app.open_logs("run", build.LIVE_RUN_ID)
            pane = app.query_one("#logs", LogsPane)
            await wait_for(pilot, lambda: "epoch" in pane.shown_text(), timeout=90, what="the live run's log")
            assert "SSH" in text_of(app, "#logs-header")
            first = pane.shown_text().count("\n")
            await wait_for(pilot, lambda: pane.shown_text().count("\n") > first, timeout=90, what="new log lines")

            await pilot.press("3")
            await wait_for(pilot, lambda: any(r[0] == sb.idle_instance and r[4] == "running"
                                              for r in rows(app, "#instances-table")), what="the idle instance")
            assert all(r[1].startswith("SANDBOX ") for r in rows(app, "#instances-table"))

            # kill-idle refuses while the unsynced file is on the instance, naming it
            await pilot.press("k")
            await wait_for(pilot, lambda: isinstance(app.screen, ConfirmDestroyScreen), timeout=60,
                           what="the kill-idle dialog")
            dialog = app.screen
            body = text_of(dialog, "#destroy-body")
            assert f"instance {sb.idle_instance}" in body and f"{build.IDLE_RUN_ID}/{build.IDLE_FILE}" in body
            assert "REFUSED" in text_of(dialog, "#destroy-verdict")
            assert dialog.query_one("#destroy-ok", Button).disabled
            # then works after a sync
            await pilot.press("s")
            await wait_for(pilot, lambda: not dialog.busy and not dialog.query_one("#destroy-ok", Button).disabled,
                           timeout=60, what="the sync")
            assert "nothing is lost" in text_of(dialog, "#destroy-body")
            await pilot.click("#destroy-ok")
            await wait_for(pilot, lambda: any("destroyed" in n for n in notes), timeout=60, what="the destroy")
            await wait_for(pilot, lambda: [r[4] for r in rows(app, "#instances-table") if r[0] == sb.idle_instance]
                           == ["destroyed"], what="the destroyed row")

        # gone from the emulator; at most the live run's instance is left on the account
        assert provider.instance(sb.idle_instance) is None
        assert {r.label for r in provider.instances()} <= {build.LIVE_RUN_ID}
        db = open_db(p.db)
        assert db.execute("SELECT destroyed_at FROM instances WHERE id = ?", [sb.idle_instance]).fetchone()[0]
        db.close()
    finally:
        stopped = build.stop(root, log=lines.append)
    # stop destroyed the rest (and checked the account was empty before stopping the emulator)
    db = open_db(p.db)
    assert db.execute("SELECT count(*) FROM instances WHERE destroyed_at IS NULL").fetchone()[0] == 0
    db.close()

    assert {s.split()[0] for s in stopped} >= {"sshd", "emulator", "executor"}
    time.sleep(0.2)
    assert not any(alive(*v) for v in procs.values()), procs
    assert not any(listening(port) for port in ports.values()), ports
    assert _processes_in(p.disks) == []
    assert opened == [], f"the sandbox read the user's vastai key file: {opened}"
    assert "REAL-KEY" not in "".join(f.read_text(errors="ignore") for f in p.root.rglob("*.toml"))
    print(f"\nsandbox built in {built_s:.0f}s")


def test_console_without_a_key_says_no_provider_in_a_fresh_interpreter(tmp_path):
    """vastai reads sys.stdout.encoding when first imported; inside the running UI (Textual's
    print capture) that used to fail as a 'configuration error'."""
    from test_console import build as build_db

    db = build_db(tmp_path / "state.db")
    script = """
import asyncio, sys
from console.app import ConsoleApp

async def main():
    app = ConsoleApp(sys.argv[1], interval=3600, vast_settings="configs/vast.toml", budget="configs/budget.toml")
    async with app.run_test() as pilot:
        for _ in range(400):
            await pilot.pause(0.05)
            if str(app.cloud):
                break
        sys.__stdout__.write("CLOUD: " + str(app.cloud) + "\\n")
        sys.__stdout__.write("NOTES: " + " | ".join(str(n.message) for n in app._notifications) + "\\n")

asyncio.run(main())
"""
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("VAST_API_KEY", "XDG_CONFIG_HOME")}
    env["HOME"] = str(home)
    out = subprocess.run([sys.executable, "-c", script, str(db)], cwd=REPO, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "CLOUD: cloud not polled (no provider)" in out.stdout, out.stdout + out.stderr[-2000:]
    assert "encoding" not in out.stdout and "configuration error" not in out.stdout


def test_start_refuses_a_directory_that_is_not_a_sandbox(tmp_path):
    """The sandbox empties its directory: one that holds anything else is refused, untouched."""
    from backend.sandbox import build

    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(build.SandboxError, match="not a sandbox directory|install OpenSSH"):
        build.start(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    assert build.stop(tmp_path, log=lambda s: None) == []


def test_record_stops_its_processes_and_their_children_by_pid(tmp_path):
    from backend.sandbox.procs import Record, alive, descendants, start_time

    proc = subprocess.Popen(["sh", "-c", "sleep 300 & sleep 300 & wait"], start_new_session=True)
    rec = Record(tmp_path)
    rec.add_process("shell", proc.pid)
    deadline = time.monotonic() + 10
    while len(descendants(proc.pid)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    children = descendants(proc.pid)
    assert len(children) == 2
    unrelated = subprocess.Popen(["sleep", "300"])
    try:
        stopped = Record(tmp_path).stop_all(grace_s=3)  # read back from sandbox.json, as `stop` does
        proc.wait(5)
        assert stopped[0] == f"shell (pid {proc.pid})" and len(stopped) == 3
        assert not any(alive(pid) for pid in children)
        assert alive(unrelated.pid, start_time(unrelated.pid))  # nothing it did not start
        assert Record(tmp_path).data["processes"] == {}
    finally:
        unrelated.kill()
        unrelated.wait()
