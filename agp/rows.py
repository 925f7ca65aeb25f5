"""The AGP lane's files: its JSONL/JSON/text outputs (written atomically, models/files.py)
and the small JSONL inputs it reads (proposals, decisions), whose problems name the line
and field. Prediction rows themselves (``PredictionRow``, ``read_predictions``,
``PARTITIONS``) are the run bundle's: models/bundle.py.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterable

from models.bundle import PredictionRow, RowError
from models.files import atomic_write_text
from models.jsonl import iter_objects


def write_jsonl(path: Path | str, records: Iterable[dict]) -> int:
    """Write JSON lines atomically (temp file + rename): readers never see half a file."""
    lines = [json.dumps(rec, ensure_ascii=False) + "\n" for rec in records]
    atomic_write_text(path, "".join(lines))
    return len(lines)


def write_rows(path: Path | str, rows: Iterable[PredictionRow]) -> int:
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
