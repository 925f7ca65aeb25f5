"""The one pattern every run id must match, wherever it enters (run configs, matrices,
`runs import`, the Vast lane's launch, logs and sync): it becomes a directory name locally
and on rented instances, so it starts with a letter or digit (never ``.``: a dot-directory
would hide the run), holds only letters, digits and ``. _ + -`` (no ``/``, no spaces, ASCII
only) and is at most 128 characters."""

from __future__ import annotations

import re

RUN_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,127}$")
RUN_ID_RULE = "must be 1-128 letters, digits and . _ + - (ASCII), starting with a letter or digit"


def run_id_problem(run_id: object) -> str | None:
    """Why ``run_id`` is not a valid run id; None when it is."""
    if not isinstance(run_id, str):
        return f"must be a string, got {run_id!r}"
    if not RUN_ID_RE.fullmatch(run_id):
        return f"{RUN_ID_RULE}, got {run_id!r}"
    return None


def check_run_id(run_id: object, where: str = "run id") -> str:
    """``run_id`` itself, or ValueError naming ``where``."""
    why = run_id_problem(run_id)
    if why:
        raise ValueError(f"{where}: {why}")
    return run_id  # type: ignore[return-value]
