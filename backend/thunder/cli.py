"""``nko-ops thunder preflight|launch|monitor|status|stop``. Bad input is one clear line on
stderr and exit 2 (the CLI root handles ``NkoOpsError``); a failed preflight or run exits 1."""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Callable, Optional

import typer

thunder_app = typer.Typer(help="Thunder Train: MLX LoRA adapter runs across two Macs (ring over Thunderbolt).",
                          no_args_is_help=True)

CONFIG = typer.Option(None, "--config", help="Cluster TOML (default configs/thunder/cluster.toml).")
DB = typer.Option("state.db", "--db", help="State store path.")


def _errors_exit(fn: Callable) -> Callable:
    """backend/thunder/records.py and monitor.py say "no such adapter run" with a KeyError: one
    line, exit 2, like the user errors (``NkoOpsError``) the CLI root handles."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except KeyError as e:
            typer.echo(f"error: {e.args[0]}", err=True)
            raise typer.Exit(2) from None

    return wrapper


def _cluster_of(db, run_id: str, config: Optional[Path]):
    """The run's own config (stored at launch) unless ``--config`` names another."""
    from backend.thunder.config import load_config, parse_config
    from state.adapters import get_adapter_run

    row = get_adapter_run(db, run_id)
    if row is None:
        raise KeyError(f"no adapter run {run_id!r} in the state store")
    if config is not None or not row["config"]:
        return row, load_config(config)
    return row, parse_config(json.loads(row["config"]), f"adapter_runs[{run_id}].config")


def _progress(mon) -> None:
    line = f"\r{mon.run_id}: iteration {mon.iteration}/{mon.cluster.train.iters}"
    typer.echo(line, nl=False, err=True)


def _follow(mon) -> str:
    try:
        return mon.watch(on_poll=_progress)
    except KeyboardInterrupt:
        typer.echo(f"\nstopped following; the run goes on. Follow it again with `nko-ops thunder monitor "
                   f"{mon.run_id}`, or stop it with `nko-ops thunder stop {mon.run_id}`.", err=True)
        raise typer.Exit(130) from None


def _stale(db, row: dict) -> list[tuple[int, float, float]]:
    """Ranks of a running run past the watchdog window by the state store (no host asked)."""
    from backend.thunder.config import ConfigError, parse_config
    from backend.thunder.monitor import recorded_staleness

    if row["status"] != "running" or not row["config"]:
        return []
    try:
        cluster = parse_config(json.loads(row["config"]), f"adapter_runs[{row['id']}].config")
    except (ConfigError, ValueError):
        return []
    return recorded_staleness(db, row["id"], cluster)


def _stale_line(run_id: str, stale: list[tuple[int, float, float]]) -> str:
    ranks = ", ".join(f"{r} ({age:.0f}s, window {window:g}s)" for r, age, window in stale)
    return (f"STALE: no report recorded from rank(s) {ranks}: the run is hung, or no monitor is following it; "
            f"`nko-ops thunder monitor {run_id}` checks it now and stops it if it is hung")


def _report(db, run_id: str, status: str) -> None:
    from state.adapters import get_adapter_run

    row = get_adapter_run(db, run_id)
    typer.echo("", err=True)
    typer.echo(f"{run_id}: {status}" + (f" ({row['error_kind']}): {row['error']}" if row["error"] else ""))
    if row["adapter_path"]:
        typer.echo(f"adapter: {row['adapter_path']}")
    if row["agp_eval"]:
        ev = json.loads(row["agp_eval"])
        o = ev.get("overall")
        c = ev.get("already_correct")
        typer.echo(f"AGP eval (held-out): CER {o['cer_before']:.4f} -> {o['cer_after']:.4f}, "
                   f"{o['accepted']}/{o['rows']} accepted"
                   + (f"; already-correct rows damaged {c['worse']}/{c['rows']}" if c else "") if o else
                   f"AGP eval {ev['status']}: {ev.get('reason') or ev.get('error')}")


@thunder_app.command("preflight")
@_errors_exit
def preflight_cmd(config: Optional[Path] = CONFIG,
                  as_json: bool = typer.Option(False, "--json", help="Print the checks as JSON.")) -> None:
    """SSH, Thunderbolt reachability (from the hosts), MLX/mlx-lm versions, model and data hashes."""
    from backend.thunder.config import load_config
    from backend.thunder.preflight import run_preflight

    result = run_preflight(load_config(config))
    typer.echo(json.dumps(result.as_dict(), indent=1) if as_json else result.table())
    if not result.ok:
        raise typer.Exit(1)


@thunder_app.command("launch")
@_errors_exit
def launch_cmd(config: Optional[Path] = CONFIG, db: str = DB,
               run_id: Optional[str] = typer.Option(None, "--run-id", help="Default thunder-<UTC time>."),
               resume: Optional[str] = typer.Option(None, "--resume",
                                                    help="Continue this run from its newest checkpoint."),
               name: Optional[str] = typer.Option(None, "--name"),
               skip_preflight: bool = typer.Option(False, "--skip-preflight"),
               detach: bool = typer.Option(False, "--detach",
                                           help="Start and return; follow with `thunder monitor`.")) -> None:
    """Write the ring hostfile, start mlx.launch, then follow the run (metrics, watchdog, eval)."""
    from state.store import open_db
    from backend.thunder.config import load_config
    from backend.thunder.launch import launch
    from backend.thunder.monitor import Monitor
    from backend.thunder.preflight import run_preflight

    cluster = load_config(config)
    if not skip_preflight:
        result = run_preflight(cluster)
        if not result.ok:
            typer.echo(result.table(), err=True)
            typer.echo("not launching: preflight failed (--skip-preflight to override)", err=True)
            raise typer.Exit(1)
    conn = open_db(db)
    try:
        started = launch(cluster, conn, run_id=run_id, resume=resume, name=name)
        typer.echo(f"{started.run_id}: attempt {started.attempt} from iteration {started.start_iteration}, "
                   f"launcher pid {started.proc.pid}, logs in {started.local_dir}")
        if detach:
            return
        status = _follow(Monitor(cluster, conn, started.run_id, proc=started.proc))
        _report(conn, started.run_id, status)
    finally:
        conn.close()
    if status != "completed":
        raise typer.Exit(1)


@thunder_app.command("monitor")
@_errors_exit
def monitor_cmd(run_id: str, config: Optional[Path] = CONFIG, db: str = DB) -> None:
    """Follow a running run (after `launch --detach`, or if the launching shell went away)."""
    from state.store import open_db
    from backend.thunder.monitor import Monitor

    conn = open_db(db)
    try:
        row, cluster = _cluster_of(conn, run_id, config)
        status = row["status"]
        if status == "running":
            status = _follow(Monitor(cluster, conn, run_id))
        _report(conn, run_id, status)
    finally:
        conn.close()
    if status != "completed":
        raise typer.Exit(1)


@thunder_app.command("status")
@_errors_exit
def status_cmd(run_id: Optional[str] = typer.Argument(None), db: str = DB,
               as_json: bool = typer.Option(False, "--json")) -> None:
    """Adapter runs (or one run in detail: per-rank latest metrics, artifacts, AGP eval)."""
    from state.store import open_db
    from state.adapters import get_adapter_run, latest_metrics

    conn = open_db(db)
    try:
        if run_id is None:
            rows = list(conn.query("SELECT id, status, attempt, iteration, world_size, heartbeat_at, error_kind, "
                                   "adapter_path, config FROM adapter_runs ORDER BY created_at DESC"))
            for r in rows:
                r["stale"] = [{"rank": k, "age_s": round(age, 1), "window_s": w} for k, age, w in _stale(conn, r)]
                del r["config"]
            if as_json:
                typer.echo(json.dumps(rows, indent=1))
                return
            if not rows:
                typer.echo("no adapter runs")
                return
            for r in rows:
                typer.echo(f"{r['id']:<32} {r['status']:<10} attempt {r['attempt']}  iteration {r['iteration']}  "
                           f"ranks {r['world_size']}  heartbeat {r['heartbeat_at'] or '-'}"
                           + (f"  [{r['error_kind']}]" if r["error_kind"] else "")
                           + ("  [STALE: past the watchdog window]" if r["stale"] else ""))
            return
        row = get_adapter_run(conn, run_id)
        if row is None:
            raise KeyError(f"no adapter run {run_id!r} in the state store")
        metrics = latest_metrics(conn, run_id)
        arts = list(conn.query("SELECT name, sha256, size, sync_state FROM artifacts WHERE owner_kind = 'adapter_run' "
                               "AND run_id = ? ORDER BY name", [run_id]))
        stale = _stale(conn, row)
        if as_json:
            typer.echo(json.dumps({"run": row, "metrics": {str(k): v for k, v in metrics.items()},
                                   "artifacts": arts, "stale": [{"rank": k, "age_s": round(age, 1), "window_s": w}
                                                                for k, age, w in stale]}, indent=1))
            return
        typer.echo(f"{run_id}: {row['status']} (attempt {row['attempt']}, iteration {row['iteration']}, "
                   f"{row['world_size']} ranks, heartbeat {row['heartbeat_at'] or '-'})")
        if stale:
            typer.echo(_stale_line(run_id, stale))
        if row["error"]:
            typer.echo(f"error [{row['error_kind']}]: {row['error']}")
        for rank, m in sorted(metrics.items()):
            shown = ", ".join(f"{k} {v[1]:.4g}@{v[0]}" for k, v in sorted(m.items()))
            typer.echo(f"  rank {rank}: {shown}")
        for a in arts:
            typer.echo(f"  artifact {a['name']}  {a['sha256'][:16] if a['sha256'] else '-'}  {a['size']} B  "
                       f"{a['sync_state']}")
        if row["agp_eval"]:
            _report(conn, run_id, row["status"])
    finally:
        conn.close()


@thunder_app.command("stop")
@_errors_exit
def stop_cmd(run_id: str, config: Optional[Path] = CONFIG, db: str = DB) -> None:
    """Stop every rank (by pid, on its host) and the launcher; mark the run cancelled."""
    from state.store import open_db
    from backend.thunder.launch import stop_run

    conn = open_db(db)
    try:
        _, cluster = _cluster_of(conn, run_id, config)
        outcome = stop_run(cluster, conn, run_id)
    finally:
        conn.close()
    typer.echo(f"{run_id}: ranks " + ", ".join(f"{k} {v}" for k, v in outcome["ranks"].items())
               + f"; launcher {outcome['launcher']}")
