"""The state layer (``state/``): one writer per table, typed records, JSON columns queried
with json_extract, and every write atomic without a caller's transaction."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest

from models.errors import NkoOpsError
from state import agp as state_agp
from state import store
from state.adapters import add_metric_lines, attempt_progress, adapter_run, set_status
from state.data import record_snapshot, record_split
from state.promotions import record_promotion
from state.records import AdapterRun, AdapterStatus, Artifact, GateDecision, Proposal, Review, Run, RunStatus, SyncState

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def db(tmp_path):
    d = store.open_db(tmp_path / "state.db")
    yield d
    d.close()


def _pair(feat_id: str, run_id: str = "run1", witness: str = "w", accepted: bool = True,
          rules: tuple[str, ...] = ()) -> tuple[Proposal, GateDecision]:
    return (Proposal(feat_id, "ߌ ߦߋ", run_id, "oracle"),
            GateDecision(feat_id, accepted, run_id, "boundary", rules, 1, "policy", witness, "ߌ ߦߍ", "ߌ ߦߋ",
                         "ߌ ߦߋ", None, None, -1))


# --------------------------------------------------------------------------- reviews: one writer

def test_review_notes_are_stored_stripped_and_blank_ones_as_null(db):
    ids = state_agp.record_decisions(db, [_pair("A"), _pair("B"), _pair("C")])
    a = state_agp.add_review(db, ids[0], "agree", "", "")
    b = state_agp.add_review(db, ids[1], "agree", "   ", "  ana ")
    c = state_agp.add_review(db, ids[2], "override", "  tone mark was right \n", "ana")
    got = {r.id: r for r in state_agp.reviews(db)}
    assert (got[a].note, got[a].reviewer) == (None, None)
    assert (got[b].note, got[b].reviewer) == (None, "ana")
    assert (got[c].verdict, got[c].note) == ("override", "tone mark was right")
    assert state_agp.reviews(db, ids[2]) == [got[c]] and isinstance(got[c], Review)
    assert db.execute("SELECT count(*) FROM reviews WHERE note = '' OR reviewer = ''").fetchone()[0] == 0


def test_a_refused_review_names_the_field_and_writes_nothing(db):
    (did,) = state_agp.record_decisions(db, [_pair("A")])
    cases = [((did, "override", " \t "), "note: an override needs a note"),
             ((did, "override", None), "note: an override needs a note"),
             ((did, "maybe"), "verdict must be one of agree, override; got 'maybe'"),
             ((999, "agree"), "decision_id: no gate decision with id 999")]
    for args, message in cases:
        with pytest.raises(state_agp.ReviewError, match=re.escape(message)) as e:
            state_agp.add_review(db, *args)
        assert isinstance(e.value, NkoOpsError) and isinstance(e.value, ValueError)
    assert db.execute("SELECT count(*) FROM reviews").fetchone()[0] == 0


def test_the_cli_and_the_console_store_reviews_the_same_way(tmp_path):
    """`nko-ops agp review` and the Gate pane both go through state.agp.add_review; the
    console's query module has no writer of its own."""
    from typer.testing import CliRunner

    import console.queries
    from cli.root import app

    path = tmp_path / "state.db"
    db = store.open_db(path)
    (did,) = state_agp.record_decisions(db, [_pair("A")])
    db.close()
    out = CliRunner().invoke(app, ["agp", "review", "--decision", str(did), "--verdict", "agree", "--note", "  ",
                                   "--reviewer", "ana", "--db", str(path)])
    assert out.exit_code == 0, out.output
    out = CliRunner().invoke(app, ["agp", "review", "--decision", str(did), "--verdict", "override", "--note", " ",
                                   "--db", str(path)])
    assert out.exit_code == 2 and "an override needs a note" in out.output
    db = store.open_db(path)
    assert [(r.verdict, r.note, r.reviewer) for r in state_agp.reviews(db, did)] == [("agree", None, "ana")]
    assert not hasattr(console.queries, "record_review")
    gate_pane = (ROOT / "console" / "panes" / "gate.py").read_text(encoding="utf-8")
    assert "state_agp.add_review(" in gate_pane


# --------------------------------------------------------------------------- proposals and decisions

def test_decisions_are_stored_once_per_witness_and_read_back_typed(db):
    ids = state_agp.record_decisions(db, [_pair("A", rules=("quarantine",), accepted=False), _pair("B")])
    again = state_agp.record_decisions(db, [_pair("A", rules=("quarantine",), accepted=False), _pair("B")])
    assert again == ids and db["gate_decisions"].count == 2 and db["proposals"].count == 2
    d = state_agp.decision(db, ids[0])
    assert isinstance(d, GateDecision) and d.accepted is False and d.rules == ("quarantine",)
    assert d.proposal_id is not None and d.ref_edit_change == -1 and d.id == ids[0]
    assert Proposal.from_row(db["proposals"].get(d.proposal_id)).proposer == "oracle"
    assert state_agp.decision(db, 999) is None


def test_record_decisions_is_atomic_without_a_callers_transaction(db):
    bad = (Proposal("X", "p", "run1"), GateDecision("Y", True, "run1", witness="w"))
    with pytest.raises(ValueError, match="paired with decision for 'Y'"):
        state_agp.record_decisions(db, [_pair("A"), bad])  # the first pair was inserted, then rolled back
    assert db["gate_decisions"].count == 0 and db["proposals"].count == 0
    assert not db.conn.in_transaction


# --------------------------------------------------------------------------- snapshots and splits

def test_snapshot_and_split_writers_fill_what_the_other_did_not_know(db):
    # an imported bundle first (no path, no row count; the split's seed from split.json) ...
    record_snapshot(db, "snap")
    record_split(db, "split", "snap", seed=42, train=8, val=1, test=1)
    # ... then the matrix (the paths and the snapshot's rows, no seed)
    record_snapshot(db, "snap", "data/sample", 10)
    record_split(db, "split", "snap", path="work/split.json", train=8, val=1, test=1)
    assert db["snapshots"].get("snap")["path"] == "data/sample" and db["snapshots"].get("snap")["rows"] == 10
    s = db["splits"].get("split")
    assert (s["seed"], s["path"], s["train"], s["val"], s["test"]) == (42, "work/split.json", 8, 1, 1)
    # a known value is never overwritten
    record_snapshot(db, "snap", "elsewhere", 99)
    record_split(db, "split", "other", seed=7, path="x.json")
    assert db["snapshots"].get("snap")["path"] == "data/sample" and db["snapshots"].get("snap")["rows"] == 10
    s = db["splits"].get("split")
    assert (s["snapshot_sha256"], s["seed"], s["path"]) == ("snap", 42, "work/split.json")


def test_snapshot_and_split_in_the_other_order_end_the_same(db):
    record_snapshot(db, "snap", "data/sample", 10)
    record_split(db, "split", "snap", path="work/split.json", train=8, val=1, test=1)
    record_snapshot(db, "snap")
    record_split(db, "split", "snap", seed=42, train=8, val=1, test=1)
    s = db["splits"].get("split")
    assert (s["seed"], s["path"]) == (42, "work/split.json") and db["snapshots"].get("snap")["rows"] == 10


# --------------------------------------------------------------------------- promotions

def test_a_promotion_is_recorded_once_with_its_event(db):
    assert record_promotion(db, "run1", "reports/promotions/run1.json", "abc") is True
    assert record_promotion(db, "run1", "reports/promotions/run1.json", "abc") is False
    assert db["promotions"].count == 1
    events = list(db.query("SELECT kind, run_id, message FROM events WHERE kind = 'promotion'"))
    assert events == [{"kind": "promotion", "run_id": "run1", "message": "promoted: reports/promotions/run1.json"}]


# --------------------------------------------------------------------------- typed records, JSON columns

def test_runs_and_artifacts_read_back_as_typed_records(db):
    store.set_run_status(db, "r1", "completed", matrix_id="m", seed=3, flags={"manifest": "absent"},
                         config={"epochs": 2})
    store.record_artifacts(db, "r1", [{"name": "b.txt", "path": "/x/b.txt", "sha256": "bb", "size": 2},
                                      {"name": "a.txt", "path": "/x/a.txt", "sha256": "aa", "size": 1,
                                       "sync_state": "verified"}])
    run = store.run(db, "r1")
    assert isinstance(run, Run) and run.status is RunStatus.COMPLETED and run.seed == 3
    assert run.flags == {"manifest": "absent"} and run.config == {"epochs": 2}
    assert store.run(db, "nope") is None
    arts = store.artifacts(db, "r1")
    assert [a.name for a in arts] == ["a.txt", "b.txt"] and all(isinstance(a, Artifact) for a in arts)
    assert arts[0].sync_state is SyncState.VERIFIED and arts[1].sync_state is SyncState.LOCAL
    assert arts[1].locations == ({"kind": "local", "path": "/x/b.txt"},)


def test_recorded_hashes_match_the_flags_json_key_not_its_text(db):
    from backend.runs import recorded_hashes

    store.set_run_status(db, "imported", "completed", flags={"manifest": "absent"})
    store.record_artifacts(db, "imported", [{"name": "a.txt", "path": "/a", "sha256": "aa", "size": 1}])
    # the same text inside another key (a LIKE '%"manifest": "absent"%' would match it)
    store.set_run_status(db, "noted", "completed", flags={"note": '"manifest": "absent"'})
    store.record_artifacts(db, "noted", [{"name": "a.txt", "path": "/a", "sha256": "aa", "size": 1}])
    assert recorded_hashes(db, "imported") == {"a.txt": {"sha256": "aa", "size": 1}}
    assert recorded_hashes(db, "noted") is None and recorded_hashes(db, "missing") is None


def test_attempt_progress_reads_rank_events_of_the_current_attempt_only(db):
    set_status(db, "ad1", "running", world_size=2, attempt=1, hosts=["127.0.0.1"])
    launched = db.execute("SELECT max(ts) FROM events WHERE adapter_run_id = 'ad1'").fetchone()[0]

    def rank_event(data: object) -> None:
        store.add_events(db, [{"adapter_run_id": "ad1", "kind": "rank", "source": "thunder", "message": "rank",
                               "data": data, "ts": launched}])

    rank_event({"rank": 0, "attempt": 0, "kind": "done"})  # an earlier attempt: ignored
    rank_event({"rank": 0, "attempt": 1, "kind": "error", "error": "out of memory"})
    rank_event({"rank": 1, "kind": "done"})  # no attempt number: the current one
    rank_event({"rank": "1", "attempt": 1, "kind": "error"})  # not an integer rank: no rank's
    rank_event({"rank": 1, "attempt": None, "kind": "error"})  # an attempt that is not this one
    p = attempt_progress(db, "ad1", attempt=1, world_size=2)
    assert p.errors == {0: "out of memory"} and p.done == {1}
    rank_event({"rank": 1, "attempt": 1, "kind": "error"})
    assert attempt_progress(db, "ad1", attempt=1, world_size=2).errors == {0: "out of memory", 1: "error"}


def test_adapter_runs_read_back_typed_and_metrics_are_idempotent(db):
    set_status(db, "ad1", "running", world_size=2, hosts=["a", "b"], offsets={"0": 10})
    lines = [{"kind": "train", "rank": 0, "iteration": 10, "train_loss": 2.5, "time": 1.0},
             {"kind": "train", "rank": 0, "iteration": 10, "train_loss": 2.5, "time": 1.0}]
    assert add_metric_lines(db, "ad1", lines, iteration=10) == 2
    assert db["adapter_metrics"].count == 1
    run = adapter_run(db, "ad1")
    assert isinstance(run, AdapterRun) and run.status is AdapterStatus.RUNNING and run.iteration == 10
    assert run.hosts == ["a", "b"] and run.offsets == {"0": 10} and adapter_run(db, "none") is None


# --------------------------------------------------------------------------- every write in state/

# Files whose SQL another part of issue 12 moves into state/fleet.py and state/execution.py
# (the executors and the Vast fleet), and the sandbox's record of destroyed instances, which
# goes through the fleet's writer once that exists. Nothing else may write.
PENDING_ELSEWHERE: set[str] = set()
_WRITE_SQL = re.compile(r"""["'](?:[^"']*\s)?(INSERT|UPDATE|DELETE|REPLACE)\s+(OR\s+\w+\s+)?(INTO|FROM|\w+\s+SET)\b""")


def test_no_sql_write_outside_the_state_layer():
    found = []
    for package in ("backend", "agp", "console", "models"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in PENDING_ELSEWHERE:
                continue
            for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
                if _WRITE_SQL.search(line):
                    found.append(f"{rel}:{n}: {line.strip()}")
    assert found == []


def test_the_state_layer_imports_only_stdlib_sqlite_utils_and_model_leaves():
    allowed = {"state", "sqlite_utils", "models.errors", "models.files"}
    for path in sorted((ROOT / "state").glob("*.py")):
        for line in path.read_text(encoding="utf-8").splitlines():
            m = re.match(r"\s*(?:from\s+([\w.]+)\s+import|import\s+([\w.]+))", line)
            if not m:
                continue
            mod = m.group(1) or m.group(2)
            top = mod.split(".")[0]
            if top in ("agp", "backend", "console", "cli") or (top == "models" and mod not in allowed):
                pytest.fail(f"{path.name} imports {mod}")
            if top not in ("state", "sqlite_utils", "models", "__future__"):
                assert top in sys.stdlib_module_names, f"{path.name} imports {mod}"


def test_json_columns_are_never_matched_with_like():
    for package in ("state", "backend", "agp", "console"):
        for path in sorted((ROOT / package).rglob("*.py")):
            rel = path.relative_to(ROOT).as_posix()
            if rel in PENDING_ELSEWHERE:
                continue
            text = path.read_text(encoding="utf-8")
            assert not re.search(r"\bLIKE\b", text), rel
