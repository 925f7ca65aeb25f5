"""`nko-ops promote RUN`: a promotion record for one completed run.

The record (``<out>/<run_id>.json``) names the run, its snapshot / split / feature-recipe
hashes, its metrics (overall and per partition), the artifact manifest as verified now, the
environment it ran in, and the exact commands that reproduce it: ``<out>/<run_id>.config.json``
is the run's own config as the trainer recorded it, so

    nko-ops train --config <out>/<run_id>.config.json --out-dir NEW_DIR

retrains it, and ``nko-ops evaluate --run RUN_DIR`` re-decodes its predictions byte for byte.
Promoting the same run again is a no-op; a record that would differ is refused.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from backend import store
from backend.runs import recorded_hashes, verify_bundle


class PromoteError(ValueError):
    pass


def _dump(obj) -> str:
    return json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=True) + "\n"


def promotion_record(run_id: str, db) -> dict:
    row = store.get_run(db, run_id)
    if row is None:
        raise PromoteError(f"no run {run_id!r} in the state store")
    if row["status"] != "completed" or not row["out_dir"]:
        raise PromoteError(f"run {run_id!r} is {row['status']}, not completed: only completed runs are promoted")
    d = Path(row["out_dir"])
    b = verify_bundle(d, row["snapshot_sha256"], row["split_sha256"], row["recipe_hash"],
                      recorded=recorded_hashes(db, run_id))
    if not b.ok:
        raise PromoteError(f"run {run_id!r}: its bundle in {d} does not verify:\n  " + "\n  ".join(b.problems))
    r = b.results
    by_part = json.loads((d / "test_metrics_by_partition.json").read_text(encoding="utf-8"))
    metric_keys = ("test_cer", "test_toneless_cer", "test_rows", "test_reference_chars", "test_edits",
                   "best_val_loss", "best_epoch", "epochs_run", "stop_reason", "steps", "train_time_s",
                   "wall_time_s", "params")
    flags = json.loads(row["flags"] or "{}")
    return {
        "run_id": run_id, "matrix_id": row["matrix_id"], "script": r.get("script"), "mode": r.get("mode"),
        "seed": r.get("seed"), "run_dir": str(d.resolve()), "source": row["executor"],
        "sanity": flags.get("sanity"),
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


def promote(run_id: str, db_path: str | Path = "state.db", out_dir: str | Path = "reports/promotions") -> Path:
    """Write (or confirm) the promotion record of ``run_id``; returns its path."""
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
        text = _dump(rec)
        path = out / f"{run_id}.json"
        if path.exists():
            if path.read_text(encoding="utf-8") == text:
                return path
            raise PromoteError(f"{path} exists with a different record (the run or its bundle changed since it "
                               f"was promoted); promotion records are not overwritten")
        out.mkdir(parents=True, exist_ok=True)
        for p, body in ((cfg_path, _dump(rec["config"])), (path, text)):
            tmp = p.with_name(p.name + ".tmp")
            tmp.write_text(body, encoding="utf-8")
            tmp.replace(p)
        with store.transaction(db):
            db.conn.execute("INSERT INTO promotions(run_id, path, record_sha256) VALUES (?,?,?)",
                            (run_id, str(path), hashlib.sha256(text.encode()).hexdigest()))
            store.add_event(db, f"promoted: {path}", run_id=run_id, kind="promotion", source="promote")
        return path
    finally:
        db.close()
