"""Line-numbered reading of JSONL files, so every reader reports bad lines the same way."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator


def iter_objects(path: Path | str) -> Iterator[tuple[int, dict | None, str | None]]:
    """(line number, object, None) for each non-blank line holding a JSON object, and
    (line number, None, problem) for each line that does not."""
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:  # named by line here, by file by the caller
                yield lineno, None, f"not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1})"
                continue
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                yield lineno, None, f"not JSON ({e.msg})"
                continue
            if not isinstance(obj, dict):
                yield lineno, None, "not a JSON object"
                continue
            yield lineno, obj, None
