"""Calibrate the AGP partition policy on *validation* rows, so the thresholds that decide
which test rows the gate may touch were never fitted on test rows.

    nko-ops evaluate --run RUN --split val --out RUN_val.jsonl
    nko-ops agp calibrate-partition --rows RUN_val.jsonl --out configs/agp/partition.val.toml

The base policy (``configs/agp/partition.toml``) gives the structure: the rule order, the
fallback, each rule's ``match`` and the summary keys it bounds below (``min``) or above
(``max``). Each bound is set anew from the rows, one key at a time, by what its partition is
for (CONTRACTS §4):

- novelty (quarantine): beyond what in-domain validation rows show. A ``min`` bound goes to
  the key's ``novelty_quantile`` (default 0.98), a ``max`` bound to 1 minus it.
- stable (keep unchanged): the loosest threshold whose rows have a CER of at most
  ``stable_cer_ratio`` x the validation CER (default 0.5), holding at least ``min_share``
  of the rows.
- uncertain (abstain without strong evidence): the loosest threshold whose rows have a CER
  of at least ``uncertain_cer_ratio`` x the validation CER (default 1.5), same share rule.
- boundary: the fallback, no thresholds.

"Loosest" is the threshold selecting the most rows. A stable or uncertain bound whose target
no threshold reaches (with ``min_share`` of the rows) is dropped, and the report says so: the
key does not separate good rows from bad ones here, so it neither flags rows in an ``any``
rule nor lets rows through in an ``all`` rule. A rule left with no condition leaves the
order (no row goes there). The written file records the rows' sha256, the targets, and each
partition's share and CER on the validation rows, under both the base policy and the
calibrated one.
"""

from __future__ import annotations

import hashlib
import json
import math
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from agp.partition import PartitionError, PartitionPolicy, load_partition_policy, parse_partition_policy
from models.files import atomic_write_text
from models.bundle import PARTITIONS, PredictionRow, read_predictions

MIN_ROWS = 50
MAX_CANDIDATES = 400  # thresholds tried per key: every distinct value, or this many quantiles


@dataclass(frozen=True)
class Targets:
    novelty_quantile: float = 0.98
    stable_cer_ratio: float = 0.5
    uncertain_cer_ratio: float = 1.5
    min_share: float = 0.05

    def check(self) -> None:
        if not 0.5 < self.novelty_quantile < 1:
            raise PartitionError(f"novelty_quantile must be in (0.5, 1) (got {self.novelty_quantile})")
        if not 0 < self.stable_cer_ratio < 1:
            raise PartitionError(f"stable_cer_ratio must be in (0, 1) (got {self.stable_cer_ratio})")
        if not self.uncertain_cer_ratio > 1:
            raise PartitionError(f"uncertain_cer_ratio must be above 1 (got {self.uncertain_cer_ratio})")
        if not 0 < self.min_share < 0.5:
            raise PartitionError(f"min_share must be in (0, 0.5) (got {self.min_share})")


@dataclass(frozen=True)
class Slice:
    rows: int
    share: float
    cer: float | None


@dataclass
class Calibration:
    policy: dict  # trainer-format policy (no ``source``)
    rows_path: str
    rows_sha256: str
    base_path: str
    targets: Targets
    val_cer: float
    base_slices: dict[str, Slice]
    slices: dict[str, Slice]
    thresholds: list[str] = field(default_factory=list)  # one line per bound: how it was chosen
    warnings: list[str] = field(default_factory=list)


def _cer(rows: Sequence[PredictionRow]) -> float | None:
    chars = sum(r.reference_chars for r in rows)
    return sum(r.cer_edits for r in rows) / chars if chars else None


def _quantile(sorted_values: list[float], q: float) -> float:
    """The value at rank ``q`` (nearest rank, so the threshold is a value the rows hold)."""
    return sorted_values[min(len(sorted_values) - 1, max(0, math.ceil(q * len(sorted_values)) - 1))]


def _tail(values: list[float], share: float, side: str) -> tuple[float, str]:
    """The threshold flagging the outermost ``share`` of the values (at least one row) on
    ``side`` ('min': the highest values, 'max': the lowest), and how it was chosen."""
    ordered = sorted(values)
    k = max(1, int(share * len(ordered) + 1e-9))
    t = ordered[len(ordered) - k] if side == "min" else ordered[k - 1]
    where = "highest" if side == "min" else "lowest"
    return t, f"flags the {where} {share:.0%} of the validation rows ({k} of {len(ordered)})"


def _candidates(values: list[float]) -> list[float]:
    distinct = sorted(set(values))
    if len(distinct) <= MAX_CANDIDATES:
        return distinct
    return sorted({_quantile(distinct, (i + 1) / MAX_CANDIDATES) for i in range(MAX_CANDIDATES)})


def _selected(rows: Sequence[PredictionRow], key: str, bound: str, t: float) -> list[PredictionRow]:
    if bound == "min":
        return [r for r in rows if r.trajectory_scalars[key] >= t]
    return [r for r in rows if r.trajectory_scalars[key] <= t]


def _by_cer(rows: Sequence[PredictionRow], key: str, bound: str, part: str, targets: Targets,
            val_cer: float) -> tuple[float | None, str]:
    """(threshold, how it was chosen) for a stable or uncertain bound; None when no threshold
    reaches the target with ``min_share`` of the rows."""
    values = [r.trajectory_scalars[key] for r in rows]
    loosest_first = _candidates(values) if bound == "min" else _candidates(values)[::-1]
    low = part == "stable"
    target = val_cer * (targets.stable_cer_ratio if low else targets.uncertain_cer_ratio)
    aim = f"CER {'<=' if low else '>='} {target:.4f}"
    best: tuple[float, int] | None = None  # (cer, rows) closest to the target
    for t in loosest_first:
        sel = _selected(rows, key, bound, t)
        cer = _cer(sel)
        if len(sel) < targets.min_share * len(rows) or cer is None:
            continue
        if (cer <= target) if low else (cer >= target):
            return t, f"{len(sel)} rows ({len(sel) / len(rows):.0%}) at CER {cer:.4f} (target {aim})"
        if best is None or (cer < best[0] if low else cer > best[0]):
            best = (cer, len(sel))
    closest = f"the closest is CER {best[0]:.4f} on {best[1]} rows" if best else "too few rows at any threshold"
    return None, f"no threshold reaches {aim} with {targets.min_share:.0%} of the rows ({closest}): dropped"


def _slices(policy: PartitionPolicy, rows: Sequence[PredictionRow]) -> dict[str, Slice]:
    got: dict[str, list[PredictionRow]] = {p: [] for p in PARTITIONS}
    for r in rows:
        got[policy.classify(r.feat_id, r.trajectory_scalars)].append(r)
    return {p: Slice(len(rs), len(rs) / len(rows), _cer(rs)) for p, rs in got.items()}


def calibrate(rows_path: Path | str, base_path: Path | str | None = None,
              targets: Targets = Targets()) -> Calibration:
    """Thresholds for the base policy's conditions, from validation rows (module docstring)."""
    targets.check()
    rows = read_predictions(rows_path)
    not_val = [r for r in rows if r.split != "val"]
    if not_val:
        raise PartitionError(f"{rows_path}: {len(not_val)} row(s) are not validation rows (e.g. {not_val[0].feat_id} "
                             f"has split {not_val[0].split!r}); calibrate on `nko-ops evaluate --split val` output, "
                             "never on test rows")
    if len(rows) < MIN_ROWS:
        raise PartitionError(f"{rows_path}: {len(rows)} rows; calibration needs at least {MIN_ROWS}")
    base = load_partition_policy(base_path, "policy")
    for r in rows:
        missing = [k for k in base.keys if k not in r.trajectory_scalars]
        bad = [k for k in base.keys if k in r.trajectory_scalars and not math.isfinite(r.trajectory_scalars[k])]
        if missing or bad:
            raise PartitionError(f"{rows_path}: {r.feat_id}: trajectory_scalars "
                                 + (f"lacks {', '.join(missing)}" if missing else f"has non-finite {', '.join(bad)}"))
    val_cer = _cer(rows)
    if not val_cer:
        raise PartitionError(f"{rows_path}: the validation CER is 0: nothing to calibrate against")

    policy = json.loads(json.dumps(base.policy))
    lines, warnings = [], []
    for part in list(policy["order"]):
        if part not in ("novelty", "stable", "uncertain"):
            raise PartitionError(f"{base.path}: rule [{part}] has no calibration target (novelty, stable, uncertain)")
        rule = policy[part]
        for key in [k for k in rule if k != "match"]:
            for side in sorted(rule[key]):
                if part == "novelty":
                    t, how = _tail([r.trajectory_scalars[key] for r in rows], 1 - targets.novelty_quantile, side)
                else:
                    t, how = _by_cer(rows, key, side, part, targets, val_cer)
                if t is None:
                    warnings.append(f"[{part}] {key} {side}: {how}")
                    lines.append(f"[{part}] {key} {side}: {how}")
                    del rule[key][side]
                else:
                    lines.append(f"[{part}] {key} {side} = {t:.6g}: {how}")
                    rule[key][side] = t
            if not rule[key]:
                del rule[key]
        if set(rule) == {"match"}:
            warnings.append(f"[{part}] no condition left: no row goes to {part}")
            policy["order"].remove(part)
            del policy[part]
    digest = hashlib.sha256(Path(rows_path).read_bytes()).hexdigest()
    policy["name"] = f"{base.policy.get('name', 'partition')}-val-{digest[:8]}"
    calibrated = parse_partition_policy({"source": "policy", **policy}, "calibrated policy")
    return Calibration(policy, str(rows_path), digest, base.path, targets, val_cer, _slices(base, rows),
                       _slices(calibrated, rows), lines, warnings)


def _toml_value(v: object) -> str:
    if isinstance(v, str):
        return json.dumps(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {_toml_value(x)}" for k, x in v.items()) + " }"
    return repr(float(v)) if isinstance(v, float) else str(v)


def _table(slices: dict[str, Slice]) -> list[str]:
    return [f"  {p:<9} {s.rows:>6} rows {s.share:>6.1%}  CER " + (f"{s.cer:.4f}" if s.cer is not None else "—")
            for p, s in slices.items()]


def render(c: Calibration) -> str:
    """The calibrated policy as configs/agp/partition.toml reads it, provenance in comments."""
    t = c.targets
    head = ["# AGP partition policy calibrated on validation rows (agp/calibrate.py).",
            f"# rows: {c.rows_path} (sha256 {c.rows_sha256}), validation CER {c.val_cer:.4f}",
            f"# base: {c.base_path}",
            f"# targets: novelty quantile {t.novelty_quantile}, stable CER <= {t.stable_cer_ratio} x, "
            f"uncertain CER >= {t.uncertain_cer_ratio} x the validation CER, min share {t.min_share}",
            "#", "# thresholds:", *[f"#   {line}" for line in c.thresholds],
            *[f"# WARNING {w}" for w in c.warnings],
            "#", "# on the validation rows, base policy:", *[f"# {line}" for line in _table(c.base_slices)],
            "# calibrated:", *[f"# {line}" for line in _table(c.slices)], ""]
    body = ['source = "policy"']
    tables = []
    for key, value in c.policy.items():
        if isinstance(value, dict):
            tables += ["", f"[{key}]", *[f"{k} = {_toml_value(v)}" for k, v in value.items()]]
        else:
            body.append(f"{key} = {_toml_value(value)}")
    return "\n".join(head + body + tables) + "\n"


def write(c: Calibration, out: Path | str) -> str:
    """Write the policy (atomically) after reading it back; returns its identity."""
    text = render(c)
    parsed = parse_partition_policy(tomllib.loads(text), str(out))
    if parsed.policy != c.policy:
        raise PartitionError(f"{out}: the written policy does not read back as computed")
    atomic_write_text(out, text)
    return parsed.identity


def report(c: Calibration) -> str:
    return "\n".join([f"validation rows: {sum(s.rows for s in c.slices.values())}, CER {c.val_cer:.4f}",
                      *c.thresholds, *[f"WARNING {w}" for w in c.warnings],
                      "base policy on these rows:", *_table(c.base_slices),
                      "calibrated policy on these rows:", *_table(c.slices)])
