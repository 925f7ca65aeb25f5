"""`nko-ops demo`: the main job on the embedded sample corpus.

Steps: check the sample snapshot, make the split, extract log-mel features, run the demo
matrix on the local executor (sanity step first), run the offline AGP lane on the N'Ko rows
(lexicon and N-best proposers, acoustic score, gate, eval), then write tables, figures and
claims (the tables include the AGP lane's results). Everything
lands in state.db and under work/demo and reports/; reruns reuse what is already built.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from rich.console import Console
from rich.markup import escape

REPO = Path(__file__).resolve().parents[1]
SAMPLE = Path("data/sample")
MATRIX = Path("configs/matrix/demo.json")
CLAIMS = Path("configs/claims.toml")
REPORTS = Path("reports")


def run_demo(db: str = "state.db", parallel: int = 2) -> int:
    console = Console(soft_wrap=True)
    db_path = Path(db).resolve()
    os.chdir(REPO)  # the demo matrix names its paths relative to the repository
    t0 = time.time()

    from backend.matrix import load_matrix
    from models.snapshot import describe, load
    from models.split import Split, make_split

    m = load_matrix(MATRIX)

    console.rule("1. sample snapshot")
    info = describe(SAMPLE)
    console.print(f"{info['rows']} rows, sha256 {info['sha256'][:16]}…, ok={info['ok']}")
    if not info["ok"]:
        console.print("[red]the sample snapshot is broken: run `nko-ops snapshot describe data/sample`")
        return 1

    console.rule("2. split (seed 42, 80/10/10)")
    split_path = Path(m.split)
    snap = load(SAMPLE)
    split = make_split(snap.feat_ids, seed=42, snapshot_sha256=snap.sha256)
    old = Split.load(split_path) if split_path.exists() else None
    if old is not None and (old.sha256, old.snapshot_sha256) == (split.sha256, split.snapshot_sha256):
        console.print(f"reusing {split_path}")
    else:
        split_path.parent.mkdir(parents=True, exist_ok=True)
        split.save(split_path)
    console.print(f"{split.sizes()} sha256 {split.sha256[:16]}…")

    console.rule("3. features (log-mel recipe, 50 frames/s)")
    import shutil

    from models.features import FeatureError, check_same_snapshot, extract

    try:
        check_same_snapshot(Path(m.features), f"{SAMPLE} sha256:{snap.sha256}", snap.feat_ids)
    except FeatureError:  # the demo's own store, from an earlier version of data/sample
        console.print(f"{m.features} holds features of an earlier data/sample: rebuilding it")
        shutil.rmtree(m.features)
    extract(SAMPLE, Path(m.features), "log-mel", subsample=2)

    console.rule(f"4. demo matrix on the local executor (parallel {parallel})")
    from backend.executor_local import run_matrix
    from backend.matrix import MatrixError

    try:
        results = run_matrix(MATRIX, db_path, executor="local", parallel=parallel, log=console.print)
    except MatrixError as e:
        console.print(f"[red]{escape(str(e))}", highlight=False)
        if "pins" in str(e):
            console.print(f"data/sample is not the corpus the demo matrix pins ({MATRIX}, or the copy {db_path.name} "
                          "pinned on first use): a changed corpus is a new bundle, never mixed with the old one. "
                          "Restore data/sample (`git checkout data/sample`), or, after an upgrade that changed it, "
                          f"run the demo on a new state store with the old outputs moved aside: "
                          f"`mv {m.out_root} {m.out_root}.old && nko-ops demo --db demo.db`.")
        return 1
    for r in results:
        console.print(str(r))
    failed = [r for r in results if r.status != "completed"]

    console.rule("5. AGP lane: N'Ko test rows; partitions and acoustic margins calibrated on val rows; "
                 "lexicon and N-best proposers, acoustic score, gate, eval")
    from agp.evaluate import format_table
    from agp.pipeline import run_demo_lane

    lanes = run_demo_lane(MATRIX, split_path, SAMPLE, REPORTS / "agp", db_path,
                          log=lambda msg: console.print(f"[yellow]{escape(msg)}[/yellow]"))
    for run_id, lane in lanes.items():
        cal = lane["partition_calibration"]
        console.print(f"[bold]{run_id}[/bold]  partitions: {cal['identity']} (calibrated on "
                      f"{cal['val_rows']}, val CER {cal['val_cer']:.4f})")
        for warning in cal["warnings"]:
            console.print(f"  [yellow]calibration: {escape(warning)}[/yellow]")
        for name, summary in lane["proposers"].items():
            margins = (summary.get("gate_calibration") or {}).get("margins", {})
            console.print(f"  proposer [bold]{name}[/bold]: acoustic margins "
                          + (", ".join(f"{p} {c['margin']:.4f}" if not isinstance(c["margin"], str)
                                       else f"{p} {c['margin']}" for p, c in margins.items()) or "not calibrated"))
            console.print(format_table(summary), markup=False)

    console.rule("6. tables, figures, claims (after the AGP lane: tables.md carries its results)")
    from backend.claims import check_claims
    from backend.tables import write_tables

    written = write_tables(MATRIX, REPORTS, db_path)
    console.print("wrote " + ", ".join(str(p) for p in written))
    verdicts = check_claims(CLAIMS, MATRIX, db_path)
    claims_text = "\n".join(str(v) for v in verdicts) + "\n"
    (REPORTS / "claims.txt").write_text(claims_text, encoding="utf-8")
    console.print(claims_text)

    console.rule("done")
    console.print(f"finished in {time.time() - t0:.0f} s")
    console.print(f"state:   {db_path}  (browse it with `nko-ops console --db {db_path}`)")
    console.print(f"runs:    {REPO / m.out_root}")
    console.print(f"reports: {REPO / REPORTS} (tables.md, tables.tex, *.csv, figures, claims.txt, agp/)")
    if failed:
        console.print(f"[red]{len(failed)} run(s) did not complete: " + ", ".join(r.run_id for r in failed))
    return 1 if failed else 0
