"""``nko-ops sandbox [start|console|status|stop]``: every console pane alive on this machine
alone. ``backend/sandbox/build.py`` builds and stops the sandbox; opening the console on it
joins the console and the backend, so the command lives here, at the CLI root. Errors are one
line on stderr, exit 2."""

from __future__ import annotations

import os
import signal
import sys
from pathlib import Path

import typer

from backend.sandbox.build import DEFAULT_ROOT
from models.errors import NkoOpsError

sandbox_app = typer.Typer(help="A local cloud sandbox: emulated Vast account, sshd instance, MLX ring, gate review. "
                               "Without a command: build it, open the console on it (on a terminal) and stop "
                               "everything when the console closes.", invoke_without_command=True)

DIR = typer.Option(DEFAULT_ROOT, "--dir", help="The sandbox's directory (its own state.db, keys, settings, disks).")


@sandbox_app.callback()
def sandbox_main(ctx: typer.Context, root: Path = DIR) -> None:
    """Without a subcommand: build the sandbox, open the console on it (on a terminal), and
    stop everything when the console closes."""
    if ctx.invoked_subcommand is None:
        _start(root, open_console=sys.stdout.isatty(), rows=240, epochs=10, hang=True, live_epochs=60)


@sandbox_app.command("start")
def start_cmd(root: Path = DIR,
              open_console: bool = typer.Option(False, "--open", help="Open the console now; stop all on exit."),
              rows: int = typer.Option(240, "--rows", min=60, help="Rows of data/sample the sandbox run trains on."),
              epochs: int = typer.Option(10, "--epochs", min=1, help="Epochs of the sandbox run."),
              hang: bool = typer.Option(True, "--hang/--no-hang",
                                        help="Also an adapter run that hangs, for the watchdog."),
              live_epochs: int = typer.Option(60, "--live-epochs", min=0,
                                              help="Epochs of the run left training for the console (0: none).")
              ) -> None:
    """Build the sandbox and leave it running (the emulator and the sshd); prints the command
    that opens the console on it."""
    _start(root, open_console, rows, epochs, hang, live_epochs)


def _start(root: Path, open_console: bool, rows: int, epochs: int, hang: bool, live_epochs: int) -> None:
    from backend.sandbox import build

    def on_signal(signum, frame):  # a terminal closed or a kill: the finally below stops everything
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    try:
        sb = build.start(root, log=lambda s: typer.echo(s, err=True), rows=rows, epochs=epochs, hang=hang,
                         live_epochs=live_epochs)
    except KeyboardInterrupt:
        typer.echo("interrupted: the sandbox was stopped", err=True)
        raise typer.Exit(130)
    typer.echo(f"sandbox ready in {sb.seconds:.0f} s: {sb.paths.root} (state.db, vast.toml, budget.toml)")
    typer.echo(f"idle instance {sb.idle_instance} holds an unsynced file: try kill-idle (k) on Instances, "
               "sync (s), then destroy")
    if not open_console:
        typer.echo(f"open the console on it:  {sb.console_command}")
        typer.echo(f"stop it (every process, by pid):  nko-ops sandbox stop"
                   + ("" if sb.console_command.endswith("console") else f" --dir {root}"))
        return
    try:
        _console(root)
    finally:
        build.stop(root, log=lambda s: typer.echo(s, err=True))


def _console(root: Path) -> None:
    from backend.sandbox import build

    p = build.paths(root)
    if not p.marker.exists():
        raise NkoOpsError(f"no sandbox in {p.root}: run `nko-ops sandbox start` first")
    # the emulator's key for the console's provider; vastai's config directory inside the
    # sandbox, so the user's own key file is never read
    os.environ.update(build.sandbox_env(p))
    from console.app import run

    run(str(p.db), 2.0, p.vast_toml, p.budget_toml, None)


@sandbox_app.command("console")
def console_cmd(root: Path = DIR) -> None:
    """Open the console on the sandbox (its state.db, settings and emulated account)."""
    _console(root)


@sandbox_app.command("status")
def status_cmd(root: Path = DIR) -> None:
    """What the sandbox runs now (processes by pid, ports)."""
    from backend.sandbox import build
    from backend.sandbox.procs import Record, listening

    p = build.paths(root)
    if not p.marker.exists():
        typer.echo(f"no sandbox in {p.root}")
        raise typer.Exit(1)
    rec = Record(p.root)
    running = rec.running()
    for name, info in rec.data["processes"].items():
        port = rec.data["ports"].get(name)
        state = "running" if name in running else "gone"
        typer.echo(f"{name:<9} pid {info['pid']:<8} {state}" + (f"  127.0.0.1:{port}"
                                                                 f"{' listening' if listening(port) else ''}"
                                                                 if port else ""))
    if not rec.data["processes"]:
        typer.echo("stopped")


@sandbox_app.command("stop")
def stop_cmd(root: Path = DIR) -> None:
    """Destroy the emulated instances and stop every process the sandbox started (by pid)."""
    from backend.sandbox import build

    stopped = build.stop(root, log=lambda s: typer.echo(s))
    if not stopped:
        typer.echo("nothing was running")
