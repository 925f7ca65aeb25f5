"""``nko-ops console [--db state.db]``."""

from __future__ import annotations

import typer


def console_cmd(
    db: str = typer.Option("state.db", "--db", help="State store to watch (created if absent)."),
    interval: float = typer.Option(2.0, "--interval", min=0.2, help="Seconds between refreshes."),
) -> None:
    """Open the operations console: run matrix, gate review, instances and budget, adapters."""
    from console.app import run

    run(db, interval)
