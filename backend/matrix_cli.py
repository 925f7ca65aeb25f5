"""CLI for the backend core: `matrix plan|run|validate`, `runs import|list`, `tables`,
`claims check`, `promote`. Errors in the input (``NkoOpsError``) reach the CLI root, which
prints them as one clear line (exit 2), never as a traceback."""

from __future__ import annotations

import json
from pathlib import Path
from typing import List, Optional

import typer

from models.errors import NkoOpsError

matrix_app = typer.Typer(help="Run matrices: validate, plan, run.", no_args_is_help=True)
runs_app = typer.Typer(help="Run directories in the state store.", no_args_is_help=True)
claims_app = typer.Typer(help="Claims backed by measured CER.", no_args_is_help=True)

DB = typer.Option("state.db", "--db", help="State store path.")


@matrix_app.command("validate")
def validate_cmd(file: Path) -> None:
    """Check a matrix file against the schema (no files hashed, nothing written)."""
    from backend.matrix import load_matrix

    m = load_matrix(file)
    typer.echo(f"{file}: valid matrix {m.matrix_id!r} with {len(m.runs)} runs")


@matrix_app.command("plan")
def plan_cmd(file: Path, db: str = DB,
             with_optional: bool = typer.Option(False, "--with-optional", help="Count optional runs in the totals."),
             parallel: int = typer.Option(1, "--parallel", help="Local runs at a time (for the wall-time forecast)."),
             as_json: bool = typer.Option(False, "--json")) -> None:
    """The runs, what already exists for each, and a time/cost forecast."""
    from backend.plan import format_plan, plan_matrix

    p = plan_matrix(file, db)
    if as_json:
        typer.echo(json.dumps({"matrix_id": p.matrix.matrix_id, "identity_problems": p.identity.problems,
                               "epoch_seconds": p.epoch_seconds, "epoch_seconds_source": p.epoch_seconds_source,
                               "runs": [vars(r) for r in p.runs], "totals": p.totals(with_optional, parallel)},
                              indent=1))
    else:
        typer.echo(format_plan(p, with_optional, parallel))


@matrix_app.command("run")
def run_cmd(file: Path,
            executor: str = typer.Option("local", "--executor", help="Where runs execute: local | vast."),
            parallel: int = typer.Option(1, "--parallel", help="Runs at a time."),
            skip_sanity: bool = typer.Option(False, "--skip-sanity",
                                             help="Skip the sanity step (recorded in state.db)."),
            with_optional: bool = typer.Option(False, "--with-optional", help="Also run the optional runs."),
            only: Optional[List[str]] = typer.Option(None, "--only", help="Run only this run id (repeatable)."),
            db: str = DB) -> None:
    """Run a matrix: sanity step, then every run not complete yet (resuming interrupted ones)."""
    from backend.matrix_run import run_matrix

    results = run_matrix(file, db, executor=executor, parallel=parallel, skip_sanity=skip_sanity,
                         with_optional=with_optional, only=only or None, log=lambda s: typer.echo(s, err=True))
    for r in results:
        typer.echo(str(r))
    statuses = {r.status for r in results}
    if "interrupted" in statuses:
        raise typer.Exit(130)
    if statuses - {"completed"}:
        raise typer.Exit(1)


@runs_app.command("import")
def import_cmd(run_dir: Path, run_id: Optional[str] = typer.Option(None, "--run-id", help="Default: results.json's."),
               matrix: Optional[Path] = typer.Option(None, "--matrix",
                                                     help="Check against this matrix's snapshot/split/recipe."),
               allow_no_manifest: bool = typer.Option(False, "--allow-no-manifest",
                                                      help="Accept a bundle without manifest.json (hashes are "
                                                           "recorded now, not verified)."),
               db: str = DB) -> None:
    """Register an existing run directory after checking its files, hashes, snapshot and split."""
    from backend.runs import import_run
    from state.store import open_db

    m = ident = None
    if matrix is not None:
        from backend.matrix_run import load_and_resolve

        m, ident = load_and_resolve(matrix)
    created = not Path(db).exists()
    handle = open_db(db)
    try:
        b = import_run(handle, run_dir, run_id, m, ident, allow_no_manifest)
    except BaseException:
        handle.close()
        if created:  # refused: leave no state store behind that only this attempt made
            for suffix in ("", "-wal", "-shm"):
                Path(f"{db}{suffix}").unlink(missing_ok=True)
        raise
    handle.close()
    typer.echo(f"imported {run_id or b.run_id} from {run_dir}: test CER {b.results.get('test_cer')}, "
               f"snapshot {b.snapshot_sha256[:12]}, split {b.split_sha256[:12]}, {len(b.files)} files "
               + ("verified against manifest.json" if b.manifest == "verified" else "hashed (no manifest)"))


@runs_app.command("list")
def list_cmd(matrix_id: Optional[str] = typer.Option(None, "--matrix-id"), db: str = DB,
             as_json: bool = typer.Option(False, "--json")) -> None:
    """Runs in the state store with status, heartbeat and test CER."""
    from state.store import open_db

    if not Path(db).exists():
        raise NkoOpsError(f"state store not found: {db}")
    handle = open_db(db, read_only=True)
    sql = "SELECT id, matrix_id, script, mode, seed, status, executor, epoch, heartbeat_at, test_cer, out_dir FROM runs"
    rows = list(handle.query(sql + (" WHERE matrix_id = ?" if matrix_id else "") + " ORDER BY id",
                             [matrix_id] if matrix_id else []))
    handle.close()
    if as_json:
        typer.echo(json.dumps(rows, indent=1))
        return
    if not rows:
        typer.echo(f"no runs in {db}" + (f" for matrix {matrix_id}" if matrix_id else ""))
    for r in rows:
        cer = f"{r['test_cer']:.4f}" if r["test_cer"] is not None else "—"
        typer.echo(f"{r['id']:<32} {r['matrix_id'] or '':<14} {r['script'] or '':<6} {r['mode'] or '':<10} "
                   f"{r['status']:<11} {r['executor'] or '':<7} epoch {r['epoch'] if r['epoch'] is not None else '—':<4}"
                   f" CER {cer}")


def tables_cmd(matrix: Path = typer.Option(..., "--matrix", help="Matrix file."),
               out: Path = typer.Option(Path("reports"), "--out", help="Output directory."),
               reference: Optional[str] = typer.Option(None, "--reference",
                                                       help="Reference run for ΔCER (default: the matrix's)."),
               db: str = DB) -> None:
    """Markdown, LaTeX and CSV tables and PNG figures of a matrix, from its artifacts."""
    from backend.tables import write_tables

    paths = write_tables(matrix, out, db, reference)
    for p in paths:
        typer.echo(str(p))


@claims_app.command("check")
def claims_check_cmd(claims: Path = typer.Option(Path("configs/claims.toml"), "--claims"),
                     matrix: Path = typer.Option(Path("configs/matrix/paper4.json"), "--matrix"),
                     db: str = DB, as_json: bool = typer.Option(False, "--json")) -> None:
    """SUPPORTED / REFUTED / INCONCLUSIVE (or INSUFFICIENT EVIDENCE) for each claim, with the numbers."""
    from backend.claims import DISCLAIMER, check_claims, report
    from backend.matrix import load_matrix

    verdicts = check_claims(claims, matrix, db)
    if as_json:
        typer.echo(json.dumps([v.as_dict() for v in verdicts], indent=1, ensure_ascii=False))
    else:
        demo = load_matrix(matrix).matrix_id.startswith("demo")  # the sample corpus: say what it cannot show
        typer.echo(report(verdicts, DISCLAIMER if demo else None), nl=False)


def promote_cmd(run: str = typer.Argument(..., help="Run id."), db: str = DB,
                out: Path = typer.Option(Path("reports/promotions"), "--out")) -> None:
    """Write a promotion record: hashes, metrics, manifest, reproduction commands."""
    from backend.promote import promote

    path = promote(run, db, out)
    typer.echo(str(path))

