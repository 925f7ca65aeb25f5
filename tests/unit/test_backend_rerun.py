"""Reruns on constructed bundles, no trainer started: a matrix partly trained on Vast finished
by the local executor and promoted with local paths, refusals that write nothing, a
promotion completed after a failure, and the executor's paging through trainer output."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from backend import executor_local
from state import store
from backend.executor import ExecutorError, Job
from backend.executor_local import LocalExecutor, Trainer
from backend.matrix_run import load_and_resolve, register_matrix, run_matrix
from backend.matrix import config_sha256
from backend.promote import promote
from backend.runs import import_run, register_bundle, verify_bundle
from backend.vast.remote import remote_config, run_inputs
from backend_helpers import make_corpus, matrix_dict, write_bundle
from models.config import load_config

REF = "ߌ ߦߋ ߛߊ߲ ߖߏߟߌ ߦߋ"


def _matrix(tmp: Path, run_ids: list[str], name: str = "m", corpus: dict | None = None) -> tuple:
    """(matrix file, Matrix, Identity, corpus) for baseline N'Ko runs ``run_ids``."""
    corpus = corpus or make_corpus(tmp / "data", n=60)
    raw = matrix_dict(corpus, tmp / f"runs-{name}", [{"run_id": r, "script": "nko", "mode": "baseline", "seed": 1}
                                                    for r in run_ids], matrix_id=name)
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(raw))
    m, ident = load_and_resolve(path)
    return path, m, ident, corpus


def _bundle(d: Path, corpus: dict, run_id: str, config: dict) -> Path:
    test = corpus["split_obj"].test
    return write_bundle(d, corpus, run_id, "nko", "baseline", 1, {f: REF for f in test}, {f: REF for f in test},
                        config=config)


def _local_config(m, ident, run_id: str) -> dict:
    return LocalExecutor(m, ident, None).config(m.run(run_id))


def _vast_config(m, ident, run_id: str, **changes) -> dict:
    """The config as a Vast instance ran it: paths relative to the instance (data/…, runs/<id>)."""
    local = _local_config(m, ident, run_id)
    return {**remote_config(local, run_inputs(local)[1]), **changes}


def _count(db, table: str) -> int:
    return db.execute(f"SELECT count(*) FROM {table}").fetchone()[0]


# --------------------------------------------------------------------------- Vast bundles, locally

def test_a_matrix_trained_on_vast_is_finished_locally_and_promoted_with_local_paths(tmp_path):
    mpath, m, ident, corpus = _matrix(tmp_path, ["on-vast"])
    local, remote = _local_config(m, ident, "on-vast"), _vast_config(m, ident, "on-vast")
    assert remote["snapshot"].startswith("data/snapshot-") and remote["out_dir"] == "runs/on-vast"
    d = _bundle(m.out_dir(m.run("on-vast")), corpus, "on-vast", remote)
    dbp = tmp_path / "state.db"
    db = store.open_db(dbp)  # what the Vast executor leaves: launched with the local config, bundle registered
    register_matrix(db, m, ident)
    store.set_run_status(db, "on-vast", "running", "on Vast instance 1", executor="vast", matrix_id="m",
                         config=local, config_sha256=config_sha256(local), out_dir=str(d.resolve()))
    register_bundle(db, verify_bundle(d), "on-vast", "vast", "m")

    (r,) = run_matrix(mpath, dbp, log=lambda s: None)  # the Vast budget stopped: finish locally
    assert (r.status, r.how) == ("completed", "reused")
    assert store.get_run(db, "on-vast")["executor"] == "vast"

    out = tmp_path / "promo"
    rec = json.loads(promote("on-vast", dbp, out).read_text())
    assert rec["config"] == remote  # the record keeps what the trainer ran
    assert rec["reproduce"]["config_paths"] == {k: local[k] for k in ("snapshot", "split", "features", "out_dir")}
    cfg = json.loads((out / "on-vast.config.json").read_text())
    assert cfg == local and cfg["snapshot_sha256"] == corpus["snapshot_sha256"]
    assert load_config(out / "on-vast.config.json").snapshot == corpus["snapshot"]
    assert all(Path(cfg[k]).exists() for k in ("snapshot", "split", "features"))

    mpath.unlink()  # without the matrix file: the config the executor launched it with
    promote("on-vast", dbp, tmp_path / "promo2")
    assert json.loads((tmp_path / "promo2" / "on-vast.config.json").read_text()) == local


def test_a_bundle_from_vast_must_still_match_the_matrix_apart_from_its_paths(tmp_path):
    mpath, m, ident, corpus = _matrix(tmp_path, ["lr", "snap", "recipe"])
    train = dict(_local_config(m, ident, "lr").get("train") or {}, lr=0.5)
    _bundle(m.out_dir(m.run("lr")), corpus, "lr", _vast_config(m, ident, "lr", train=train))
    _bundle(m.out_dir(m.run("snap")), corpus, "snap", _vast_config(m, ident, "snap", snapshot_sha256="0" * 64))
    _bundle(m.out_dir(m.run("recipe")), dict(corpus, recipe_hash="f" * 64), "recipe",
            _vast_config(m, ident, "recipe"))
    with pytest.raises(ExecutorError) as e:
        run_matrix(mpath, tmp_path / "state.db", log=lambda s: None)
    msg = str(e.value)
    assert "run 'lr' completed with a different config" in msg
    assert "run 'snap' completed with a different config" in msg
    assert "run 'recipe':" in msg and "feature_recipe_hash" in msg and "fails verification" in msg


# --------------------------------------------------------------------------- refusals write nothing

def test_a_refused_matrix_writes_nothing(tmp_path):
    # a new state store: one bundle to reuse, one completed with another config
    mpath, m, ident, corpus = _matrix(tmp_path, ["done", "changed"])
    _bundle(m.out_dir(m.run("done")), corpus, "done", _local_config(m, ident, "done"))
    _bundle(m.out_dir(m.run("changed")), corpus, "changed", _vast_config(m, ident, "changed", seed=9))
    dbp = tmp_path / "state.db"
    with pytest.raises(ExecutorError, match="run 'changed' completed with a different config"):
        run_matrix(mpath, dbp, log=lambda s: None)
    assert not dbp.exists()
    assert sorted(os.listdir(m.out_root)) == ["changed", "done"]  # no lock file either

    # an existing store, out_root not made yet: an imported run whose bundle changed since
    mpath2, m2, ident2, _ = _matrix(tmp_path, ["imported", "new"], name="m2", corpus=corpus)
    src = _bundle(tmp_path / "published" / "imported", corpus, "imported", _local_config(m2, ident2, "imported"))
    db = store.open_db(dbp)
    import_run(db, src, "imported", m2, ident2)
    (src / "train.log").write_text("edited\n")
    before = (_count(db, "runs"), _count(db, "events"), _count(db, "matrices"))
    with pytest.raises(ExecutorError, match="run 'imported': its imported bundle .* no longer verifies"):
        run_matrix(mpath2, dbp, log=lambda s: None)
    assert not Path(m2.out_root).exists()
    assert (_count(db, "runs"), _count(db, "events"), _count(db, "matrices")) == before == (1, 1, 0)
    assert store.get_run(db, "new") is None


# --------------------------------------------------------------------------- promotion

def test_promote_completes_a_promotion_interrupted_before_its_row(tmp_path, monkeypatch):
    mpath, m, ident, corpus = _matrix(tmp_path, ["p"])
    dbp, out = tmp_path / "state.db", tmp_path / "promo"
    db = store.open_db(dbp)
    import_run(db, _bundle(tmp_path / "pub" / "p", corpus, "p", _local_config(m, ident, "p")), "p", m, ident)

    def fail(*a, **k):
        raise RuntimeError("disk full")

    import state.promotions

    monkeypatch.setattr(state.promotions, "add_event", fail)  # the last step fails: its transaction rolls back
    with pytest.raises(RuntimeError, match="disk full"):
        promote("p", dbp, out)
    monkeypatch.undo()
    assert (out / "p.json").exists() and (out / "p.config.json").exists()
    assert _count(db, "promotions") == 0

    path = promote("p", dbp, out)  # the rerun adds the missing row
    row = next(iter(db.query("SELECT * FROM promotions")))
    assert (row["run_id"], row["path"]) == ("p", str(path)) and _count(db, "promotions") == 1
    assert db.execute("SELECT count(*) FROM events WHERE kind = 'promotion'").fetchone()[0] == 1
    config = (out / "p.config.json").read_text()
    assert json.loads(config) == json.loads(path.read_text())["config"]

    (out / "p.config.json").unlink()  # a missing file is written again; nothing is added twice
    assert promote("p", dbp, out) == path
    assert (out / "p.config.json").read_text() == config and _count(db, "promotions") == 1


# --------------------------------------------------------------------------- trainer output

def test_poll_stores_every_output_line_and_advances_only_over_them(tmp_path, monkeypatch):
    mpath, m, ident, corpus = _matrix(tmp_path, ["r"])
    db = store.open_db(tmp_path / "state.db")
    ex = LocalExecutor(m, ident, db)
    job = Job(m.run("r"), {}, tmp_path / "run")
    t = ex.trainers["r"] = Trainer(None, tmp_path / "r.out")
    monkeypatch.setattr(executor_local, "LOG_CHUNK", 4096)  # many chunks in one poll
    lines = [f"line {i} " + "x" * 50 for i in range(500)]
    t.out_file.write_text("\n".join(lines) + "\npartial")

    def logged() -> list[str]:
        return [r["message"] for r in db.query("SELECT message FROM events WHERE kind = 'log' ORDER BY id")]

    ex.ingest(job)
    done = len(("\n".join(lines) + "\n").encode())
    assert logged() == lines
    assert t.out_offset == store.get_run(db, "r")["log_offset"] == done  # the partial line waits

    with open(t.out_file, "a") as f:
        f.write(" now complete\n" + "y" * 10_000 + "\n")  # a line longer than a chunk: stored in pieces
    ex.ingest(job)
    new = logged()[500:]
    assert new[0] == "partial now complete" and len(new) == 4 and all(s.startswith("y") for s in new[1:])
    assert t.out_offset == t.out_file.stat().st_size
    ex.ingest(job)
    assert len(logged()) == 504
