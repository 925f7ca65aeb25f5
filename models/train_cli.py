"""``nko-ops train`` and ``nko-ops evaluate`` (heavy imports happen inside the commands).

This module is also the trainer's own entry point: executors (local, Vast, torchrun) start
``python -m models.train_cli train --config RUN.json``, which loads the training code and
nothing of backend/, agp/, console/ or the CLI root (a GPU box needs models/ alone). So the
commands report their own errors here (one line; a bad config exits 2, a failed run 1)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional

import typer


def _mode_from_flags(mode: str | None, use_trajectory: bool, use_tar: bool, use_ttt: bool) -> str | None:
    """The seed's --use-* flags as a mode: ttt implies the trajectory model; TAR is its own mode."""
    if not (use_trajectory or use_tar or use_ttt):
        return mode
    if use_tar and (use_trajectory or use_ttt):
        raise typer.BadParameter("--use-tar cannot be combined with --use-trajectory/--use-ttt (TAR is its own mode)")
    flag_mode = "tar" if use_tar else "ttt" if use_ttt else "trajectory"
    if mode and mode != flag_mode:
        raise typer.BadParameter(f"--mode {mode} contradicts the --use-* flags (which mean {flag_mode})")
    return flag_mode


def train_cmd(
    config: Path = typer.Option(..., "--config", help="Run config JSON (see models/config.py)."),
    script: Optional[str] = typer.Option(None, "--script", help="Override: nko | latin."),
    mode: Optional[str] = typer.Option(None, "--mode", help="Override: baseline | trajectory | tar | ttt."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Override the seed."),
    ttt_chunk_size: Optional[int] = typer.Option(None, "--ttt-chunk-size", help="Override ttt.chunk_size (encoder frames)."),
    ttt_lr: Optional[float] = typer.Option(None, "--ttt-lr", help="Override ttt.lr."),
    ttt_steps: Optional[int] = typer.Option(None, "--ttt-steps", help="Override ttt.steps (0 = no adaptation)."),
    tar_weight: Optional[float] = typer.Option(None, "--tar-weight", help="Override tar.weight (anticipation term)."),
    tar_smooth_weight: Optional[float] = typer.Option(None, "--tar-smooth-weight",
                                                      help="Override tar.smooth_weight (smoothness term)."),
    use_trajectory: bool = typer.Option(False, "--use-trajectory", help="Same as --mode trajectory."),
    use_tar: bool = typer.Option(False, "--use-tar", help="Same as --mode tar."),
    use_ttt: bool = typer.Option(False, "--use-ttt", help="Same as --mode ttt (trajectory model + TTT)."),
    out_dir: Optional[str] = typer.Option(None, "--out-dir", help="Override out_dir."),
    device: Optional[str] = typer.Option(None, "--device", help="Override: auto | cpu | cuda | cuda:N."),
) -> None:
    """Train one run (resumes from OUT_DIR/last.pt when the run is not complete)."""
    from models.config import ConfigError, load_config
    from models.data import DataError
    from models.train import RunError, train

    mode = _mode_from_flags(mode, use_trajectory, use_tar, use_ttt)
    overrides = {"script": script, "mode": mode, "seed": seed, "ttt.chunk_size": ttt_chunk_size, "ttt.lr": ttt_lr,
                 "ttt.steps": ttt_steps, "tar.weight": tar_weight, "tar.smooth_weight": tar_smooth_weight,
                 "out_dir": out_dir, "device": device}
    try:
        cfg = load_config(config, overrides)
    except ConfigError as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)
    try:
        out = train(cfg)
    except (RunError, DataError, ValueError, FileNotFoundError) as e:
        typer.echo(f"run {cfg.run_id} failed: {e}", err=True)
        if Path(cfg.out_dir, "error.json").exists():
            typer.echo(f"details: {Path(cfg.out_dir, 'error.json')}", err=True)
        raise typer.Exit(1)
    if int(os.environ.get("RANK", "0")) != 0:
        return  # under torchrun, rank 0 alone decodes and writes the bundle
    results = json.loads((out / "results.json").read_text(encoding="utf-8"))
    typer.echo(f"{out}: test CER {results['test_cer']:.4f} (toneless {results['test_toneless_cer']:.4f}), "
               f"best val loss {results['best_val_loss']:.4f} at epoch {results['best_epoch']}")


def evaluate_cmd(
    run: Path = typer.Option(..., "--run", help="A completed run directory."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write the re-decoded predictions here."),
    device: Optional[str] = typer.Option(None, "--device", help="Override the run's device."),
    ttt_steps: Optional[int] = typer.Option(None, "--ttt-steps", help="TTT ablation: steps."),
    ttt_lr: Optional[float] = typer.Option(None, "--ttt-lr", help="TTT ablation: learning rate."),
    ttt_chunk_size: Optional[int] = typer.Option(None, "--ttt-chunk-size", help="TTT ablation: chunk size."),
    ttt_method: Optional[str] = typer.Option(None, "--ttt-method", help="TTT ablation: adapter | suta."),
    ttt_guard: Optional[bool] = typer.Option(None, "--ttt-guard/--no-ttt-guard", help="TTT ablation: collapse guard."),
    split: str = typer.Option("test", "--split", help="test (check against the run) or val (needs --out: rows "
                                                       "for `nko-ops agp calibrate-partition`)."),
    as_json: bool = typer.Option(False, "--json"),
) -> None:
    """Re-decode RUN's test set from best.pt; without TTT options, check the predictions are
    byte-identical to the run's (exit 1 if not). --split val decodes the validation set."""
    from models.config import ConfigError
    from models.data import DataError
    from models.train import RunError, evaluate_run

    ttt = {k: v for k, v in {"steps": ttt_steps, "lr": ttt_lr, "chunk_size": ttt_chunk_size, "method": ttt_method,
                             "guard": ttt_guard}.items() if v is not None}
    try:
        report = evaluate_run(run, out, device, ttt or None, split)
    except (RunError, DataError, ConfigError, FileNotFoundError) as e:
        typer.echo(str(e), err=True)
        raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps(report, indent=1))
    elif split == "val":
        typer.echo(f"{run}: {report['rows']} val rows decoded into {out}; CER {report['cer']:.4f}")
    elif ttt:
        typer.echo(f"{run}: TTT {ttt} -> CER {report['cer']:.4f} (run: {report['run_cer']:.4f}); "
                   f"{report['asr_text_changed']} of {report['rows']} hypotheses changed")
    else:
        verdict = "identical to" if report["identical"] else f"DIFFERENT from ({report['differing_rows']} rows)"
        typer.echo(f"{run}: {report['rows']} predictions re-decoded, {verdict} test_predictions.jsonl; "
                   f"CER {report['cer']:.4f}")
    if split == "test" and not ttt and not report["identical"]:
        sys.exit(1)


app = typer.Typer(help="The trainer alone (what executors start): train, evaluate.", no_args_is_help=True,
                  pretty_exceptions_enable=False, add_completion=False)
app.command("train")(train_cmd)
app.command("evaluate")(evaluate_cmd)

if __name__ == "__main__":
    app()
