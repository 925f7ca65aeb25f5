"""Reading the project's TOML policy and config files with errors that name the file."""

from __future__ import annotations

import tomllib
from pathlib import Path


def read_toml(path: Path | str, error: type[Exception], what: str = "file") -> dict:
    """Parse ``path``; a missing, undecodable or invalid file raises ``error`` naming it."""
    path = Path(path)
    try:
        return tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise error(f"{what} not found: {path}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid TOML ({e})") from None
    except OSError as e:  # a directory, no permission, an I/O error
        raise error(f"{path}: cannot read it ({e.strerror or e})") from None
