"""The ``nko-ops`` command: one typer app, one sub-app per area."""

from __future__ import annotations

import os
import sqlite3

import typer
from typer.core import TyperGroup

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


def one_line_error(e: BaseException) -> str:
    """What a user sees for an error no command handled itself: one line, naming the file."""
    from state.store import StoreError

    if isinstance(e, UnicodeDecodeError):
        return f"a file is not valid UTF-8 ({e.reason} at byte {e.start})"
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    if isinstance(e, sqlite3.Error):
        return f"state store: {e}"
    if isinstance(e, StoreError):
        return str(e)
    return f"{type(e).__name__}: {e}"


try:  # typer >= 0.2x vendors its click as typer._click
    from typer._click.exceptions import ClickException
except ImportError:  # older typer: the click package
    from click import ClickException

# usage errors, --help, typer.Exit: click's own handling
_PASS_THROUGH = (typer.Exit, typer.Abort, ClickException)


class RootGroup(TyperGroup):
    """The CLI root: any error a command did not turn into its own message ends as ONE line on
    stderr (exit 2; 1 for an unexpected one), never a traceback. NKO_OPS_TRACEBACK=1 re-raises
    (for developers)."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except _PASS_THROUGH:
            raise
        except Exception as e:
            if os.environ.get("NKO_OPS_TRACEBACK"):
                raise
            from state.store import StoreError

            expected = isinstance(e, (OSError, UnicodeError, sqlite3.Error, StoreError, ValueError))
            typer.echo(f"error: {one_line_error(e)}", err=True)
            raise typer.Exit(2 if expected else 1) from None


app = typer.Typer(help="nko-ops: N'Ko / Latin Bambara ASR operations.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False, cls=RootGroup)
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
