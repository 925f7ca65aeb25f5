"""Snapshot: the canonical corpus file (``pairs.jsonl`` rows ``{"feat_id","nko","latin"}``)
identified by its sha256 (CONTRACTS §5). A snapshot directory holds ``pairs.jsonl`` and,
for audio, ``audio/<feat_id>.<ext>`` (or a row field ``"audio"`` relative to the dir)."""

from __future__ import annotations

import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

from models.files import sha256_file
from models.errors import NkoOpsError
from models.jsonl import iter_objects
from models.text import nko_offences

PAIRS_FILE = "pairs.jsonl"
META_FILE = "snapshot_meta.json"  # optional: how the snapshot's text was made (models/sample.py writes it)
AUDIO_EXTS = (".ogg", ".opus", ".flac", ".wav")


class SnapshotError(NkoOpsError, ValueError):
    pass


def pairs_path(path: Path) -> Path:
    path = Path(path)
    return path / PAIRS_FILE if path.is_dir() else path


@dataclass
class Problem:
    line: int
    feat_id: str | None
    message: str
    kind: str = "bad"  # "bad" | "empty" | "duplicate"
    field: str | None = None  # the text field at fault ("nko" | "latin"), for "empty"
    first_line: int | None = None  # for "duplicate": the line the feat_id first appears on

    def __str__(self) -> str:
        where = f"line {self.line}" + (f" ({self.feat_id})" if self.feat_id else "")
        return f"{where}: {self.message}"


@dataclass
class Snapshot:
    path: Path  # the pairs.jsonl file
    sha256: str
    rows: list[dict]
    problems: list[Problem] = field(default_factory=list)
    lines: dict[str, int] = field(default_factory=dict)  # feat_id -> line number in the file

    @property
    def root(self) -> Path:
        return self.path.parent

    @property
    def feat_ids(self) -> list[str]:
        return [r["feat_id"] for r in self.rows]

    def by_id(self) -> dict[str, dict]:
        return {r["feat_id"]: r for r in self.rows}

    def audio_path(self, row: dict) -> Path:
        if row.get("audio"):
            return self.root / row["audio"]
        for ext in AUDIO_EXTS:
            p = self.root / "audio" / f"{row['feat_id']}{ext}"
            if p.exists():
                return p
        raise SnapshotError(f"{row['feat_id']}: no audio file under {self.root / 'audio'}")


def load(path: Path, strict: bool = True) -> Snapshot:
    """Read and check a snapshot. With ``strict``, any problem raises SnapshotError listing
    the offending lines; otherwise problems are collected on the result."""
    file = pairs_path(path)
    if not file.exists():
        raise SnapshotError(f"snapshot file not found: {file}")
    rows, problems, seen = [], [], {}
    for lineno, row, problem in iter_objects(file):
        if problem:
            problems.append(Problem(lineno, None, problem))
            continue
        fid = row.get("feat_id")
        if not isinstance(fid, str) or not fid:
            problems.append(Problem(lineno, None, "field 'feat_id' missing or not a string"))
            continue
        for key in ("nko", "latin"):
            if not isinstance(row.get(key), str):
                problems.append(Problem(lineno, fid, f"field '{key}' missing or not a string"))
            elif not row[key].strip():
                problems.append(Problem(lineno, fid, f"field '{key}' is empty", "empty", key))
        if fid in seen:
            problems.append(Problem(lineno, fid, f"duplicate feat_id (first on line {seen[fid]})", "duplicate",
                                    first_line=seen[fid]))
            continue
        seen[fid] = lineno
        rows.append(row)
    snap = Snapshot(file, sha256_file(file), rows, problems, seen)
    if strict and problems:
        shown = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise SnapshotError(f"{file}: {len(problems)} problem(s)\n{shown}{more}")
    return snap


def _meta(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError as e:
        raise SnapshotError(f"{path}: not JSON: {e}") from None


def describe(path: Path) -> dict:
    """Rows, sha256, duplicates, empty texts, invalid N'Ko rows, length stats. Each problem
    entry carries its line number in the file."""
    snap = load(path, strict=False)
    invalid_nko = []
    for r in snap.rows:
        if isinstance(r.get("nko"), str) and r["nko"].strip():
            bad = nko_offences(r["nko"])
            if bad:
                invalid_nko.append({"line": snap.lines[r["feat_id"]], "feat_id": r["feat_id"],
                                    "offences": [str(b) for b in bad[:5]]})

    def stats(key: str) -> dict:
        lens = [len(r[key]) for r in snap.rows if isinstance(r.get(key), str)]
        words = [len(r[key].split()) for r in snap.rows if isinstance(r.get(key), str)]
        if not lens:
            return {}
        return {"chars_min": min(lens), "chars_mean": round(statistics.fmean(lens), 2), "chars_max": max(lens),
                "words_mean": round(statistics.fmean(words), 2)}

    return {
        "path": str(snap.path),
        "sha256": snap.sha256,
        "rows": len(snap.rows),
        "duplicates": [{"line": p.line, "feat_id": p.feat_id, "first_line": p.first_line}
                       for p in snap.problems if p.kind == "duplicate"],
        "empty_texts": [{"line": p.line, "feat_id": p.feat_id, "field": p.field}
                        for p in snap.problems if p.kind == "empty"],
        "bad_lines": [str(p) for p in snap.problems if p.kind == "bad"],
        "invalid_nko_rows": invalid_nko,
        "nko": stats("nko"),
        "latin": stats("latin"),
        "meta": _meta(snap.root / META_FILE),
        "ok": not snap.problems and not invalid_nko,
    }
