"""The AGP lane over a matrix: the backend hands agp the completed bundles it finds through
state.db (a run imported from another directory where it lives, not under the matrix's
out_root), a run that cannot go to the lane is named with the reason, the lane records its
per-run result in state.db, and the tables (written after the lane) end with that result."""

from __future__ import annotations

import json

import pytest
import torch

import train_helpers as H
from backend.agp_lane import lane_bundles, run_matrix_lane
from backend.matrix import load_matrix
from backend.runs import import_run
from backend.tables import write_tables
from models.config import parse_config
from models.train import train
from state import store
from state.agp_results import agp_results

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def imported(tmp_path_factory) -> dict:
    """A real N'Ko run trained outside the matrix's out_root, imported into a state store."""
    root = tmp_path_factory.mktemp("agp-lane")
    cfg = H.build(root / "data")
    cfg.update(run_id="nko-imp", out_dir=str(root / "elsewhere" / "nko-imp"))
    cfg["train"].update(epochs=3, batch_size=4, lr=1e-2)
    run_dir = train(parse_config(cfg), echo=False)
    results = json.loads((run_dir / "results.json").read_text(encoding="utf-8"))
    matrix = {"matrix_id": "lane", "snapshot": cfg["snapshot"], "snapshot_sha256": results["snapshot_sha256"],
              "split": cfg["split"], "split_sha256": results["split_sha256"], "features": cfg["features"],
              "recipe_hash": results["feature_recipe_hash"], "out_root": str(root / "runs"),
              "defaults": {"model": {"preset": "tiny"}, "device": "cpu"},
              "agp_dumps": ["nko-imp", "nko-never-run", "latin-imp"],
              "runs": [{"run_id": "nko-imp", "script": "nko", "mode": "baseline", "seed": 7},
                       {"run_id": "nko-never-run", "script": "nko", "mode": "trajectory", "seed": 7},
                       {"run_id": "latin-imp", "script": "latin", "mode": "baseline", "seed": 7}]}
    mpath = root / "matrix.json"
    mpath.write_text(json.dumps(matrix), encoding="utf-8")
    db_path = root / "state.db"
    db = store.open_db(db_path)
    try:
        import_run(db, run_dir, matrix=load_matrix(mpath))
    finally:
        db.close()
    return {"root": root, "run_dir": run_dir, "matrix": mpath, "db": db_path, "cfg": cfg}


def test_an_imported_run_goes_to_the_lane_from_where_it_lives(imported):
    m = load_matrix(imported["matrix"])
    assert not (m.out_dir(m.run("nko-imp")) / "test_predictions.jsonl").exists()  # not under out_root
    said: list[str] = []
    bundles = lane_bundles(m, imported["db"], log=said.append)
    assert [(b.run_id, b.dir, b.features) for b in bundles] == [("nko-imp", imported["run_dir"].resolve(),
                                                                 m.features)]
    # the runs that cannot go are named with the reason, never skipped silently
    assert any("nko-never-run left out: no test_predictions.jsonl (not completed in state.db" in s for s in said)
    assert any("latin-imp left out: a latin run" in s for s in said)
    # without state.db the lane would only look under out_root: nothing to hand over, and it says so
    with pytest.raises(FileNotFoundError, match="no completed N'Ko run"):
        run_matrix_lane(imported["matrix"], imported["cfg"]["split"], imported["cfg"]["snapshot"],
                        imported["root"] / "agp-none", imported["root"] / "absent.db", log=lambda s: None,
                        calibrate=False, proposers=("lexicon",))


def test_lane_result_reaches_state_db_and_the_tables_last(imported):
    root, db_path = imported["root"], imported["db"]
    write_tables(imported["matrix"], root / "before", db_path)
    before = (root / "before" / "lane-tables.md").read_text(encoding="utf-8")
    assert "AGP gate per run" not in before

    lanes = run_matrix_lane(imported["matrix"], imported["cfg"]["split"], imported["cfg"]["snapshot"], root / "agp",
                            db_path, log=lambda s: None, calibrate=False, proposers=("lexicon",))
    summary = lanes["nko-imp"]["proposers"]["lexicon"]
    db = store.open_db(db_path, read_only=True)
    try:
        (res,) = agp_results(db)
        parts = agp_results(db, partition=None)
    finally:
        db.close()
    o = summary["overall"]
    assert (res.run_id, res.proposer, res.rows, res.accepted) == ("nko-imp", "lexicon", o["rows"], o["accepted"])
    assert (res.cer_before, res.cer_gated, res.policy_hash) == (o["cer_before"], o["cer_after"],
                                                                summary["policy_hash"])
    assert {p.partition for p in parts} == {"overall"} | {p for p, g in summary["partitions"].items() if g["rows"]}

    write_tables(imported["matrix"], root / "after", db_path)
    after = (root / "after" / "lane-tables.md").read_text(encoding="utf-8")
    assert after.startswith(before)  # the tables as before, byte for byte, then the new section
    section = after[len(before):]
    assert section.startswith("\n## AGP gate per run (state.db)\n")
    row = next(line for line in section.splitlines() if line.startswith("| nko-imp |"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[:6] == ["nko-imp", "lexicon", str(o["rows"]), str(o["accepted"]), f"{100 * o['cer_before']:.2f}",
                         f"{100 * o['cer_after']:.2f}"]
    assert cells[-1] == f"`{summary['policy_hash'][:12]}`"

    # a rerun of the lane replaces the run's record instead of adding to it
    run_matrix_lane(imported["matrix"], imported["cfg"]["split"], imported["cfg"]["snapshot"], root / "agp", db_path,
                    log=lambda s: None, calibrate=False, proposers=("lexicon",))
    db = store.open_db(db_path, read_only=True)
    try:
        assert len(agp_results(db, partition=None)) == len(parts)
    finally:
        db.close()
