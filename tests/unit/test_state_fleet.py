"""state/fleet.py and state/execution.py: JSON columns read with json_each / json_extract (not
LIKE), typed instance and cost records, and the migration that gives sanity runs a flag of
their own instead of a "#sanity" suffix on their ids."""

from __future__ import annotations

import sqlite3

from state import execution
from state import fleet as fleet_state
from state import store
from state.records import RunStatus


def _artifact(db, run_id: str, name: str, state: str, locations: list[dict]) -> None:
    store.record_artifacts(db, run_id, [{"name": name, "sha256": name[0] * 64, "size": 1, "sync_state": state,
                                         "locations": locations}])


def test_files_held_by_an_instance_are_matched_on_its_exact_id(tmp_path):
    db = store.open_db(tmp_path / "state.db")
    inst = lambda iid: {"kind": "instance", "instance_id": iid, "path": "/w/x"}  # noqa: E731
    _artifact(db, "r", "a.pt", "remote-only", [inst("1_3")])
    _artifact(db, "r", "b.pt", "transferring", [inst("123")])  # LIKE '%"1_3"%' would match this one too
    _artifact(db, "r", "c.pt", "verified", [inst("1_3")])  # verified here: nothing to lose
    _artifact(db, "r", "d.pt", "remote-only", [{"kind": "cas", "path": "/x"}, inst("1_3")])
    _artifact(db, "s", "e.pt", "remote-only", [])
    db.execute("UPDATE artifacts SET locations = ? WHERE name = 'e.pt'",  # written without spaces: same JSON
               ['[{"kind":"instance","instance_id":"1_3"}]'])
    assert sorted(fleet_state.unverified_on_instance(db, "1_3")) == ["r/a.pt", "r/d.pt", "s/e.pt"]
    assert fleet_state.unverified_on_instance(db, "123") == ["r/b.pt"]
    fleet_state.mark_missing(db, ["r/a.pt", "r/c.pt"])
    states = {r["name"]: r["sync_state"] for r in db.query("SELECT name, sync_state FROM artifacts")}
    assert states["a.pt"] == "missing" and states["c.pt"] == "verified"  # a verified file is never given up


def test_instance_records_and_cost_samples_are_typed(tmp_path):
    db = store.open_db(tmp_path / "state.db")
    with store.transaction(db):
        fleet_state.register_instance(db, "7", "run-x", "run-x", {"offer": {"dph_total": 0.4}, "remote_root": "/w/7"})
        fleet_state.update_instance(db, "7", {"actual_status": "running", "ssh_host": "h", "ssh_port": 22,
                                              "gpu_util": 3.5, "dph_total": 0.41})
        fleet_state.add_cost_sample(db, fleet_state.CostSample("7", "run-x", "t1", 0.41, 0.01, 60.0, 0.006, 0.0002))
        fleet_state.add_cost_sample(db, fleet_state.CostSample("7", "run-x", "t2", 0.41, 0.01, 120.0, 0.012, 0.0004))
    rec = fleet_state.instance(db, "7")
    assert (rec.label, rec.run_id, rec.actual_status, rec.ssh_port, rec.gpu_util) == ("run-x", "run-x", "running", 22, 3.5)
    assert rec.data == {"offer": {"dph_total": 0.4}, "remote_root": "/w/7"}
    assert fleet_state.is_ours(db, "7") and not fleet_state.is_ours(db, "8")
    assert [s.total_usd for s in fleet_state.cost_samples(db, "7")] == [0.0062, 0.0124]
    assert fleet_state.run_spend(db, "run-x") == 0.0124
    with store.transaction(db):
        fleet_state.mark_instance_gone(db, "7", "t3", "destroyed", {**rec.data, "gone": "destroyed"})
    assert fleet_state.live_instances(db) == [] and fleet_state.instance(db, "7").data["gone"] == "destroyed"


def test_budget_alerts_are_found_by_the_budget_name_in_the_event_data(tmp_path):
    db = store.open_db(tmp_path / "state.db")
    store.add_event(db, "warn", kind="budget-warn", data={"budget": "lab%", "spent_usd": 1.0})
    assert fleet_state.budget_alert_recorded(db, "budget-warn", "lab%")
    assert not fleet_state.budget_alert_recorded(db, "budget-warn", "lab")  # no wildcard matching
    assert not fleet_state.budget_alert_recorded(db, "budget-over", "lab%")


def test_sanity_runs_recorded_with_a_suffix_are_migrated_to_the_flag(tmp_path):
    path = tmp_path / "state.db"
    db = store.open_db(path)
    db.close()
    conn = sqlite3.connect(path, isolation_level=None)  # back to schema 3, as an older nko-ops left it
    conn.execute("DROP TABLE agp_results")  # migration 5
    conn.execute("ALTER TABLE runs DROP COLUMN sanity")
    conn.execute("DELETE FROM schema_migrations WHERE version >= 4")
    conn.execute("PRAGMA user_version = 3")
    conn.execute("INSERT INTO runs(id, matrix_id, status) VALUES ('r#sanity', 'm#sanity', 'completed'), "
                 "('r', 'm', 'completed')")
    conn.execute("INSERT INTO metrics(run_id, kind, epoch, name, value) VALUES ('r#sanity', 'epoch', 0, "
                 "'epoch_time_s', 2.5)")
    conn.execute("INSERT INTO events(run_id, message) VALUES ('r#sanity', 'x')")
    conn.close()
    db = store.open_db(path)
    rows = {r["id"]: (r["matrix_id"], r["sanity"]) for r in db.query("SELECT id, matrix_id, sanity FROM runs")}
    assert rows == {"r": ("m", 0), execution.sanity_run_id("r"): ("m", 1)}
    assert db.execute("SELECT run_id FROM metrics").fetchone()[0] == "_sanity/r"
    assert db.execute("SELECT run_id FROM events WHERE message = 'x'").fetchone()[0] == "_sanity/r"


def test_run_lifecycle_writes_take_the_status_enum(tmp_path):
    db = store.open_db(tmp_path / "state.db")
    execution.set_status(db, "r", RunStatus.QUEUED, "trained", matrix_id="m", executor="local")
    execution.update_run(db, "r", flags={"sanity": "passed"})
    execution.set_status(db, "r", RunStatus.RUNNING, "pid 1", pid=1)
    assert store.get_run(db, "r")["status"] == "running" and execution.run_flags(db, "r") == {"sanity": "passed"}
    assert execution.local_active_runs(db, "m") == [("r", 1)]
    msgs = [r["message"] for r in db.query("SELECT message FROM events WHERE kind = 'status' ORDER BY id")]
    assert msgs == ["new -> queued: trained", "queued -> running: pid 1"]
