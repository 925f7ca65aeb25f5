"""Prediction rows: the AGP corpus record (CONTRACTS §4), one per test utterance.

    {"feat_id", "audio_id", "split", "script", "mode", "asr_text", "reference_text",
     "cer_edits", "reference_chars", "trajectory_scalars", "partition"}

Every field is required; ``audio_id`` may be null where the audio is not known. Two optional
fields record a re-partition (see ``agp.partition``): ``model_partition`` (what the acoustic
model's policy said) and ``partition_source`` (``"model"`` or ``"policy:<hash>"``). Any other
field is refused, so a typo cannot silently drop data.

Texts are normalised on load (NFC, bidi controls and invisibles removed, whitespace folded);
``cer_edits``/``reference_chars`` must agree with the texts as written (models.text.row_edits).
Errors name the file, line and field, and nothing is returned until the whole file is valid.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from models.errors import NkoOpsError
from models.jsonl import iter_objects
from models.summary_keys import SUMMARY_KEYS
from models.text import normalize, row_edits

PARTITIONS = ("stable", "boundary", "uncertain", "novelty")
SPLITS = ("train", "val", "test")
SCRIPTS = ("nko", "latin")
MODES = ("baseline", "trajectory", "tar", "ttt")
REQUIRED = ("feat_id", "audio_id", "split", "script", "mode", "asr_text", "reference_text",
            "cer_edits", "reference_chars", "trajectory_scalars", "partition")
OPTIONAL = ("model_partition", "partition_source")


class RowError(NkoOpsError, ValueError):
    """Bad prediction rows; ``problems`` holds one ``path:line N: field 'x': ...`` per issue."""

    def __init__(self, path: str, problems: list[str]):
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{path}: {len(problems)} invalid row(s)\n{shown}{more}")


@dataclass(frozen=True, slots=True)
class Row:
    feat_id: str
    audio_id: str | None
    split: str
    script: str
    mode: str
    asr_text: str
    reference_text: str
    cer_edits: int
    reference_chars: int
    trajectory_scalars: dict[str, float] = field(hash=False)
    partition: str
    model_partition: str | None = None
    partition_source: str | None = None

    def as_dict(self) -> dict:
        d = asdict(self)
        for key in OPTIONAL:
            if d[key] is None:
                del d[key]
        return d


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def parse_row(obj: object, where: str) -> tuple[Row | None, list[str]]:
    """Validate one decoded JSON value. ``where`` prefixes every problem (e.g. ``rows.jsonl:line 3``)."""
    if not isinstance(obj, dict):
        return None, [f"{where}: not a JSON object"]
    problems: list[str] = []

    def bad(name: str, message: str) -> None:
        problems.append(f"{where}: field '{name}': {message}")

    for name in REQUIRED:
        if name not in obj:
            bad(name, "missing")
    for name in obj:
        if name not in REQUIRED and name not in OPTIONAL:
            bad(name, "unknown field (CONTRACTS §4 schema)")
    if problems:
        return None, problems

    if not isinstance(obj["feat_id"], str) or not obj["feat_id"].strip():
        bad("feat_id", "must be a non-empty string")
    if obj["audio_id"] is not None and (not isinstance(obj["audio_id"], str) or not obj["audio_id"].strip()):
        bad("audio_id", "must be a non-empty string or null")
    for name, allowed in (("split", SPLITS), ("script", SCRIPTS), ("mode", MODES), ("partition", PARTITIONS)):
        if obj[name] not in allowed:
            bad(name, f"must be one of {', '.join(allowed)}; got {obj[name]!r}")
    if obj.get("model_partition") is not None and obj["model_partition"] not in PARTITIONS:
        bad("model_partition", f"must be one of {', '.join(PARTITIONS)}; got {obj['model_partition']!r}")
    if obj.get("partition_source") is not None and not isinstance(obj["partition_source"], str):
        bad("partition_source", "must be a string")
    for name in ("asr_text", "reference_text"):
        if not isinstance(obj[name], str):
            bad(name, "must be a string")
    for name in ("cer_edits", "reference_chars"):
        if not _is_int(obj[name]) or obj[name] < 0:
            bad(name, "must be a non-negative integer")
    scalars = obj["trajectory_scalars"]
    if not isinstance(scalars, dict):
        bad("trajectory_scalars", "must be an object of name -> number")
    else:
        for k, v in scalars.items():
            if k not in SUMMARY_KEYS:  # only the trainer's summaries reach proposers: nothing reference-derived
                bad(f"trajectory_scalars.{k}", "not a trajectory summary key (models/summary_keys.py)")
            elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                bad(f"trajectory_scalars.{k}", f"must be a finite number; got {v!r}")
    if problems:
        return None, problems

    reference, asr = normalize(obj["reference_text"]), normalize(obj["asr_text"])
    if not reference:
        bad("reference_text", "is empty")
        return None, problems
    # counted on the texts as stored: NFC, bidi controls stripped, whitespace folded (CONTRACTS §6)
    edits, chars = row_edits(reference, asr)
    if obj["reference_chars"] != chars:
        bad("reference_chars", f"is {obj['reference_chars']} but the normalised reference has {chars} code points")
    if obj["cer_edits"] != edits:
        bad("cer_edits", f"is {obj['cer_edits']} but reference vs asr_text needs {edits} edits")
    if problems:
        return None, problems

    return Row(
        feat_id=obj["feat_id"], audio_id=obj["audio_id"], split=obj["split"], script=obj["script"],
        mode=obj["mode"], asr_text=asr, reference_text=reference,
        cer_edits=obj["cer_edits"], reference_chars=obj["reference_chars"],
        trajectory_scalars={k: float(v) for k, v in scalars.items()}, partition=obj["partition"],
        model_partition=obj.get("model_partition"), partition_source=obj.get("partition_source"),
    ), []


def load_rows(path: Path | str, script: str | None = None) -> list[Row]:
    """Read and validate a prediction-rows JSONL file. Duplicate feat_ids are refused. With
    ``script``, rows in another script are refused too. Raises RowError listing every problem."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prediction rows not found: {path}")
    rows: list[Row] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    for lineno, obj, problem in iter_objects(path):
        where = f"{path.name}:line {lineno}"
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        row, errs = parse_row(obj, where)
        if errs:
            problems.extend(errs)
            continue
        assert row is not None
        if row.feat_id in seen:
            problems.append(f"{where}: field 'feat_id': duplicate {row.feat_id!r} (first on line {seen[row.feat_id]})")
            continue
        if script is not None and row.script != script:
            problems.append(f"{where}: field 'script': this lane needs {script!r} rows; got {row.script!r}")
            continue
        seen[row.feat_id] = lineno
        rows.append(row)
    if problems:
        raise RowError(str(path), problems)
    return rows


def write_jsonl(path: Path | str, records: Iterable[dict]) -> int:
    """Write JSON lines atomically (temp file + rename): readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    n = 0
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for rec in records:
                f.write(json.dumps(rec, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise
    return n


def write_text(path: Path | str, text: str) -> None:
    """Write a text file atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def write_json(path: Path | str, obj: object) -> None:
    """Write one JSON document atomically."""
    write_text(path, json.dumps(obj, ensure_ascii=False, indent=1, sort_keys=True) + "\n")


def write_rows(path: Path | str, rows: Iterable[Row]) -> int:
    return write_jsonl(path, (r.as_dict() for r in rows))


def read_jsonl(path: Path | str, required: dict[str, type | tuple[type, ...]]) -> list[dict]:
    """Read a small JSONL file of objects whose ``required`` fields have the given types;
    problems name the line and field."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"file not found: {path}")
    out, problems = [], []
    for lineno, obj, problem in iter_objects(path):
        where = f"{path.name}:line {lineno}"
        if problem:
            problems.append(f"{where}: {problem}")
            continue
        ok = True
        for name, typ in required.items():
            if name not in obj:
                problems.append(f"{where}: field '{name}': missing")
                ok = False
            elif not isinstance(obj[name], typ) or (typ is int and isinstance(obj[name], bool)):
                problems.append(f"{where}: field '{name}': wrong type {type(obj[name]).__name__}")
                ok = False
        if ok:
            obj["_line"] = lineno
            out.append(obj)
    if problems:
        raise RowError(str(path), problems)
    return out
