"""``nko-ops features``: build and inspect Whisper feature stores (models/features.py)."""

from __future__ import annotations

import json
from pathlib import Path

import typer

features_app = typer.Typer(help="Whisper feature stores: extract from a snapshot's audio, import, describe.",
                           no_args_is_help=True)


@features_app.command("extract")
def extract_cmd(
    snapshot: Path = typer.Option(..., "--snapshot", help="Snapshot dir (pairs.jsonl + audio/)."),
    out: Path = typer.Option(..., "--out", help="Feature store dir (created, or resumed when it exists)."),
    whisper: str = typer.Option(None, "--whisper", help="Recipe: tiny.en (packaged real weights) | large-v3 | "
                                                        "tiny-random | log-mel."),
    whisper_checkpoint: Path = typer.Option(None, "--whisper-checkpoint", help="An openai-whisper checkpoint "
                                            ".pt: its encoder, dims read from the file."),
    whisper_ct2: Path = typer.Option(None, "--whisper-ct2", help="A CTranslate2 / faster-whisper Whisper "
                                     "directory (model.bin): its encoder, dims read from the variables."),
    mode: str = typer.Option(None, "--mode", help="padded (30 s window, default for encoders) | trimmed."),
    batch_size: int = typer.Option(16, "--batch-size", min=1),
    device: str = typer.Option("auto", "--device", help="auto | cpu | cuda"),
    limit: int = typer.Option(None, "--limit", min=0, help="Only the first N rows of the snapshot."),
    subsample: int = typer.Option(None, "--subsample", min=1, help="Mean-pool factor (default 4)."),
    dtype: str = typer.Option("auto", "--dtype", help="Encoder compute dtype: auto (fp16 on CUDA, else fp32) | "
                                                       "float32 | float16 | bfloat16."),
    weights_dir: Path = typer.Option(None, "--weights-dir", help="Where large-v3.pt is (default: Whisper's "
                                                                 "cache dir)."),
    workers: int = typer.Option(4, "--workers", min=1, help="Audio decoding threads."),
    threads: int = typer.Option(0, "--threads", min=0, help="torch CPU threads (0: torch's default). On a "
                                                            "busy shared machine 1 can be much faster."),
    progress: bool = typer.Option(True, "--progress/--no-progress"),
) -> None:
    """Compute features for every row of SNAPSHOT into OUT; skips ids already stored."""
    from models.features import extract

    chosen = [x for x in (whisper, whisper_checkpoint, whisper_ct2) if x is not None]
    if len(chosen) != 1:
        typer.echo("error: give exactly one of --whisper NAME, --whisper-checkpoint FILE.pt, --whisper-ct2 DIR",
                   err=True)
        raise typer.Exit(2)
    if whisper_checkpoint is not None:
        whisper, weights_dir = "whisper-checkpoint", whisper_checkpoint
    elif whisper_ct2 is not None:
        whisper, weights_dir = "whisper-ct2", whisper_ct2
    if threads:
        import torch

        torch.set_num_threads(threads)
    summary = extract(snapshot, out, whisper, mode=mode, batch_size=batch_size, device=device, limit=limit,
                      subsample=subsample, compute_dtype=dtype, weights_dir=weights_dir, workers=workers,
                      progress=progress)
    typer.echo(json.dumps(summary))


@features_app.command("describe")
def describe_cmd(path: Path, as_json: bool = typer.Option(False, "--json")) -> None:
    """Recipe, hash, utterances, frame counts and shards of the store at PATH."""
    from models.features import FeatureStore

    info = FeatureStore.open(path).describe()
    if as_json:
        typer.echo(json.dumps(info, ensure_ascii=False, indent=1))
        return
    r = info["recipe"]
    typer.echo(f"store       {info['path']}")
    if r.get("name") == "imported":
        typer.echo(f"recipe      imported ({r.get('model', '?')}), pooling as declared: {r.get('pool', '?')}, "
                   f"stored float16")
    else:
        typer.echo(f"recipe      {r['name']} ({r.get('model', '?')}), mode {r.get('mode', '?')}, "
                   f"subsample {r.get('subsample', '?')} ({r.get('pool', '?')}), "
                   f"compute {r.get('compute_dtype', '?')}, stored float16")
    typer.echo(f"hash        {info['recipe_hash']}")
    if info.get("weights"):
        typer.echo(f"weights     {info['weights']['name']}  sha256:{info['weights']['sha256']}")
    typer.echo(f"dim         {info['dim']}   frame rate {r.get('frame_rate') or '?'}/s"
               + (f"   n_mels {r['n_mels']}" if "n_mels" in r else ""))
    if r.get("source_sha256"):
        typer.echo(f"imported    {r.get('source_files')} files from {r.get('source')}  sha256:{r['source_sha256']}")
    typer.echo(f"utterances  {info['utterances']}   frames {info['frames_total']} "
               f"(min {info['frames_min']}, mean {info['frames_mean']}, max {info['frames_max']})")
    typer.echo(f"shards      {info['shards']}   {info['bytes'] / 2**20:.1f} MiB")
    for s in info["sources"]:
        typer.echo(f"source      {s}")


@features_app.command("import")
def import_cmd(
    src: Path = typer.Argument(..., help="Directory of per-utterance arrays: <feat_id>.npy | <feat_id>.pt "
                                         "(a tensor, or a dict holding one), searched recursively."),
    snapshot: Path = typer.Option(..., "--snapshot", help="Snapshot dir (pairs.jsonl): ids outside it are refused."),
    out: Path = typer.Option(..., "--out", help="Feature store dir (created, or resumed for the same source)."),
    pool: str = typer.Option(..., "--pool", help="How the frames were pooled, as you know it, e.g. "
                                                 "'mean 4: 1500 -> 375 (padded 30 s window)'. Recorded in the recipe."),
    model: str = typer.Option(..., "--model", help="What computed them, e.g. 'openai-whisper large-v3 encoder'."),
    frame_rate: float = typer.Option(None, "--frame-rate", min=0.0, help="Stored frames per second (12.5 for "
                                                                         "1500 -> 375 over 30 s)."),
    key: str = typer.Option(None, "--key", help="Entry to read from .pt dicts that hold several tensors."),
    frames: int = typer.Option(None, "--frames", min=1, help="Require this many frames per utterance (e.g. 375)."),
    dim: int = typer.Option(None, "--dim", min=1, help="Require this feature dim (e.g. 1280)."),
    allow_missing: bool = typer.Option(False, "--allow-missing", help="Import even if some snapshot rows have "
                                                                      "no array (the store is then partial)."),
) -> None:
    """Check every array under SRC (shape, dtype, NaN/inf, feat_id in the snapshot) and write
    them into the float16 feature store OUT with an "imported" recipe (pooling, model, the
    source's sha256). Nothing is written unless every file passes."""
    from models.feature_import import import_features

    summary = import_features(src, snapshot, out, pooling=pool, model=model, frame_rate=frame_rate, key=key,
                              frames=frames, dim=dim, allow_missing=allow_missing)
    typer.echo(json.dumps(summary))
