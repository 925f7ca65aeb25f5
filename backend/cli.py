"""The ``nko-ops`` command: one typer app, one sub-app per area."""

from __future__ import annotations

import typer

from agp.cli import agp_app
from backend.matrix_cli import register_backend
from backend.sandbox.cli import sandbox_app
from backend.thunder.cli import thunder_app
from backend.vast.cli import vast_app
from console.cli import console_cmd
from models.cli import snapshot_app, split_app, text_app
from models.features_cli import features_app
from models.sample import sample_app
from models.train_cli import evaluate_cmd, train_cmd

app = typer.Typer(help="nko-ops: N'Ko / Latin Bambara ASR operations.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
app.add_typer(text_app, name="text")
app.add_typer(snapshot_app, name="snapshot")
app.add_typer(split_app, name="split")
app.add_typer(sample_app, name="sample")
app.add_typer(features_app, name="features")
app.command("train")(train_cmd)
app.command("evaluate")(evaluate_cmd)
register_backend(app)  # matrix, runs, tables, claims, promote
app.add_typer(agp_app, name="agp")
app.add_typer(vast_app, name="vast")
app.add_typer(thunder_app, name="thunder")
app.command("console")(console_cmd)
app.add_typer(sandbox_app, name="sandbox")


@app.command()
def demo(
    db: str = typer.Option("state.db", help="State store path."),
    parallel: int = typer.Option(2, help="Trainer processes at once (one CPU thread each)."),
) -> None:
    """Run the main job on the embedded sample corpus (about 5 minutes on 2 cores; a rerun reuses completed runs)."""
    from backend.demo import run_demo

    raise typer.Exit(run_demo(db, parallel))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
