"""`nko-ops demo`: the main job on the embedded sample corpus.

Steps: check the sample snapshot, make the split, extract log-mel features, run the demo
matrix on the local executor (sanity step first), write tables/figures/claims, run the
offline AGP lane (lexicon proposer + gate + eval) on the N'Ko rows. Reruns reuse
everything already built."""

from __future__ import annotations

import json
import time
from pathlib import Path

from rich.console import Console

SAMPLE = Path("data/sample")
MATRIX = Path("configs/matrix/demo.json")
CLAIMS = Path("configs/claims.toml")


def _matrix_paths(matrix_path: Path) -> dict:
    data = json.loads(matrix_path.read_text(encoding="utf-8"))
    return data


def run_demo(workdir: str = "work/demo", db: str = "state.db") -> int:
    console = Console()
    t0 = time.time()
    work = Path(workdir)
    work.mkdir(parents=True, exist_ok=True)

    from models.snapshot import describe

    console.rule("1. sample snapshot")
    info = describe(SAMPLE)
    console.print(f"{info['rows']} rows, sha256 {info['sha256'][:16]}…, ok={info['ok']}")
    if not info["ok"]:
        console.print("[red]the sample snapshot is broken; run `nko-ops snapshot describe data/sample`")
        return 1

    console.rule("2. split")
    from models.snapshot import load
    from models.split import Split, make_split

    split_path = work / "split.json"
    snap = load(SAMPLE)
    split = make_split(snap.feat_ids, seed=42, snapshot_sha256=snap.sha256)
    if split_path.exists() and Split.load(split_path).sha256 == split.sha256:
        console.print(f"reusing {split_path}")
    else:
        split.save(split_path)
    console.print(f"{split.sizes()} sha256 {split.sha256[:16]}…")

    console.rule("3. features (log-mel recipe)")
    from models.features import extract

    features_dir = work / "features"
    extract(SAMPLE, features_dir, "log-mel")

    console.rule("4. demo matrix (local executor)")
    from backend.executor_local import run_matrix

    results = run_matrix(MATRIX, db, executor="local", parallel=1)
    failed = [r for r in results if getattr(r, "status", r.get("status") if isinstance(r, dict) else None) != "completed"]

    console.rule("5. tables, figures, claims")
    from backend.claims import check_claims
    from backend.tables import write_tables

    reports = Path("reports")
    written = write_tables(MATRIX, reports, db)
    verdicts = check_claims(CLAIMS, MATRIX, db)
    for v in verdicts:
        console.print(str(v))

    console.rule("6. AGP lane: lexicon proposer + gate + eval on N'Ko rows")
    from agp.pipeline import run_demo_lane

    summary = run_demo_lane(MATRIX, split_path, SAMPLE, reports / "agp", db)
    console.print(summary)

    console.rule("done")
    console.print(f"finished in {time.time() - t0:.0f} s; state in {db}, reports in {reports}/, runs under {work}/runs")
    return 1 if failed else 0
