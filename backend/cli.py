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
from backend.vast.cli import vast_app; app.add_typer(vast_app, name="vast")  # noqa: E402,E702
from backend.thunder.cli import thunder_app; app.add_typer(thunder_app, name="thunder")  # noqa: E402,E702
from backend.matrix_cli import register_backend; register_backend(app)  # noqa: E402,E702
from console.cli import console_cmd; app.command("console")(console_cmd)  # noqa: E402,E702
from models.train_cli import evaluate_cmd, train_cmd; app.command("train")(train_cmd); app.command("evaluate")(evaluate_cmd)  # noqa: E402,E702
from agp.cli import agp_app; app.add_typer(agp_app, name="agp")  # noqa: E402,E702
from models.features_cli import features_app; app.add_typer(features_app, name="features")  # noqa: E402,E702
from models.sample import sample_app; app.add_typer(sample_app, name="sample")  # noqa: E402,E702


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
