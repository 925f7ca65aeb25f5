"""`nko-ops promote RUN`: a promotion record for one completed run.

The record (``<out>/<run_id>.json``) names the run, its snapshot / split / feature-recipe
hashes, its metrics (overall and per partition), the artifact manifest as verified now, the
environment it ran in, and the exact commands that reproduce it: ``<out>/<run_id>.config.json``
is the run's own config as the trainer recorded it, with this machine's paths (a run trained
on Vast records the instance's, e.g. ``data/snapshot-…``; the record's ``reproduce.config_paths``
then names the local ones, from the run's matrix or the config the executor launched it with), so

    nko-ops train --config <out>/<run_id>.config.json --out-dir NEW_DIR

retrains it, and ``nko-ops evaluate --run RUN_DIR`` re-decodes its predictions byte for byte.
Promoting the same run again writes nothing new but completes what an interrupted promotion
left undone (the files first, the ``promotions`` row last); a record that would differ is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from state import store
from state.promotions import record_promotion
from state.records import Run, RunStatus
from backend.matrix import MatrixError, load_matrix, resolve
from backend.runs import recorded_hashes, verify_bundle
from models.errors import NkoOpsError


class PromoteError(NkoOpsError, ValueError):
    pass


def _dump(obj) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def promotion_record(run_id: str, db) -> dict:
    row = store.run(db, run_id)
    if row is None:
        raise PromoteError(f"no run {run_id!r} in the state store")
    if row.status != RunStatus.COMPLETED or not row.out_dir:
        raise PromoteError(f"run {run_id!r} is {row.status}, not completed: only completed runs are promoted")
    d = Path(row.out_dir)
    b = verify_bundle(d, row.snapshot_sha256, row.split_sha256, row.recipe_hash,
                      recorded=recorded_hashes(db, run_id))
    if not b.ok:
        raise PromoteError(f"run {run_id!r}: its bundle in {d} does not verify:\n  " + "\n  ".join(b.problems))
    r = b.results
    by_part = json.loads((d / "test_metrics_by_partition.json").read_text(encoding="utf-8"))
    metric_keys = ("test_cer", "test_toneless_cer", "test_rows", "test_reference_chars", "test_edits",
                   "best_val_loss", "best_epoch", "epochs_run", "stop_reason", "steps", "train_time_s",
                   "wall_time_s", "params")
    return {
        "run_id": run_id, "matrix_id": row.matrix_id, "script": r.get("script"), "mode": r.get("mode"),
        "seed": r.get("seed"), "run_dir": str(d.resolve()), "source": row.executor,
        "sanity": row.flags.get("sanity"),
        "snapshot_sha256": r.get("snapshot_sha256"), "split_sha256": r.get("split_sha256"),
        "feature_recipe": r.get("feature_recipe"), "feature_recipe_hash": r.get("feature_recipe_hash"),
        "partition_policy_sha256": r.get("partition_policy_sha256"),
        "metrics": {k: r.get(k) for k in metric_keys if k in r},
        "metrics_by_partition": by_part,
        "manifest": {f["name"]: {"sha256": f["sha256"], "size": f["size"]} for f in b.files},
        "manifest_source": {"verified": "the run's manifest.json", "recorded": "hashes recorded at import "
                            "(the run has no manifest.json)"}[b.manifest],
        "environment": {k: r.get(k) for k in ("git_commit", "torch_version", "python_version", "device")},
        "config": r.get("config"),
    }


def _local_paths(db, row: Run) -> dict:
    """{path field: path on this machine} for a run's config: from its matrix when that still
    resolves to the run's snapshot, split and recipe, else from the config an executor
    launched it with (state.db); {} when neither is known."""
    from backend.vast.remote import PATH_FIELDS  # the fields the Vast executor rewrites

    mrow = next(iter(db.query("SELECT path FROM matrices WHERE id = ?", [row.matrix_id])), None)
    if mrow and mrow["path"]:
        try:
            m = load_matrix(mrow["path"])
            spec = m.run(row.id)
        except MatrixError:
            m = None
        if m is not None:
            ident = resolve(m)
            if not ident.problems and (ident.snapshot_sha256, ident.split_sha256, ident.recipe_hash) == (
                    row.snapshot_sha256, row.split_sha256, row.recipe_hash):
                cfg = m.run_config(spec)
                return {k: cfg[k] for k in PATH_FIELDS}
    cfg = row.config or {}
    return {k: cfg[k] for k in PATH_FIELDS if k in cfg}


def _write(path: Path, body: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(body, encoding="utf-8")
    tmp.replace(path)


def promote(run_id: str, db_path: str | Path = "state.db", out_dir: str | Path = "reports/promotions") -> Path:
    """Write (or confirm, completing an interrupted promotion) the promotion record of
    ``run_id``; returns its path."""
    if not Path(db_path).exists():
        raise PromoteError(f"state store not found: {db_path}")
    db = store.open_db(db_path)
    try:
        rec = promotion_record(run_id, db)
        out = Path(out_dir)
        cfg_path = out / f"{run_id}.config.json"
        rec["reproduce"] = {
            "config": str(cfg_path),
            "train": f"nko-ops train --config {cfg_path} --out-dir runs/reproduce/{run_id}",
            "evaluate": f"nko-ops evaluate --run {rec['run_dir']}",
            "git_checkout": f"git checkout {rec['environment'].get('git_commit')}",
        }
        config = rec["config"]
        moved = {k: v for k, v in _local_paths(db, store.run(db, run_id)).items()
                 if isinstance(config, dict) and k in config and config[k] != v}
        if moved:
            rec["reproduce"]["config_paths"] = moved
            config = {**config, **moved}
        text = _dump(rec)
        path = out / f"{run_id}.json"
        if path.exists() and path.read_text(encoding="utf-8") != text:
            raise PromoteError(f"{path} exists with a different record (the run or its bundle changed since it "
                               f"was promoted); promotion records are not overwritten")
        # the files, then the row: a rerun after a failure finds the same record and adds what is missing
        out.mkdir(parents=True, exist_ok=True)
        for p, body in ((cfg_path, _dump(config)), (path, text)):
            if not p.exists() or p.read_text(encoding="utf-8") != body:
                _write(p, body)
        sha = hashlib.sha256(text.encode()).hexdigest()
        record_promotion(db, run_id, str(path), sha)
        return path
    finally:
        db.close()
