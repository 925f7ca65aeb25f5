"""Build the embedded sample corpus (``data/sample``): short Bambara utterances in the
canonical snapshot format, with audio spoken by espeak-ng.

Text. Source sentences are the Latin-script FLORES-200 dev and devtest files copied in
``data/source/`` (CC BY-SA 4.0, see ``data/README.md``), less the 137 lines that are Gĩkũyũ
rather than Bambara (they contain ĩ or ũ, letters Bambara does not use). Each line is normalised with
``normalize_latin``, cut at clause punctuation, punctuation is removed, and every run of
3-8 consecutive words inside one clause is a candidate. A candidate is kept only if all its
characters are in the Latin vocabulary, it has no digits, it is already in target form,
and its transliteration is valid N'Ko inside the N'Ko vocabulary. The N'Ko is written with
``NKO_SPELLING`` (gbarali compression on: see below), recorded in ``snapshot_meta.json``
with the N'Ko/Latin character ratio. Utterances are drawn
with a seeded ``random.Random``: sentences in shuffled order, one window per sentence per
pass (length uniform over those the sentence offers), duplicates skipped. Rows are
``{"feat_id": "bam_sample_000000", "nko": latin_to_nko(latin, **NKO_SPELLING), "latin": latin}``.

Why compression is on: the references should be spelled the way N'Ko writers spell. In the
8,202 real N'Ko lines of ../shared/data/bambara-text, 39,284 same-vowel syllable pairs are
written compressed and 25,267 in full (``benchmarks/nko_orthography.py``); tone explains
part of the choice (13,108 of the full pairs have different tones), but Latin has no tone,
so the toneless rule is the best available: it spells 61% of those pairs as the writers
did (39% with compression off), and the toneless round trip N'Ko -> Latin -> N'Ko matches
94.58% of characters (93.18% off).

Audio. espeak-ng has no Bambara voice; its Swahili voice (``-v sw``) reads Latin Bambara
letters with close sounds once the letters it does not know are rewritten. The
speakable mapping, applied to the text espeak reads only (never to the stored rows), is

    ɛ -> e    ɔ -> o    ɲ -> ny    ŋ -> ng

so open and close e/o merge in the audio. Rate (words per minute) and pitch vary per
utterance, drawn from ``random.Random(f"{seed}/{feat_id}")``, and are recorded with the
source line in ``audio_meta.jsonl``. espeak's 22,050 Hz output is resampled to 16 kHz
(``models.audio.resample``) and written as mono OGG/Opus (Vorbis where libsndfile has no
Opus) to ``audio/<feat_id>.ogg``, read back at 16 kHz by soundfile. Only generation needs
espeak-ng; the result is committed, so the demo does not. A rebuild over an existing sample
copies each clip whose voice, rate, pitch and speakable text are unchanged (its bytes and
length stay identical) and renders only the others; ``--rerender`` renders every clip.
"""

from __future__ import annotations

import io
import json
import multiprocessing
import random
import re
import shutil
import subprocess
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import typer

from models.text import NORMALIZATION_VERSION, is_valid_nko, latin_to_nko, normalize_latin, target_text
from models.vocab import Vocab

REPO = Path(__file__).resolve().parents[1]
SOURCE_DIR = REPO / "data" / "source"
SOURCE_FILES = ("flores-200-dev.bam_Latn.dev", "flores-200-devtest.bam_Latn.devtest")
SAMPLE_RATE = 16_000
MIN_WORDS, MAX_WORDS = 3, 8
RATE_WPM = (135, 195)  # espeak-ng default is 175
PITCH = (25, 75)  # espeak-ng range 0-99, default 50
OPUS_COMPRESSION = 0.98  # about 14 kbit/s at 16 kHz mono: keeps data/ well under 10 MB
SPEAKABLE = str.maketrans({"ɛ": "e", "ɔ": "o", "ɲ": "ny", "ŋ": "ng"})
_CLAUSE_BREAK = re.compile(r"[.,;:!?()\[\]{}\"«»“”…/]| - | – | — ")
# 137 lines of the FLORES-200 bam_Latn files are Gĩkũyũ, not Bambara (upstream mix-up); the
# letters ĩ and ũ, which Bambara does not use, mark every one of them.
_NOT_BAMBARA = re.compile("[ĩũĨŨ]")
# How the sample's N'Ko references are spelled (models.text.latin_to_nko options); see above.
NKO_SPELLING = {"gbarali": True, "legacy": False, "native_g": False}
META_FILE = "snapshot_meta.json"


@dataclass(frozen=True)
class Utterance:
    feat_id: str
    latin: str
    nko: str
    source: str  # "<file>:<line>"


def speakable(latin: str) -> str:
    """The text espeak-ng reads for a Latin row (see the module docstring)."""
    return latin.translate(SPEAKABLE)


def voice_params(seed: int, feat_id: str) -> tuple[int, int]:
    """(rate in words per minute, pitch 0-99) for one utterance, seeded by id."""
    rng = random.Random(f"{seed}/{feat_id}")
    return rng.randint(*RATE_WPM), rng.randint(*PITCH)


def _word_nko(word: str, allowed: frozenset[str], nko_vocab: Vocab) -> str | None:
    """The N'Ko of one normalised Latin word, or None if the word is not usable."""
    if any(ch not in allowed for ch in word) or target_text(word, "latin") != word:
        return None
    nko = latin_to_nko(word, **NKO_SPELLING)
    if not is_valid_nko(nko, allow_punctuation=False) or nko_vocab.unknown([target_text(nko, "nko")]):
        return None
    return nko


def candidate_windows(source_dir: Path = SOURCE_DIR) -> list[tuple[str, list[tuple[str, str]]]]:
    """Per source sentence ("file:line"), its usable (latin, nko) windows of 3-8 words.
    Transliteration is word by word, so words are checked once and windows are joins."""
    latin_vocab, nko_vocab = Vocab.for_script("latin"), Vocab.for_script("nko")
    allowed = frozenset(s for s in latin_vocab.symbols[1:] if not s.isdigit())
    words_nko: dict[str, str | None] = {}
    out = []
    for name in SOURCE_FILES:
        path = Path(source_dir) / name
        if not path.exists():
            raise FileNotFoundError(f"sample source text not found: {path}")
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if _NOT_BAMBARA.search(line):
                continue
            windows, seen = [], set()
            for clause in _CLAUSE_BREAK.split(normalize_latin(line)):
                words = normalize_latin(clause, remove_punctuation=True).split()
                for w in words:
                    if w not in words_nko:
                        words_nko[w] = _word_nko(w, allowed, nko_vocab)
                nkos = [words_nko[w] for w in words]
                for size in range(MIN_WORDS, min(MAX_WORDS, len(words)) + 1):
                    for start in range(len(words) - size + 1):
                        span = nkos[start : start + size]
                        latin = " ".join(words[start : start + size])
                        if None in span or latin in seen:
                            continue
                        seen.add(latin)
                        windows.append((latin, " ".join(span)))  # type: ignore[arg-type]
            if windows:
                out.append((f"{name}:{lineno}", windows))
    return out


def choose_utterances(candidates: list[tuple[str, list[tuple[str, str]]]], n: int, seed: int) -> list[Utterance]:
    """Draw ``n`` distinct utterances, spreading them over sentences and lengths."""
    rng = random.Random(seed)
    pools = []
    for source, windows in candidates:
        by_len: dict[int, list[tuple[str, str]]] = {}
        for w in windows:
            by_len.setdefault(len(w[0].split()), []).append(w)
        pools.append((source, by_len))
    rng.shuffle(pools)
    chosen: list[tuple[str, str, str]] = []
    taken: set[str] = set()
    while len(chosen) < n and pools:
        remaining = []
        for source, by_len in pools:
            if len(chosen) == n:
                break
            size = rng.choice(sorted(by_len))
            latin, nko = by_len[size].pop(rng.randrange(len(by_len[size])))
            if not by_len[size]:
                del by_len[size]
            if latin not in taken:
                taken.add(latin)
                chosen.append((latin, nko, source))
            if by_len:
                remaining.append((source, by_len))
        pools = remaining
    if len(chosen) < n:
        raise ValueError(f"only {len(chosen)} distinct usable windows in the sources, asked for {n}")
    return [Utterance(f"bam_sample_{i:06d}", latin, nko, src) for i, (latin, nko, src) in enumerate(chosen)]


def synthesize(text: str, rate: int, pitch: int, voice: str = "sw") -> tuple[np.ndarray, int]:
    """espeak-ng speech for ``text`` as float32 mono and its sample rate."""
    proc = subprocess.run(["espeak-ng", "-v", voice, "-s", str(rate), "-p", str(pitch), "--stdout", "--stdin"],
                          input=text.encode("utf-8"), capture_output=True, check=False)
    if proc.returncode != 0 or not proc.stdout:
        raise RuntimeError(f"espeak-ng failed on {text!r}: {proc.stderr.decode(errors='replace').strip()}")
    audio, sr = sf.read(io.BytesIO(proc.stdout), dtype="float32")
    return (audio if audio.ndim == 1 else audio.mean(axis=1)), sr


def ogg_subtype() -> str:
    return "OPUS" if "OPUS" in sf.available_subtypes("OGG") else "VORBIS"


def _render(job: tuple[str, str, int, int, str]) -> float:
    from models.audio import resample  # torch: only when rendering, not for `nko-ops sample --help`

    feat_id, text, rate, pitch, audio_dir = job
    audio, sr = synthesize(text, rate, pitch)
    audio = resample(audio, sr, SAMPLE_RATE)
    peak = float(np.abs(audio).max())
    if peak > 0.99:  # the resampler's ripple can overshoot full scale
        audio *= 0.99 / peak
    subtype = ogg_subtype()
    kwargs = {"compression_level": OPUS_COMPRESSION} if subtype == "OPUS" else {}
    sf.write(Path(audio_dir) / f"{feat_id}.ogg", audio, SAMPLE_RATE, format="OGG", subtype=subtype, **kwargs)
    return len(audio) / SAMPLE_RATE


def _write_jsonl(path: Path, rows: list[dict]) -> None:
    with open(path, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")


def snapshot_meta(rows: list[dict]) -> dict:
    """What the snapshot's N'Ko is and how it relates to its Latin (``snapshot_meta.json``)."""
    nko_chars = sum(len(r["nko"]) for r in rows)
    latin_chars = sum(len(r["latin"]) for r in rows)
    return {
        "nko_spelling": {"function": "models.text.latin_to_nko", **NKO_SPELLING,
                         "normalization_version": NORMALIZATION_VERSION,
                         "why": "gbarali compression matches how N'Ko writers spell 61% of same-vowel syllable "
                                "pairs in real N'Ko text (39% without); see models/sample.py and "
                                "benchmarks/README.md (N'Ko orthography)"},
        "chars": {"nko": nko_chars, "latin": latin_chars, "nko_per_latin": round(nko_chars / latin_chars, 4)},
    }


def _reusable_audio(out: Path, jobs: list[tuple[str, str, int, int, str]]) -> dict[str, float]:
    """feat_id -> seconds for clips of an existing sample at ``out`` that a rebuild would
    render identically (same voice, rate, pitch and speakable text)."""
    meta_path = out / "audio_meta.jsonl"
    if not meta_path.exists():
        return {}
    old = {m["feat_id"]: m for m in (json.loads(line) for line in meta_path.read_text(encoding="utf-8").splitlines())}
    reuse = {}
    for feat_id, text, rate, pitch, _ in jobs:
        m = old.get(feat_id)
        if (m and (m["voice"], m["rate"], m["pitch"], m["speakable"]) == ("sw", rate, pitch, text)
                and (out / "audio" / f"{feat_id}.ogg").exists()):
            reuse[feat_id] = m["seconds"]
    return reuse


def build(out: Path, n: int = 1500, seed: int = 0, source_dir: Path = SOURCE_DIR, workers: int = 2,
          progress: bool = True, rerender: bool = False) -> dict:
    """Generate ``out`` (pairs.jsonl, audio_meta.jsonl, snapshot_meta.json, audio/). It is
    written next to ``out`` first and swapped in only when complete, so a failure leaves
    ``out`` as it was. Clips an existing ``out`` already has (same voice, rate, pitch and
    text) are copied byte for byte unless ``rerender``."""
    if n < 1:
        raise ValueError(f"--n must be at least 1, got {n}")
    out = Path(out)
    utterances = choose_utterances(candidate_windows(source_dir), n, seed)
    params = [voice_params(seed, u.feat_id) for u in utterances]
    jobs_all = [(u.feat_id, speakable(u.latin), r, p, "") for u, (r, p) in zip(utterances, params)]
    reuse = {} if rerender else _reusable_audio(out, jobs_all)
    if len(reuse) < len(jobs_all) and shutil.which("espeak-ng") is None:
        raise RuntimeError("espeak-ng is not installed; it is needed to generate the sample audio")
    partial = out.with_name(out.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    (partial / "audio").mkdir(parents=True)
    try:
        for feat_id in reuse:
            shutil.copy2(out / "audio" / f"{feat_id}.ogg", partial / "audio" / f"{feat_id}.ogg")
        jobs = [(f, t, r, p, str(partial / "audio")) for f, t, r, p, _ in jobs_all if f not in reuse]
        t0, seconds = time.monotonic(), dict(reuse)
        # spawn, not fork: forking a process that already runs threads (pytest, torch) can
        # copy a held lock into the child and hang it
        if jobs:
            with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
                for i, (job, secs) in enumerate(zip(jobs, pool.map(_render, jobs, chunksize=8)), 1):
                    seconds[job[0]] = round(secs, 3)
                    if progress and (i % 100 == 0 or i == len(jobs)):
                        elapsed = time.monotonic() - t0
                        typer.echo(f"  {i}/{len(jobs)} clips, {elapsed:.0f}s elapsed, "
                                   f"eta {elapsed / i * (len(jobs) - i):.0f}s", err=True)
        durations = [seconds[u.feat_id] for u in utterances]
        rows = [{"feat_id": u.feat_id, "nko": u.nko, "latin": u.latin} for u in utterances]
        _write_jsonl(partial / "pairs.jsonl", rows)
        _write_jsonl(partial / "audio_meta.jsonl", [
            {"feat_id": u.feat_id, "voice": "sw", "rate": r, "pitch": p, "speakable": speakable(u.latin),
             "seconds": round(d, 3), "source": u.source}
            for u, (r, p), d in zip(utterances, params, durations)])
        (partial / META_FILE).write_text(json.dumps(snapshot_meta(rows), ensure_ascii=False, indent=1) + "\n",
                                         encoding="utf-8")
        old = out.with_name(out.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        if out.exists():
            out.rename(old)
        partial.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    audio_bytes = sum(f.stat().st_size for f in (out / "audio").iterdir())
    return {"out": str(out), "rows": len(utterances), "seed": seed, "subtype": ogg_subtype(),
            "seconds_total": round(sum(durations), 1), "seconds_mean": round(sum(durations) / len(durations), 3),
            "audio_bytes": audio_bytes, "clips_rendered": len(jobs), "clips_reused": len(reuse)}


sample_app = typer.Typer(help="The embedded sample corpus.", no_args_is_help=True)


@sample_app.command("build")
def build_cmd(out: Path = typer.Option(REPO / "data" / "sample", help="Snapshot directory to write."),
              n: int = typer.Option(1500, help="Number of utterances."),
              seed: int = typer.Option(0, help="Seed for text choice, rate and pitch."),
              source: Path = typer.Option(SOURCE_DIR, help="Folder with the Latin source files."),
              workers: int = typer.Option(2, help="espeak-ng processes in parallel."),
              rerender: bool = typer.Option(False, help="Render every clip, even those the existing sample has.")) -> None:
    """Build the sample corpus (needs espeak-ng): pairs.jsonl, audio_meta.jsonl, snapshot_meta.json, audio/."""
    try:
        stats = build(out, n, seed, source, workers, rerender=rerender)
    except (RuntimeError, ValueError, FileNotFoundError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(1)
    typer.echo(json.dumps(stats))
