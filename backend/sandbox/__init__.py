"""``nko-ops sandbox``: every pane of the console alive on this machine alone (an emulated
Vast account, an sshd "instance" on 127.0.0.1, a 2-rank MLX ring), in its own state.db and
work directory. The building lives in backend/sandbox/build.py; this module only says
whether a state store is a sandbox's, which the console needs without importing the rest."""

from __future__ import annotations

from pathlib import Path

MARKER = "sandbox.json"  # beside the sandbox's state.db: its processes, ports and settings


def is_sandbox(db_path: str | Path) -> bool:
    """True when ``db_path`` is the state store of a sandbox (its marker file sits beside it)."""
    return (Path(db_path).resolve().parent / MARKER).is_file()
