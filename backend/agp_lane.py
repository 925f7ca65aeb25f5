"""The AGP lane over a matrix: the backend finds the completed N'Ko runs' bundles (state.db
first, so a run imported from another directory is found where it lives; then the matrix's
out_root) and hands them to ``agp.pipeline.run_bundles_lane``. agp never walks matrices or
run folders itself.

Which runs: ``runs`` when given, else the matrix's ``agp_dumps`` when it names some, else
every selected run. A run of those that cannot go to the lane (Latin, not run yet, no
prediction rows where state.db or the matrix says it lives) is reported by ``log`` with the
reason, never skipped silently.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from agp.pipeline import LaneBundle, run_bundles_lane
from backend.matrix import Matrix, load_matrix
from models.bundle import PREDICTIONS


def lane_bundles(m: Matrix, db_path: Path | str | None, runs: Sequence[str] | None = None,
                 log=print) -> list[LaneBundle]:
    """The completed N'Ko runs of ``m`` (see the module docstring for which) as lane inputs,
    in matrix order, each with its directory and the matrix's feature store."""
    names = runs if runs is not None else m.agp_dumps
    specs = [m.run(r) for r in names] if names else m.selected()
    recorded = _recorded_dirs(db_path, [s.run_id for s in specs])
    out = []
    for spec in specs:
        if spec.script != "nko":
            if names:
                log(f"AGP lane: {spec.run_id} left out: a {spec.script} run (the lane corrects N'Ko rows)")
            continue
        run_dir = recorded.get(spec.run_id) or m.out_dir(spec)
        if not (run_dir / PREDICTIONS).is_file():
            where = "state.db records it at" if spec.run_id in recorded else "not completed in state.db; looked in"
            log(f"AGP lane: {spec.run_id} left out: no {PREDICTIONS} ({where} {run_dir})")
            continue
        out.append(LaneBundle(spec.run_id, run_dir, m.features))
    return out


def _recorded_dirs(db_path: Path | str | None, run_ids: list[str]) -> dict[str, Path]:
    """{run_id: directory} of the runs state.db records as completed (imported ones included)."""
    if db_path is None or not Path(db_path).exists():
        return {}
    from state.store import get_run, open_db

    db = open_db(db_path, read_only=True)
    try:
        rows = {rid: get_run(db, rid) for rid in run_ids}
    finally:
        db.close()
    return {rid: Path(r["out_dir"]) for rid, r in rows.items() if r and r["status"] == "completed" and r["out_dir"]}


def run_matrix_lane(matrix_path: Path | str, split_path: Path | str, snapshot: Path | str, out_dir: Path | str,
                    db_path: Path | str, runs: Sequence[str] | None = None, log=print, **options) -> dict:
    """``run_bundles_lane`` (``options``: calibrate, gate_policy, proposers, lm_text) on the
    matrix's completed N'Ko runs; raises FileNotFoundError when there are none."""
    m = load_matrix(matrix_path)
    bundles = lane_bundles(m, db_path, runs, log)
    if not bundles:
        raise FileNotFoundError(f"{matrix_path}: no completed N'Ko run with {PREDICTIONS} in state.db "
                                f"({db_path}) or under {m.out_root}")
    return run_bundles_lane(bundles, split_path, snapshot, out_dir, db_path, log=log, **options)
