"""Run matrix: one JSON file (``configs/matrix/*.json``) naming every run of a bundle.

All runs of a matrix share one snapshot, one split and one feature recipe (CONTRACTS §5), so
their test utterances pair up. The file gives those once at the top; a run may restate any
of them (``snapshot``/``snapshot_sha256``, ``split``/``split_sha256``,
``features``/``recipe_hash``) only to agree. Hashes left ``null`` are computed from the
files when the matrix runs and pinned in state.db on first use.

    {"matrix_id": "demo", "snapshot": "data/sample", "snapshot_sha256": "…",
     "split": "work/demo/split.json", "split_sha256": "…", "features": "work/demo/features",
     "recipe_hash": "…", "out_root": "work/demo/runs", "reference_run": "demo-nko-trajectory",
     "defaults": {"model": {"preset": "demo"}, "train": {"epochs": 20}},
     "sanity": {"subset": {"train": 48, "val": 16, "test": 16}, "epochs": 1},
     "runs": [{"run_id": "demo-nko-baseline", "script": "nko", "mode": "baseline", "seed": 42}, …]}

Each run's trainer config (models/config.py RunConfig) is the matrix defaults deep-merged with
the run's own ``model``/``train``/``ttt``/``tar`` sections, with ``out_dir`` =
``out_root/run_id``. Loading validates everything, including those merged configs, and a bad
file raises MatrixError with one line per problem naming the run and the field.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from models.errors import NkoOpsError
from models.runid import RUN_ID_RE as _RUN_ID, RUN_ID_RULE  # one run id pattern everywhere

IDENTITY_FIELDS = (("snapshot", "snapshot_sha256"), ("split", "split_sha256"), ("features", "recipe_hash"))
_SHA = re.compile(r"^[0-9a-f]{64}$")


class MatrixError(NkoOpsError, ValueError):
    pass


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunSpec(_Strict):
    run_id: str
    script: Literal["nko", "latin"]
    mode: Literal["baseline", "trajectory", "tar", "ttt"]
    seed: int = Field(42, ge=0, le=2**32 - 1)
    optional: bool = False
    note: str = ""
    # An existing run directory that satisfies this run when it passes `nko-ops runs import`
    # (e.g. the published Paper 4 run); when it is absent or fails the checks, the run trains.
    import_from: str | None = None
    snapshot: str | None = None
    snapshot_sha256: str | None = None
    split: str | None = None
    split_sha256: str | None = None
    features: str | None = None
    recipe_hash: str | None = None
    model: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    ttt: dict[str, Any] = Field(default_factory=dict)
    tar: dict[str, Any] = Field(default_factory=dict)
    device: str | None = None


class Defaults(_Strict):
    model: dict[str, Any] = Field(default_factory=dict)
    train: dict[str, Any] = Field(default_factory=dict)
    ttt: dict[str, Any] = Field(default_factory=dict)
    tar: dict[str, Any] = Field(default_factory=dict)
    device: str = "auto"


class SanitySubset(_Strict):
    train: int = Field(64, gt=0)
    val: int = Field(16, gt=0)
    test: int = Field(16, gt=0)


class Sanity(_Strict):
    """One short run per distinct (script, mode) before the full runs start."""

    subset: SanitySubset = SanitySubset()
    epochs: int = Field(1, gt=0)


class Forecast(_Strict):
    """Inputs of `matrix plan`'s forecast when state.db has no measured timings yet."""

    epoch_seconds: float | None = Field(None, gt=0)
    usd_per_hour: float = Field(0.0, ge=0)
    source: str = ""


class Matrix(_Strict):
    matrix_id: str
    description: str = ""
    snapshot: str
    snapshot_sha256: str | None = None
    split: str
    split_sha256: str | None = None
    features: str
    recipe_hash: str | None = None
    out_root: str
    reference_run: str | None = None
    defaults: Defaults = Defaults()
    sanity: Sanity = Sanity()
    forecast: Forecast = Forecast()
    agp_dumps: list[str] = Field(default_factory=list)
    runs: list[RunSpec] = Field(min_length=1)

    # filled by load_matrix, not part of the file
    path: Path | None = Field(None, exclude=True)
    file_sha256: str = Field("", exclude=True)

    def run(self, run_id: str) -> RunSpec:
        for r in self.runs:
            if r.run_id == run_id:
                return r
        raise MatrixError(f"matrix {self.matrix_id}: no run {run_id!r}")

    def out_dir(self, run: RunSpec) -> Path:
        return Path(self.out_root) / run.run_id

    def sanity_dir(self, run: RunSpec) -> Path:
        return Path(self.out_root) / "_sanity" / run.run_id

    def selected(self, with_optional: bool = False, only: list[str] | None = None) -> list[RunSpec]:
        if only:
            unknown = [o for o in only if o not in {r.run_id for r in self.runs}]
            if unknown:
                raise MatrixError(f"matrix {self.matrix_id}: no run(s) {', '.join(map(repr, unknown))}")
            return [r for r in self.runs if r.run_id in only]
        return [r for r in self.runs if with_optional or not r.optional]

    def run_config(self, run: RunSpec, sanity: bool = False) -> dict:
        """The trainer config (models/config.py RunConfig, as JSON) for one run."""
        cfg: dict[str, Any] = {
            "run_id": run.run_id, "script": run.script, "mode": run.mode, "seed": run.seed,
            "snapshot": run.snapshot or self.snapshot,
            "split": run.split or self.split,
            "features": run.features or self.features,
            "out_dir": str(self.sanity_dir(run) if sanity else self.out_dir(run)),
            "device": run.device or self.defaults.device,
        }
        sha = run.snapshot_sha256 or self.snapshot_sha256
        if sha:
            cfg["snapshot_sha256"] = sha
        for section in ("model", "train", "ttt", "tar"):
            merged = _deep_merge(getattr(self.defaults, section), getattr(run, section))
            if merged:
                cfg[section] = merged
        if sanity:
            cfg["train"] = {**cfg.get("train", {}), "epochs": self.sanity.epochs}
            cfg["subset"] = self.sanity.subset.model_dump()
        return cfg


def _deep_merge(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def config_sha256(cfg: dict) -> str:
    return hashlib.sha256(json.dumps(cfg, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


def _where(loc: tuple, raw: Any) -> tuple[str, str]:
    """('run 'id' (runs[3])' or 'matrix', dotted field) for a pydantic error location."""
    if len(loc) >= 2 and loc[0] == "runs" and isinstance(loc[1], int):
        rid = None
        if isinstance(raw, dict) and isinstance(raw.get("runs"), list) and loc[1] < len(raw["runs"]):
            item = raw["runs"][loc[1]]
            if isinstance(item, dict) and isinstance(item.get("run_id"), str):
                rid = item["run_id"]
        who = f"run {rid!r} (runs[{loc[1]}])" if rid else f"runs[{loc[1]}]"
        return who, ".".join(str(p) for p in loc[2:]) or "(the run)"
    return "matrix", ".".join(str(p) for p in loc) or "(top level)"


def _pydantic_lines(err: ValidationError, raw: Any, who: str | None = None) -> list[str]:
    lines = []
    for e in err.errors():
        if who is None:
            where, fld = _where(tuple(e["loc"]), raw)
        else:
            where, fld = who, ".".join(str(p) for p in e["loc"]) or "(top level)"
        if e["type"] == "missing":
            lines.append(f"{where}: field '{fld}' is required but missing")
        elif e["type"] == "extra_forbidden":
            lines.append(f"{where}: field '{fld}' is not a known setting")
        else:
            shown = repr(e.get("input"))
            shown = shown if len(shown) <= 60 else shown[:57] + "..."
            lines.append(f"{where}: field '{fld}': {e['msg']} (got {shown})")
    return lines


def _cross_checks(m: Matrix) -> list[str]:
    problems = []
    seen: dict[str, int] = {}
    for i, r in enumerate(m.runs):
        who = f"run {r.run_id!r} (runs[{i}])"
        if not _RUN_ID.fullmatch(r.run_id):
            problems.append(f"{who}: field 'run_id' {RUN_ID_RULE}")
        if r.run_id in seen:
            problems.append(f"{who}: field 'run_id' duplicates runs[{seen[r.run_id]}]; run ids must be unique")
        else:
            seen[r.run_id] = i
        for path_field, hash_field in IDENTITY_FIELDS:
            mine, theirs = getattr(r, hash_field), getattr(m, hash_field)
            if mine is not None and theirs is not None and mine != theirs:
                problems.append(f"{who}: field '{hash_field}' is {mine[:16]}…, the matrix's is {theirs[:16]}…; "
                                f"every run of a matrix must use the same {path_field}")
            if mine is not None and theirs is None:
                problems.append(f"{who}: field '{hash_field}' is set but the matrix has none; pin "
                                f"'{hash_field}' at the top so every run agrees")
    for name in ("snapshot_sha256", "split_sha256"):
        values = [("matrix", getattr(m, name))] + [(f"run {r.run_id!r}", getattr(r, name)) for r in m.runs]
        for who, v in values:
            if v is not None and not _SHA.match(v):
                problems.append(f"{who}: field '{name}' must be 64 lower-case hex digits (got {v[:70]!r})")
    ids = set(seen)
    if m.reference_run is not None and m.reference_run not in ids:
        problems.append(f"matrix: field 'reference_run' names {m.reference_run!r}, which is not a run of this matrix")
    for j, rid in enumerate(m.agp_dumps):
        if rid not in ids:
            problems.append(f"matrix: field 'agp_dumps[{j}]' names {rid!r}, which is not a run of this matrix")
    if not _RUN_ID.fullmatch(m.matrix_id):
        problems.append("matrix: field 'matrix_id' must be letters, digits and . _ + -")
    return problems


def _trainer_checks(m: Matrix) -> list[str]:
    """Validate every run's merged config (defaults + run sections) with the trainer's schema."""
    from models.config import RunConfig

    problems = []
    for i, r in enumerate(m.runs):
        for sanity in (False, True):
            who = f"run {r.run_id!r} (runs[{i}]){' sanity config' if sanity else ''} after merging defaults"
            try:
                RunConfig.model_validate(m.run_config(r, sanity=sanity))
            except ValidationError as e:
                problems += _pydantic_lines(e, None, who)
                break
    return problems


def parse_matrix(raw: Any, source: str = "matrix") -> Matrix:
    if not isinstance(raw, dict):
        raise MatrixError(f"{source}: a matrix must be a JSON object, got {type(raw).__name__}")
    try:
        m = Matrix.model_validate(raw)
    except ValidationError as e:
        raise MatrixError(f"{source}: invalid matrix\n  " + "\n  ".join(_pydantic_lines(e, raw))) from None
    problems = _cross_checks(m)
    if not problems:
        problems = _trainer_checks(m)
    if problems:
        raise MatrixError(f"{source}: invalid matrix\n  " + "\n  ".join(problems))
    return m


def load_matrix(path: str | Path) -> Matrix:
    """Read and validate a matrix file; MatrixError (one line per problem) if it is bad."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise MatrixError(f"matrix file not found: {path}") from None
    except OSError as e:
        raise MatrixError(f"{path}: cannot read ({e.strerror})") from None
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise MatrixError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except json.JSONDecodeError as e:
        raise MatrixError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno}: {e.msg})") from None
    except RecursionError:
        raise MatrixError(f"{path}: JSON nested too deeply") from None
    m = parse_matrix(raw, str(path))
    m.path = path
    m.file_sha256 = hashlib.sha256(data).hexdigest()
    return m


# --------------------------------------------------------------------------- identities

@dataclass
class Identity:
    """The snapshot / split / feature-recipe hashes a matrix resolves to on disk."""

    snapshot_sha256: str | None = None
    split_sha256: str | None = None
    recipe_hash: str | None = None
    snapshot_rows: int | None = None
    split_sizes: dict = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems and None not in (self.snapshot_sha256, self.split_sha256, self.recipe_hash)


def _snapshot_sha(path: str) -> tuple[str, int]:
    from models.files import sha256_file
    from models.snapshot import pairs_path

    p = pairs_path(Path(path))
    if not p.exists():
        raise FileNotFoundError(f"snapshot file not found: {p}")
    with open(p, "rb") as f:
        rows = sum(1 for line in f if line.strip())
    return sha256_file(p), rows


def _split_sha(path: str) -> tuple[str, dict, str]:
    from models.split import Split

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"split file not found: {p}")
    s = Split.load(p)
    return s.sha256, s.sizes(), s.snapshot_sha256


def _recipe_hash(path: str) -> str:
    from models.features import FeatureStore

    return FeatureStore.open(Path(path)).recipe_hash


def identity_of(snapshot: str, split: str, features: str) -> Identity:
    """The identities of one run config's snapshot, split and feature store (no pins)."""
    snap, rows = _snapshot_sha(snapshot)
    split_sha, sizes, _ = _split_sha(split)
    return Identity(snap, split_sha, _recipe_hash(features), snapshot_rows=rows, split_sizes=sizes)


def resolve(m: Matrix) -> Identity:
    """Hash the matrix's snapshot, split and feature store (and any run-level paths) and
    compare them with the pinned values; every disagreement is a problem naming its run."""
    ident = Identity()
    cache: dict[tuple[str, str], Any] = {}

    def measure(kind: str, path: str):
        key = (kind, path)
        if key not in cache:
            try:
                if kind == "snapshot":
                    cache[key] = _snapshot_sha(path)
                elif kind == "split":
                    cache[key] = _split_sha(path)
                else:
                    cache[key] = (_recipe_hash(path),)
            except (OSError, ValueError) as e:
                cache[key] = e
        return cache[key]

    for path_field, hash_field in IDENTITY_FIELDS:
        got = measure(path_field, getattr(m, path_field))
        if isinstance(got, Exception):
            ident.problems.append(f"matrix: field '{path_field}': {got}")
            continue
        value = got[0]
        pinned = getattr(m, hash_field)
        if pinned is not None and pinned != value:
            ident.problems.append(f"matrix: field '{hash_field}' pins {pinned[:16]}…, but "
                                  f"{getattr(m, path_field)} has {value[:16]}…")
            continue
        setattr(ident, hash_field, value)
        if path_field == "snapshot":
            ident.snapshot_rows = got[1]
        if path_field == "split":
            ident.split_sizes = got[1]
            if got[2] and ident.snapshot_sha256 and got[2] != ident.snapshot_sha256:
                ident.problems.append(f"matrix: field 'split': {m.split} was made from snapshot {got[2][:16]}…, "
                                      f"not {ident.snapshot_sha256[:16]}…")
    for i, r in enumerate(m.runs):
        for path_field, hash_field in IDENTITY_FIELDS:
            p = getattr(r, path_field)
            if p is None or p == getattr(m, path_field):
                continue
            got = measure(path_field, p)
            want = getattr(ident, hash_field)
            if isinstance(got, Exception):
                ident.problems.append(f"run {r.run_id!r} (runs[{i}]): field '{path_field}': {got}")
            elif want is not None and got[0] != want:
                ident.problems.append(f"run {r.run_id!r} (runs[{i}]): field '{path_field}' is {p} "
                                      f"({hash_field} {got[0][:16]}…), the matrix's is {want[:16]}…; "
                                      f"every run of a matrix must use the same {path_field}")
    return ident
