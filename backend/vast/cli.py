"""`nko-ops vast ...`: offers, launch, instances, logs, sync, kill-idle, destroy, sweep,
emulator. Listing commands take ``--json``. Errors (``NkoOpsError``) reach the CLI root: one
clear line (exit 2).

Only the commands that run or kill instances (a matrix run, ``launch``, ``kill-idle``) enforce
the budget cap when they poll; ``instances``, ``sync`` and ``destroy`` observe (cost ledger,
idle tracking) and, over the cap, ``instances`` prints what the policy would do."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import List, Optional

import typer

from models.errors import NkoOpsError

vast_app = typer.Typer(help="Vast.ai lane: rent GPUs for runs without losing data or money.", no_args_is_help=True)

DB = typer.Option("state.db", "--db", help="State store path.")
CONFIG = typer.Option(Path("configs/vast.toml"), "--settings", help="Vast settings (launch, SSH, idle, mirror).")
BUDGET = typer.Option(Path("configs/budget.toml"), "--budget", help="Budget: cap, warn level, poll interval.")
JSON = typer.Option(False, "--json", help="Machine-readable output.")


def _check_run_id(run: str) -> None:
    from backend.vast.config import VastConfigError
    from models.runid import run_id_problem

    why = run_id_problem(run)
    if why:
        raise VastConfigError(f"run id: {why}")


def _fleet(db: str, config: Path, budget: Path):
    from state.store import open_db
    from backend.vast.config import load_budget, load_settings, state_dir_for
    from backend.vast.fleet import Fleet
    from backend.vast.provider import provider_from_settings

    settings = load_settings(config, state_dir=state_dir_for(db))
    budget_settings = load_budget(budget)  # every file checked before anything is opened or created
    provider = provider_from_settings(settings)
    return Fleet(open_db(db), settings, budget_settings, provider, log=lambda s: typer.echo(s, err=True))


def _json_id(iid: str) -> int | str:
    """An instance id as the JSON output has always shown it (Vast's ids are numbers)."""
    return int(iid) if iid.isdigit() else iid


def _echo_json(obj) -> None:
    typer.echo(json.dumps(obj, indent=1, ensure_ascii=False, default=str))


@vast_app.command("offers")
def offers_cmd(query: Optional[str] = typer.Argument(None, help="Vast query, e.g. 'gpu_name=RTX_4090 "
                                                                 "reliability>0.98'. Default: configs/vast.toml's."),
               order: Optional[str] = typer.Option(None, "--order", help="Sort fields (default: dph_total)."),
               limit: int = typer.Option(10, "--limit"), disk: Optional[float] = typer.Option(None, "--disk",
                                                                                              help="GB of disk to price."),
               config: Path = CONFIG, as_json: bool = JSON) -> None:
    """Offers matching a query, with live prices."""
    from backend.vast.config import load_settings
    from backend.vast.provider import provider_from_settings

    s = load_settings(config)
    rows = provider_from_settings(s).offers(query or s.query, order or s.order, limit, disk or s.disk_gb)
    if as_json:
        return _echo_json([o.raw for o in rows])
    if not rows:
        typer.echo("no offers match")
    for o in rows:
        typer.echo(f"{o.id:>9}  {o.num_gpus}x {o.gpu_name:<12} ${o.dph_total:.3f}/h  reliability {o.reliability:.3f}  "
                   f"down {o.inet_down:.0f} Mb/s  disk {o.disk_space:.0f} GB")


@vast_app.command("launch")
def launch_cmd(run_config: Path = typer.Option(..., "--config", help="Run config JSON (models/config.py)."),
               detach: bool = typer.Option(False, "--detach", help="Return once the trainer runs on the instance."),
               db: str = DB, config: Path = CONFIG, budget: Path = BUDGET) -> None:
    """Train one run on a rented instance: launch, follow, sync, verify, auto-destroy."""
    from backend.vast.config import load_budget, load_settings, state_dir_for
    from backend.vast.executor import launch_config

    r = launch_config(run_config, db, detach=detach, settings=load_settings(config, state_dir=state_dir_for(db)),
                      budget=load_budget(budget), log=lambda s: typer.echo(s, err=True))
    typer.echo(str(r))
    if r.status not in ("completed", "running"):
        raise typer.Exit(1)


@vast_app.command("instances")
def instances_cmd(db: str = DB, config: Path = CONFIG, budget: Path = BUDGET, as_json: bool = JSON) -> None:
    """The account's instances (polled now: cost ledger and idle tracking updated) and the budget.
    Observe only: over the cap it prints what the policy would do, and does nothing."""
    from backend.vast import idle
    from state import fleet as fleet_state

    fleet = _fleet(db, config, budget)
    rows, state = fleet.poll(enforce=False)
    plan = fleet.over_cap_plan(rows) if state.over else []
    now = fleet.clock()
    out = []
    for r in rows:
        rec = fleet_state.instance(fleet.db, r.id)
        data = rec.data if rec else {}
        v = idle.verdict(fleet.db, r.id, fleet.settings.idle, now)
        out.append({"id": _json_id(r.id), "label": r.label, "run_id": rec.run_id if rec else None,
                    "status": r.status, "gpu": f"{r.num_gpus}x {r.gpu_name}", "dph_total": r.usd_per_h,
                    "gpu_util": r.gpu_util, "spent_usd": round(data.get("compute_usd", 0.0)
                                                               + data.get("storage_usd", 0.0), 6),
                    "ssh": f"{r.ssh_host}:{r.ssh_port}", "idle": v.idle, "idle_reason": v.reason})
    fleet.close()
    if as_json:
        return _echo_json({"instances": out, "budget": {"spent_usd": state.spent_usd, "cap_usd": state.cap_usd,
                                                        "warn_usd": state.warn_usd,
                                                        "fleet_usd_per_h": state.fleet_usd_per_h, "over": state.over},
                           "over_cap_policy": [{"id": iid, "would": what} for iid, what in plan]})
    for r in out:
        typer.echo(f"{r['id']:>10} {r['status'] or '?':<9} {r['gpu']:<16} ${r['dph_total'] or 0:.3f}/h  "
                   f"spent ${r['spent_usd']:.4f}  util {r['gpu_util'] if r['gpu_util'] is not None else '?'}  "
                   f"{r['label'] or ''}" + ("  IDLE" if r["idle"] else ""))
    typer.echo(f"budget: {state}")
    if plan:
        typer.echo("over the cap, the next enforcing poll (matrix run, launch, kill-idle) would, per instance:")
        for iid, what in plan:
            typer.echo(f"  {iid}: {what}")


@vast_app.command("logs")
def logs_cmd(run: str = typer.Argument(..., help="Run id."), follow: bool = typer.Option(False, "--follow", "-f"),
             interval: float = typer.Option(2.0, "--interval"), db: str = DB, config: Path = CONFIG,
             budget: Path = BUDGET) -> None:
    """Print a run's new train.log lines (stored in state.db as well); --follow keeps going,
    reconnecting after drops, until the trainer exits."""
    from state import store
    from backend.vast import remote as rmt
    from backend.vast.logs import LogFollower

    _check_run_id(run)
    fleet = _fleet(db, config, budget)
    r = store.get_run(fleet.db, run)
    if not r or not r["instance_id"]:
        raise NkoOpsError(f"run {run!r} has no Vast instance in {db}")
    iid = r["instance_id"]
    layout = fleet.layout(iid)

    def connect():
        row = fleet.provider.instance(iid)
        if row is None:
            raise typer.Exit(_gone(iid))
        return fleet.remote(row).connect()

    def done() -> bool:
        if not follow:
            return True
        row = fleet.provider.instance(iid)
        if row is None:
            return True
        st = rmt.status(fleet.remote(row), layout, run, fleet.settings.remote_python)
        return st.get("exit") is not None

    LogFollower(fleet.db, run, layout.run_dir(run), iid, echo=typer.echo).follow(
        connect, done, interval, on_error=lambda m: typer.echo(m, err=True))


def _gone(iid) -> int:
    typer.echo(f"instance {iid} is gone", err=True)
    return 1


@vast_app.command("sync")
def sync_cmd(run: Optional[str] = typer.Argument(None, help="Run id (default: every live instance)."),
             instance: Optional[str] = typer.Option(None, "--instance"), db: str = DB, config: Path = CONFIG,
             budget: Path = BUDGET, as_json: bool = JSON) -> None:
    """Pull new artifacts into the verified local store now."""
    from state import store

    if run:
        _check_run_id(run)
    fleet = _fleet(db, config, budget)
    rows, _ = fleet.poll(enforce=False)
    if run:
        r = store.get_run(fleet.db, run)
        if not r or not r["instance_id"]:
            raise NkoOpsError(f"run {run!r} has no Vast instance in {db}")
        instance = r["instance_id"]
    targets = [r for r in rows if instance is None or r.id == str(instance)]
    reports = []
    for row in targets:
        if not row.running:
            continue
        reports += fleet.sync_instance(row, [run] if run else None)
    if as_json:
        _echo_json([{"run_id": r.run_id, "ok": r.ok, "verified": [e.name for e in r.verified],
                     "pulled": [e.name for e in r.pulled], "bytes": r.bytes,
                     "failed": [{"name": e.name, "why": w} for e, w in r.failed]} for r in reports])
    else:
        for r in reports:
            typer.echo(str(r))
    if any(not r.ok for r in reports):
        raise typer.Exit(1)


def _confirmations(force: List[str], confirm: List[str]) -> dict[str, str]:
    """id -> the id typed again, for each --force ID (asking on the terminal when no --confirm)."""
    out = {}
    for i, iid in enumerate(force):
        typed = confirm[i] if i < len(confirm) else None  # --confirm values pair with --force values in order
        if typed is None:
            typed = typer.prompt(f"Destroy instance {iid} even if files on it have no verified copy? "
                                 "Type its id again to confirm")
        out[iid] = typed.strip()
    return out


@vast_app.command("kill-idle")
def kill_idle_cmd(force: List[str] = typer.Option([], "--force", help="Instance id to destroy even without "
                                                                        "verified copies (repeatable)."),
                  confirm: List[str] = typer.Option([], "--confirm", help="The forced instance id typed again."),
                  db: str = DB, config: Path = CONFIG, budget: Path = BUDGET, as_json: bool = JSON) -> None:
    """Destroy idle instances, only once every file they hold is verified locally (sync first)."""
    fleet = _fleet(db, config, budget)
    outcomes = fleet.kill_idle(_confirmations(force, confirm))
    _report(outcomes, as_json)


@vast_app.command("destroy")
def destroy_cmd(instance: str = typer.Argument(...), force: bool = typer.Option(False, "--force"),
                confirm: Optional[str] = typer.Option(None, "--confirm", help="With --force: the id typed again."),
                db: str = DB, config: Path = CONFIG, budget: Path = BUDGET, as_json: bool = JSON) -> None:
    """Destroy one instance (sync and verify first; --force needs the id typed again)."""
    fleet = _fleet(db, config, budget)
    fleet.poll(enforce=False)
    typed = _confirmations([instance], [confirm] if confirm else [])[instance] if force else None
    outcome = fleet.destroy(instance, force=force, confirm=typed)
    _report([outcome], as_json)


def _report(outcomes, as_json: bool) -> None:
    if as_json:
        _echo_json([{"instance_id": o.instance_id, "destroyed": o.destroyed, "reason": o.reason,
                     "would_lose": o.would_lose, "forced": o.forced} for o in outcomes])
    else:
        for o in outcomes:
            typer.echo(str(o))
        if not outcomes:
            typer.echo("no idle instances")
    if any(not o.destroyed for o in outcomes):
        raise typer.Exit(1)


@vast_app.command("sweep")
def sweep_cmd(db: str = DB, config: Path = CONFIG, budget: Path = BUDGET, as_json: bool = JSON) -> None:
    """Instances on the account that the state store does not know about (orphans)."""
    fleet = _fleet(db, config, budget)
    orphans = fleet.sweep()
    if as_json:
        return _echo_json([{"id": _json_id(o.id), "label": o.label, "actual_status": o.status,
                            "gpu_name": o.gpu_name, "dph_total": o.usd_per_h, "start_date": o.start_date}
                           for o in orphans])
    for o in orphans:
        typer.echo(f"ORPHAN {o.id}: {o.label or '(no label)'} {o.status} "
                   f"{o.gpu_name} ${o.usd_per_h or 0:.3f}/h since "
                   f"{time.strftime('%Y-%m-%d %H:%M', time.gmtime(o.start_date or 0))} UTC")
    if not orphans:
        typer.echo("no orphans: every instance on the account belongs to a known run")


@vast_app.command("emulator")
def emulator_cmd(port: int = typer.Option(8765, "--port"),
                 ssh_port: int = typer.Option(22, "--ssh-port", help="Local sshd the instances map to."),
                 workspace: Optional[Path] = typer.Option(None, "--workspace",
                                                          help="Directory holding each instance's disk."),
                 boot_s: float = typer.Option(5.0, "--boot-s", help="Seconds an instance spends loading.")) -> None:
    """Run the Vast API emulator in the foreground (key: VAST_API_KEY; any key when unset)."""
    from backend.vast.emulator import serve

    serve(port, os.environ.get("VAST_API_KEY"), ssh_port=ssh_port,
          workspace_base=str(workspace.resolve()) if workspace else None, boot_s=boot_s,
          log=lambda s: typer.echo(s, err=True))
