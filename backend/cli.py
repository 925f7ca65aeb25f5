"""The ``nko-ops`` command: one typer app, one sub-app per area."""

from __future__ import annotations

import typer

from models.cli import snapshot_app, split_app, text_app

app = typer.Typer(help="nko-ops: N'Ko / Latin Bambara ASR operations.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
app.add_typer(text_app, name="text")
app.add_typer(snapshot_app, name="snapshot")
app.add_typer(split_app, name="split")
# sub-apps registered below, one line each (keep this marker)
# --- sub-apps ---


@app.command()
def demo(
    workdir: str = typer.Option("work/demo", help="Where the demo writes features, runs and reports."),
    db: str = typer.Option("state.db", help="State store path."),
) -> None:
    """Run the main job on the embedded sample corpus."""
    from backend.demo import run_demo

    raise typer.Exit(run_demo(workdir, db))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
