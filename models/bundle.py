"""The one typed description of a run's files (CONTRACTS §3–§4).

A completed run directory holds the nine ``BUNDLE_FILES`` plus ``manifest.json`` (each
file's sha256 and size; written last, so a directory is complete iff it exists) and the
trainer's ``metrics.jsonl`` learning curve. This module names those files, the four
``PARTITIONS``, the row-level record (``PredictionRow``, one per test utterance: the AGP
corpus), and reads ``test_predictions.jsonl`` and ``metrics.jsonl`` for every user: the
trainer's output checks, bundle verification (backend/runs.py), the tables, the AGP lane
and the console.

    {"feat_id", "audio_id", "split", "script", "mode", "asr_text", "reference_text",
     "cer_edits", "reference_chars", "trajectory_scalars", "partition"}

Every row field is required; ``audio_id`` may be null where the audio is not known. Two
optional fields record a re-partition (see ``agp.partition``): ``model_partition`` (what the
acoustic model's policy said) and ``partition_source`` (``"model"`` or ``"policy:<hash>"``).
Any other field is refused, so a typo cannot silently drop data. Texts are normalised on
read (NFC, bidi controls and invisibles removed, whitespace folded); ``cer_edits`` /
``reference_chars`` must agree with the texts (models.text.row_edits). Errors name the file,
the line and the field, and nothing is returned until the whole file is valid.

Imports only the standard library and ``models`` (it runs on bare GPU boxes).
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Iterable

from models.errors import NkoOpsError
from models.jsonl import iter_objects
from models.summary_keys import SUMMARY_KEYS
from models.text import normalize, row_edits

PREDICTIONS = "test_predictions.jsonl"
REFERENCES = "test_references.jsonl"
METRICS_BY_PARTITION = "test_metrics_by_partition.json"
RESULTS = "results.json"
MANIFEST = "manifest.json"
METRICS = "metrics.jsonl"
BUNDLE_FILES = (RESULTS, "train.log", "run.log", "split.json", "vocab.json", "best.pt", PREDICTIONS, REFERENCES,
                METRICS_BY_PARTITION)

PARTITIONS = ("stable", "boundary", "uncertain", "novelty")
SPLITS = ("train", "val", "test")
SCRIPTS = ("nko", "latin")
MODES = ("baseline", "trajectory", "tar", "ttt")
PREDICTION_FIELDS = ("feat_id", "audio_id", "split", "script", "mode", "asr_text", "reference_text",
                     "cer_edits", "reference_chars", "trajectory_scalars", "partition")
OPTIONAL_FIELDS = ("model_partition", "partition_source")


class BundleError(NkoOpsError, ValueError):
    """A run bundle (or one of its files) that is missing, incomplete or inconsistent."""


class RowError(BundleError):
    """Bad prediction rows; ``problems`` holds one ``file:line N: field 'x': ...`` per issue."""

    def __init__(self, path: str, problems: list[str]):
        self.problems = problems
        shown = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        super().__init__(f"{path}: {len(problems)} invalid row(s)\n{shown}{more}")


@dataclass(frozen=True, slots=True)
class PredictionRow:
    """One test (or validation) utterance's record, as CONTRACTS §4 defines it."""

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
        for key in OPTIONAL_FIELDS:
            if d[key] is None:
                del d[key]
        return d


def _is_int(v: object) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _field_problems(obj: dict, bad) -> None:
    """Types and allowed values of a row's fields (every required field is present)."""
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
        return
    for k, v in scalars.items():
        if k not in SUMMARY_KEYS:  # only the trainer's summaries reach proposers: nothing reference-derived
            bad(f"trajectory_scalars.{k}", "not a trajectory summary key (models/summary_keys.py)")
        elif isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            bad(f"trajectory_scalars.{k}", f"must be a finite number; got {v!r}")


def parse_row(obj: object, where: str) -> tuple[PredictionRow | None, list[str]]:
    """Validate one decoded JSON value. ``where`` prefixes every problem (e.g. ``rows.jsonl:line 3``)."""
    if not isinstance(obj, dict):
        return None, [f"{where}: not a JSON object"]
    problems: list[str] = []

    def bad(name: str, message: str) -> None:
        problems.append(f"{where}: field '{name}': {message}")

    for name in PREDICTION_FIELDS:
        if name not in obj:
            bad(name, "missing")
    for name in obj:
        if name not in PREDICTION_FIELDS and name not in OPTIONAL_FIELDS:
            bad(name, "unknown field (CONTRACTS §4 schema)")
    if problems:
        return None, problems
    _field_problems(obj, bad)
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

    return PredictionRow(
        feat_id=obj["feat_id"], audio_id=obj["audio_id"], split=obj["split"], script=obj["script"],
        mode=obj["mode"], asr_text=asr, reference_text=reference,
        cer_edits=obj["cer_edits"], reference_chars=obj["reference_chars"],
        trajectory_scalars={k: float(v) for k, v in obj["trajectory_scalars"].items()}, partition=obj["partition"],
        model_partition=obj.get("model_partition"), partition_source=obj.get("partition_source"),
    ), []


def read_predictions(path: Path | str, script: str | None = None) -> list[PredictionRow]:
    """Read and validate a prediction-rows JSONL file (a run's ``test_predictions.jsonl``, or
    validation rows). Duplicate feat_ids are refused; with ``script``, rows in another script
    too. Raises RowError listing every problem by file, line and field."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"prediction rows not found: {path}")
    rows: list[PredictionRow] = []
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


def jsonl_bytes(rows: Iterable[dict]) -> bytes:
    """``test_predictions.jsonl`` (and the bundle's other JSONL files) as the trainer writes them."""
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode("utf-8")


def read_metrics(path: Path | str, kind: str | None = None, strict: bool = False) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (optionally only those of ``kind``: "epoch",
    "step", "status"), in file order. A run killed mid-write leaves a partial last line:
    lines that are not JSON objects are skipped, or, with ``strict``, refused with a
    BundleError naming the file and line."""
    path = Path(path)
    out, problems = [], []
    for lineno, obj, problem in iter_objects(path):
        if problem:
            problems.append(f"line {lineno}: {problem}")
            continue
        if kind is None or obj.get("kind") == kind:
            out.append(obj)
    if strict and problems:
        raise BundleError(f"{path}: " + "; ".join(problems))
    return out


def learning_curve(run_dir: Path | str) -> list[dict]:
    """The run's per-epoch records from ``metrics.jsonl`` ([] when it has none)."""
    path = Path(run_dir) / METRICS
    return read_metrics(path, kind="epoch") if path.is_file() else []
