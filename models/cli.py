"""CLI for the text layer, snapshots and splits."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from models import text as T

text_app = typer.Typer(help="N'Ko / Latin text tools.", no_args_is_help=True)
snapshot_app = typer.Typer(help="Inspect canonical corpus snapshots.", no_args_is_help=True)
split_app = typer.Typer(help="Deterministic train/val/test splits.", no_args_is_help=True)


@text_app.command("to-nko")
def to_nko(text: str, native_g: bool = typer.Option(False, help="Write native g as plain ߜ."),
           gbarali: bool = typer.Option(False, help="Compress same-vowel syllable pairs (kɔnɔ -> ߞߣߐ)."),
           legacy: bool = typer.Option(False, help="Old orthography: read every 'ny' as ɲ.")) -> None:
    """Latin Bambara -> toneless N'Ko (ߑ in true clusters)."""
    typer.echo(T.latin_to_nko(text, native_g=native_g, gbarali=gbarali, legacy=legacy))


@text_app.command("to-latin")
def to_latin(text: str) -> None:
    """N'Ko -> Latin Bambara (gbarali vowels restored, tone dropped; · = undecidable vowel)."""
    typer.echo(T.nko_to_latin(text))


@text_app.command("normalize")
def normalize_cmd(text: str, script: str = typer.Option("nko", help="nko or latin"),
                  target: bool = typer.Option(False, help="Apply the ASR target policy (punctuation removed).")) -> None:
    """Normalise text the way references and hypotheses are normalised."""
    if target:
        typer.echo(T.target_text(text, script))
    elif script == "latin":
        typer.echo(T.normalize_latin(text))
    else:
        typer.echo(T.normalize_nko(text))


@text_app.command("check")
def check(text: str, punctuation: bool = typer.Option(True, help="Allow punctuation and typographic signs."),
          accept: str = typer.Option("", help="Comma-separated validity classes to accept (overrides --punctuation): "
                                              + ", ".join(T.VALIDITY_CLASSES) + "."),
          as_json: bool = typer.Option(False, "--json")) -> None:
    """Is TEXT valid N'Ko? Lists offending characters by class with positions; exit 1 if not."""
    classes = [c.strip() for c in accept.split(",") if c.strip()] or None
    try:
        bad = T.nko_offences(T.normalize(text), allow_punctuation=punctuation, accept=classes)
    except ValueError as e:
        typer.echo(f"error: --accept: {e}", err=True)
        raise typer.Exit(2)
    groups = T.offences_by_class(bad)
    if as_json:
        typer.echo(json.dumps({"valid": not bad, "by_class": {k: [{"position": o.position, "codepoint": o.codepoint,
                                                                     "name": o.name} for o in v]
                                                            for k, v in groups.items()}}, ensure_ascii=False))
    elif not bad:
        typer.echo("valid N'Ko")
    for klass, found in ({} if as_json else groups).items():
        typer.echo(f"{klass}: {len(found)} character(s)")
        for b in found:
            typer.echo(f"  {b}")
    if bad:
        raise typer.Exit(1)


@text_app.command("cer")
def cer(ref: str = typer.Option(..., "--ref"), hyp: str = typer.Option(..., "--hyp"),
        toneless: bool = typer.Option(False, "--toneless", help="Score the toneless projection."),
        as_json: bool = typer.Option(False, "--json")) -> None:
    """CER of one hypothesis against one reference (both NFC-normalised)."""
    result = T.corpus_cer([T.normalize(ref)], [T.normalize(hyp)], tone_free=toneless)
    if result.value is None:
        typer.echo("error: --ref is empty (after normalisation): CER is undefined without reference characters",
                   err=True)
        raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps(result.as_dict()))
    else:
        typer.echo(f"{result.value:.6f}")


@snapshot_app.command("describe")
def describe(path: Path, as_json: bool = typer.Option(False, "--json")) -> None:
    """Rows, sha256, duplicates, empty texts, invalid N'Ko rows, lengths. Exit 1 if broken."""
    from models.snapshot import describe as describe_snapshot

    info = describe_snapshot(path)
    if as_json:
        typer.echo(json.dumps(info, ensure_ascii=False, indent=1))
    else:
        typer.echo(f"snapshot   {info['path']}")
        typer.echo(f"sha256     {info['sha256']}")
        typer.echo(f"rows       {info['rows']}")
        typer.echo(f"nko        {info['nko']}")
        typer.echo(f"latin      {info['latin']}")
        if info.get("meta") and "nko_spelling" in info["meta"]:
            spelling = {k: v for k, v in info["meta"]["nko_spelling"].items() if k != "why"}
            typer.echo(f"nko spelling {spelling}  chars {info['meta'].get('chars')}")
        typer.echo(f"duplicates {len(info['duplicates'])}  empty {len(info['empty_texts'])}  "
                   f"invalid N'Ko {len(info['invalid_nko_rows'])}")
        for line in info["bad_lines"][:20]:
            typer.echo(f"  bad: {line}")
        for d in info["duplicates"][:20]:
            typer.echo(f"  duplicate feat_id: line {d['line']} ({d['feat_id']}), first on line {d['first_line']}")
        for e in info["empty_texts"][:20]:
            typer.echo(f"  empty text: line {e['line']} ({e['feat_id']}): field '{e['field']}'")
        for row in info["invalid_nko_rows"][:20]:
            typer.echo(f"  invalid N'Ko: line {row['line']} ({row['feat_id']}): {'; '.join(row['offences'])}")
    if not info["ok"]:
        raise typer.Exit(1)


@split_app.command("make")
def make(snapshot: Path, out: Path = typer.Option(..., help="split.json to write"),
         seed: int = 42, val_fraction: float = 0.1, test_fraction: float = 0.1) -> None:
    """Write split.json for SNAPSHOT (ordered feat_id lists and their sha256)."""
    from models.snapshot import load
    from models.split import make_split

    snap = load(snapshot)
    split = make_split(snap.feat_ids, seed, val_fraction, test_fraction, snap.sha256)
    split.save(out)
    typer.echo(f"{out}: {split.sizes()} sha256 {split.sha256}")
