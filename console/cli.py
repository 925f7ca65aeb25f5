"""``nko-ops console [--db state.db]``."""

from __future__ import annotations

from pathlib import Path

import typer


def console_cmd(
    db: str = typer.Option("state.db", "--db", help="State store to watch (created if absent)."),
    interval: float = typer.Option(2.0, "--interval", min=0.2, help="Seconds between refreshes."),
    settings: Path = typer.Option(Path("configs/vast.toml"), "--settings",
                                  help="Vast settings for the cloud actions and SSH log tails (as `nko-ops vast`)."),
    budget: Path = typer.Option(Path("configs/budget.toml"), "--budget", help="Budget: cap, warn level."),
    cloud_poll: float | None = typer.Option(None, "--cloud-poll", min=0,
                                     help="Seconds between polls of the Vast account (costs, idle timers); "
                                          "default the budget's poll_interval_s, 0 turns it off."),
) -> None:
    """Open the operations console: run matrix, gate review, instances and budget with kill-idle,
    adapters, live logs, sync."""
    from console.app import run

    run(db, interval, settings, budget, cloud_poll)
