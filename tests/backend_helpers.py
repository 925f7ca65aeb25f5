"""Constructed run directories for the backend tests: a snapshot, its split, a stand-in
feature-store index, and run bundles written file by file (the nine artifacts, metrics.jsonl
and manifest.json in the trainer's format), so tables, claims, import and promotion are
tested without training."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from models.files import sha256_file
from models.split import make_split
from models.text import row_edits, toneless
from models.features import FeatureWriter, recipe_hash
import numpy as np



def make_corpus(root: Path, n: int = 40, seed: int = 42) -> dict:
    """snapshot/pairs.jsonl, split.json and a small feature store; returns paths and hashes."""
    root = Path(root)
    (root / "snapshot").mkdir(parents=True, exist_ok=True)
    rows = [{"feat_id": f"bam_c_{i:04d}", "nko": "ߌ ߦߋ ߛߊ߲", "latin": "i ye san"} for i in range(n)]
    pairs = root / "snapshot" / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    snap_sha = sha256_file(pairs)
    split = make_split([r["feat_id"] for r in rows], seed=seed, snapshot_sha256=snap_sha)
    split.save(root / "split.json")
    recipe = {"name": "test-recipe", "dim": 4, "frame_rate": 50.0, "dtype": "float16"}
    recipe["hash"] = recipe_hash(recipe)
    with FeatureWriter(root / "features", recipe) as w:
        for r in rows:
            w.add(r["feat_id"], np.zeros((3, 4), dtype=np.float32))
    return {"snapshot": str(root / "snapshot"), "snapshot_sha256": snap_sha, "split": str(root / "split.json"),
            "split_sha256": split.sha256, "features": str(root / "features"), "recipe_hash": recipe["hash"],
            "split_obj": split}


def write_bundle(run_dir: Path, corpus: dict, run_id: str, script: str, mode: str, seed: int,
                 hyps: dict[str, str], refs: dict[str, str], partitions: dict[str, str] | None = None,
                 best_val_loss: float = 1.0, best_epoch: int = 3, epochs: int = 4, config: dict | None = None,
                 manifest: bool = True, results_extra: dict | None = None) -> Path:
    """A complete run directory whose predictions are ``hyps`` against ``refs`` (by feat_id)."""
    d = Path(run_dir)
    d.mkdir(parents=True, exist_ok=True)
    split = corpus["split_obj"]
    split.save(d / "split.json")
    rows, edits, chars = [], 0, 0
    for fid in split.test:
        e, c = row_edits(refs[fid], hyps[fid])
        edits, chars = edits + e, chars + c
        rows.append({"feat_id": fid, "audio_id": fid, "split": "test", "script": script, "mode": mode,
                     "asr_text": hyps[fid], "reference_text": refs[fid], "cer_edits": e, "reference_chars": c,
                     "trajectory_scalars": {"commitment_mean": 0.5},
                     "partition": (partitions or {}).get(fid, "boundary")})
    tl = [row_edits(toneless(refs[f]), toneless(hyps[f])) for f in split.test]
    (d / "test_predictions.jsonl").write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    (d / "test_references.jsonl").write_text("".join(
        json.dumps({"feat_id": f, "reference_text": refs[f]}, ensure_ascii=False) + "\n" for f in split.test),
        encoding="utf-8")
    (d / "test_metrics_by_partition.json").write_text(json.dumps({"overall": {"cer": edits / chars}}))
    (d / "vocab.json").write_text(json.dumps({"script": script, "symbols": ["<blank>", " "]}))
    (d / "best.pt").write_bytes(hashlib.sha256(run_id.encode()).digest() * 8)
    (d / "train.log").write_text(f"{run_id} trained\n")
    (d / "run.log").write_text(f"{run_id} run\n")
    (d / "metrics.jsonl").write_text("".join(
        json.dumps({"kind": "epoch", "epoch": ep, "step": 10 * ep, "train_loss": 2.0 / ep,
                    "val_loss": best_val_loss + abs(ep - best_epoch) * 0.1, "epoch_time_s": 1.5}) + "\n"
        for ep in range(1, epochs + 1)))
    results = {"run_id": run_id, "status": "complete", "script": script, "mode": mode, "seed": seed,
               "config": config or {"run_id": run_id, "script": script, "mode": mode, "seed": seed},
               "snapshot_sha256": corpus["snapshot_sha256"], "split_sha256": corpus["split_sha256"],
               "feature_recipe": "test-recipe", "feature_recipe_hash": corpus["recipe_hash"],
               "best_epoch": best_epoch, "best_val_loss": best_val_loss, "epochs_run": epochs,
               "test_cer": edits / chars, "test_toneless_cer": sum(e for e, _ in tl) / sum(c for _, c in tl),
               "test_rows": len(rows), "test_reference_chars": chars, "test_edits": edits,
               "git_commit": "0" * 40, "torch_version": "test", "python_version": "3", "device": "cpu",
               **(results_extra or {})}
    (d / "results.json").write_text(json.dumps(results, indent=1, ensure_ascii=False))
    if manifest:
        files = sorted(p.name for p in d.iterdir() if p.is_file() and p.name != "manifest.json")
        (d / "manifest.json").write_text(json.dumps({"run_id": run_id, "files": {
            n: {"sha256": sha256_file(d / n), "size": (d / n).stat().st_size} for n in files}}))
    return d


def matrix_dict(corpus: dict, out_root: Path, runs: list[dict], reference: str | None = None, **extra) -> dict:
    m = {"matrix_id": "m", "snapshot": corpus["snapshot"], "snapshot_sha256": corpus["snapshot_sha256"],
         "split": corpus["split"], "split_sha256": corpus["split_sha256"], "features": corpus["features"],
         "recipe_hash": corpus["recipe_hash"], "out_root": str(out_root),
         "defaults": {"model": {"preset": "tiny"}, "device": "cpu"}, "runs": runs}
    if reference:
        m["reference_run"] = reference
    m.update(extra)
    return m


def noisy(text: str, k: int) -> str:
    """``text`` with its first ``k`` characters replaced (k edits when k <= len)."""
    return "x" * min(k, len(text)) + text[k:]
