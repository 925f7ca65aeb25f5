"""The ``nko-ops`` command: one root group composing each area's sub-app, loaded on demand.

Each entry of ``SUBCOMMANDS`` names the module and attribute of a sub-app (a ``typer.Typer``)
or of a single command function, with the one-line help the root lists. Nothing is imported
until a command is invoked: ``nko-ops --help`` lists from this table alone, and ``nko-ops
text to-nko`` imports ``models.cli`` and ``models.text`` only (no torch, textual or cloud SDK).
``tests/unit/test_cli_root.py`` checks that each listed help line is the sub-app's own.

Errors: a ``models.errors.NkoOpsError`` (every user-fixable error class subclasses it) ends
as ONE line on stderr, ``error: <message>`` (the message names the file and the field), exit 2.
So do the standard library's bad-input errors (a missing or unreadable file, undecodable
bytes, a broken state store, a value a parser refused). Anything else is a bug and keeps its
traceback. ``NKO_OPS_TRACEBACK=1`` re-raises user errors too (for developers).
"""

from __future__ import annotations

import importlib
import os
import sqlite3
from dataclasses import dataclass

import typer
from typer.core import TyperCommand, TyperGroup

from models.errors import NkoOpsError


@dataclass(frozen=True)
class Sub:
    """A sub-app (``typer.Typer``) or a single command function, by import path."""

    module: str
    attr: str
    help: str


# In the order `nko-ops --help` lists them (as before the root loaded lazily). `help` is what
# the listing shows; it must stay the sub-app's own help (a command's docstring, its lines
# joined): tests/unit/test_cli_root.py checks.
SUBCOMMANDS: dict[str, Sub] = {
    "train": Sub("models.train_cli", "train_cmd",
                 "Train one run (resumes from OUT_DIR/last.pt when the run is not complete)."),
    "evaluate": Sub("models.train_cli", "evaluate_cmd",
                    "Re-decode RUN's test set from best.pt; without TTT options, check the predictions are "
                    "byte-identical to the run's (exit 1 if not). --split val decodes the validation set."),
    "tables": Sub("backend.matrix_cli", "tables_cmd",
                  "Markdown, LaTeX and CSV tables and PNG figures of a matrix, from its artifacts."),
    "promote": Sub("backend.matrix_cli", "promote_cmd",
                   "Write a promotion record: hashes, metrics, manifest, reproduction commands."),
    "console": Sub("console.cli", "console_cmd",
                   "Open the operations console: run matrix, gate review, instances and budget with kill-idle, "
                   "adapters, live logs, sync."),
    "demo": Sub("cli.root", "demo_cmd", "Run the main job on the embedded sample corpus (about 5 minutes on 2 cores; "
                                        "a rerun reuses completed runs)."),
    "text": Sub("models.cli", "text_app", "N'Ko / Latin text tools."),
    "snapshot": Sub("models.cli", "snapshot_app", "Inspect canonical corpus snapshots."),
    "split": Sub("models.cli", "split_app", "Deterministic train/val/test splits."),
    "sample": Sub("models.sample", "sample_app", "The embedded sample corpus."),
    "features": Sub("models.features_cli", "features_app",
                    "Whisper feature stores: extract from a snapshot's audio, import, describe."),
    "matrix": Sub("backend.matrix_cli", "matrix_app", "Run matrices: validate, plan, run."),
    "runs": Sub("backend.matrix_cli", "runs_app", "Run directories in the state store."),
    "claims": Sub("backend.matrix_cli", "claims_app", "Claims backed by measured CER."),
    "agp": Sub("agp.cli", "agp_app", "AGP corrective lane: partitions, corpus, proposals, gate, eval, reviews."),
    "vast": Sub("backend.vast.cli", "vast_app", "Vast.ai lane: rent GPUs for runs without losing data or money."),
    "thunder": Sub("backend.thunder.cli", "thunder_app",
                   "Thunder Train: MLX LoRA adapter runs across two Macs (ring over Thunderbolt)."),
    "sandbox": Sub("cli.sandbox", "sandbox_app",
                   "A local cloud sandbox: emulated Vast account, sshd instance, MLX ring, gate review. "
                   "Without a command: build it, open the console on it (on a terminal) and stop everything "
                   "when the console closes."),
}


def load(name: str) -> TyperCommand | TyperGroup:
    """The click command for sub-app NAME, importing its module now."""
    sub = SUBCOMMANDS[name]
    obj = getattr(importlib.import_module(sub.module), sub.attr)
    if isinstance(obj, typer.Typer):  # a sub-app: a group, even with one command (as add_typer made it)
        cmd = typer.main.get_group(obj)
    else:  # a single command function
        single = typer.Typer()
        single.command(name)(obj)
        cmd = typer.main.get_command(single)
    cmd.name = name
    return cmd


_LOADED: dict[str, TyperCommand | TyperGroup] = {}  # sub-apps imported so far, by name


def one_line_error(e: BaseException) -> str:
    """The line a user sees for a user error: its message, which names the file and the field.
    The standard library's own errors get the file in front where they know it."""
    if isinstance(e, NkoOpsError):
        return str(e)
    if isinstance(e, UnicodeDecodeError):
        return f"a file is not valid UTF-8 ({e.reason} at byte {e.start})"
    if isinstance(e, OSError) and e.filename is not None:
        return f"{e.filename}: {e.strerror or e}"
    if isinstance(e, sqlite3.Error):
        return f"state store: {e}"
    return str(e) or type(e).__name__  # e.g. FileNotFoundError("prediction rows not found: PATH")


# Bad input that reaches the standard library (a missing or unreadable file, bytes that do not
# decode, a broken state store, a value a parser refused): the user's to fix, reported like an
# NkoOpsError. Everything else is a bug and keeps its traceback.
USER_ERRORS = (NkoOpsError, OSError, UnicodeError, sqlite3.Error, ValueError)


class RootGroup(TyperGroup):
    """The CLI root: sub-apps load on first use; user errors end as one line, exit 2."""

    _listing = False  # True while the root formats its own --help

    def list_commands(self, ctx) -> list[str]:
        return list(SUBCOMMANDS)

    def get_command(self, ctx, cmd_name: str):
        if cmd_name not in SUBCOMMANDS:
            return None
        if self._listing:  # the root's --help: the listed line, without importing the sub-app
            return TyperCommand(cmd_name, help=SUBCOMMANDS[cmd_name].help)
        if cmd_name not in _LOADED:
            _LOADED[cmd_name] = load(cmd_name)
        return _LOADED[cmd_name]

    def format_help(self, ctx, formatter) -> None:
        self._listing = True
        try:
            super().format_help(ctx, formatter)
        finally:
            self._listing = False

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            if os.environ.get("NKO_OPS_TRACEBACK"):
                raise
            typer.echo(f"error: {one_line_error(e)}", err=True)
            raise typer.Exit(2) from None


app = typer.Typer(help="nko-ops: N'Ko / Latin Bambara ASR operations.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False, cls=RootGroup)


@app.callback()
def nko_ops() -> None:
    pass  # a callback makes the root a group (its commands are all in SUBCOMMANDS)


def demo_cmd(
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
