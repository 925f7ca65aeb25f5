"""Claims checked against measured CER (`nko-ops claims check`).

``configs/claims.toml`` lists claims of the form "runs selected by ``better`` have lower test
CER than runs selected by ``than``" (a selector is a script and a mode, optionally seeds or
run ids). ΔCER = mean CER(better) − mean CER(than) over each side's seeds, with a 95% CI
from a hierarchical bootstrap that resamples seeds and test utterances together
(backend/stats.py ``hierarchical_means``), so the CI carries seed variance as well as
utterance sampling. Each claim gets one verdict, with the numbers behind it:

* SUPPORTED: the CI lies entirely below 0 and every seed of ``better`` scores below every
  seed of ``than``.
* REFUTED: the opposite is established: the CI lies entirely above 0 and every seed of
  ``better`` scores above every seed of ``than``.
* INCONCLUSIVE: enough runs, but neither (the CI includes 0, or the seeds overlap), with the
  reason.
* INSUFFICIENT EVIDENCE: only when a side has no run with a verified bundle or fewer than
  ``min_seeds`` seeds (default 3), or its runs are on another snapshot / split / feature
  recipe or test set. With ``min_seeds`` seeds on both sides a claim is always decided.

A claim may carry the research program's published single-seed figures (``published``,
CER % of each side); the verdict then says whether the measured difference has the same
direction. On a synthetic sample that is a check of the pipeline, not of the paper.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from backend import stats
from backend.matrix import load_matrix
from backend.tables import SCRIPT_NAMES, RunData, load_runs
from models.errors import NkoOpsError
from models.tomlfile import read_toml

SUPPORTED, REFUTED, INCONCLUSIVE, INSUFFICIENT = "SUPPORTED", "REFUTED", "INCONCLUSIVE", "INSUFFICIENT EVIDENCE"
VERDICTS = (SUPPORTED, REFUTED, INCONCLUSIVE, INSUFFICIENT)


class ClaimsError(NkoOpsError, ValueError):
    pass


class Selector(BaseModel):
    model_config = ConfigDict(extra="forbid")
    script: Literal["nko", "latin"]
    mode: Literal["baseline", "trajectory", "tar", "ttt"]
    seeds: list[int] | None = None
    runs: list[str] | None = None

    def label(self) -> str:
        return f"{SCRIPT_NAMES[self.script]} {self.mode}"

    def matches_spec(self, spec) -> bool:
        return (spec.script == self.script and spec.mode == self.mode
                and (self.seeds is None or spec.seed in self.seeds)
                and (self.runs is None or spec.run_id in self.runs))

    def matches(self, r: RunData) -> bool:
        return self.matches_spec(r.spec)


class Published(BaseModel):
    """The research program's own figures for the two sides (CER %, single seed)."""

    model_config = ConfigDict(extra="forbid")
    better: float = Field(ge=0)
    than: float = Field(ge=0)
    source: str = ""


class Claim(BaseModel):
    model_config = ConfigDict(extra="forbid")
    id: str
    text: str
    better: Selector
    than: Selector
    metric: Literal["cer", "toneless_cer"] = "cer"
    min_seeds: int = Field(3, ge=1)
    published: Published | None = None


class ClaimsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    claim: list[Claim] = Field(min_length=1)


@dataclass
class Verdict:
    id: str
    text: str
    verdict: str
    reasons: list[str] = field(default_factory=list)
    numbers: dict = field(default_factory=dict)

    def __str__(self) -> str:
        n = self.numbers
        lines = [f"{self.verdict:<21}  {self.id}: {self.text}"]
        for side in ("better", "than"):
            if side in n:
                s = n[side]
                sd = f", sd {100 * s['sd']:.2f}" if s.get("sd") is not None else ""
                lines.append(f"    {s['label']}: {n['metric']} {100 * s['mean']:.2f}% over {len(s['seeds'])} "
                             f"seed(s) {s['seeds']}{sd}")
        if "delta" in n:
            lines.append(f"    Δ{n['metric']} {100 * n['delta']:+.2f} pp, 95% CI [{100 * n['ci_lo']:+.2f}, "
                         f"{100 * n['ci_hi']:+.2f}], P(improvement) {n['p_improvement']:.3f} "
                         f"({n['resamples']:,} hierarchical resamples of seeds and {n['rows']:,} test utterances)")
        lines += [f"    {r}" for r in self.reasons]
        if "published" in n:
            lines.append(f"    {n['published']['line']}")
        return "\n".join(lines)

    def as_dict(self) -> dict:
        return {"id": self.id, "text": self.text, "verdict": self.verdict, "reasons": self.reasons,
                "numbers": self.numbers}


def load_claims(path: str | Path) -> list[Claim]:
    path = Path(path)
    raw = read_toml(path, ClaimsError, "claims file")
    try:
        claims = ClaimsFile.model_validate(raw).claim
    except ValidationError as e:
        lines = []
        items = raw.get("claim") if isinstance(raw.get("claim"), list) else []
        for err in e.errors():
            loc = err["loc"]
            if len(loc) >= 2 and loc[0] == "claim" and isinstance(loc[1], int):
                item = items[loc[1]] if loc[1] < len(items) and isinstance(items[loc[1]], dict) else {}
                where = f"claim[{loc[1]}]" + (f" ({item['id']!r})" if isinstance(item.get("id"), str) else "")
                fld = ".".join(map(str, loc[2:])) or "(the claim)"
            else:
                where, fld = "file", ".".join(map(str, loc)) or "(top level)"
            msg = "is not a known setting" if err["type"] == "extra_forbidden" else err["msg"]
            lines.append(f"{where}: field '{fld}': {msg}")
        raise ClaimsError(f"{path}: invalid claims\n  " + "\n  ".join(lines)) from None
    ids = [c.id for c in claims]
    dup = sorted({i for i in ids if ids.count(i) > 1})
    if dup:
        raise ClaimsError(f"{path}: duplicate claim id(s) {', '.join(dup)}")
    return claims


def _side(sel: Selector, runs: list[RunData], metric: str) -> dict:
    chosen = [r for r in runs if sel.matches(r)]
    vals = [r.cer if metric == "cer" else r.toneless_cer for r in chosen]
    return {"label": sel.label(), "runs": [r.run_id for r in chosen], "seeds": sorted({r.spec.seed for r in chosen}),
            "values": vals, "mean": statistics.fmean(vals) if vals else None,
            "sd": statistics.stdev(vals) if len(vals) > 1 else None}


def judge(claim: Claim, runs: list[RunData], missing: list[tuple[str, str]], matrix_specs: dict,
          resamples: int = stats.RESAMPLES, seed: int = stats.SEED) -> Verdict:
    """The verdict on one claim from the loaded runs (``missing``: runs left out, with why)."""
    v = Verdict(claim.id, claim.text, INSUFFICIENT)
    v.numbers["metric"] = "CER" if claim.metric == "cer" else "toneless CER"
    sides = {"better": _side(claim.better, runs, claim.metric), "than": _side(claim.than, runs, claim.metric)}
    insufficient = []
    for name, sel in (("better", claim.better), ("than", claim.than)):
        s = sides[name]
        for rid, why in missing:
            spec = matrix_specs.get(rid)
            if spec and sel.matches_spec(spec) and not (spec.optional and why.startswith("not run yet")):
                v.reasons.append(f"{rid} left out: {why}")
        if not s["runs"]:
            insufficient.append(f"no completed run for {s['label']}")
            continue
        if len(s["seeds"]) < claim.min_seeds:
            insufficient.append(f"{len(s['seeds'])} seed(s) for {s['label']}; this claim needs {claim.min_seeds}")
        v.numbers[name] = {k: s[k] for k in ("label", "runs", "seeds", "mean", "sd")}
    d = None
    if sides["better"]["runs"] and sides["than"]["runs"]:
        a = [i for i, r in enumerate(runs) if claim.better.matches(r)]
        b = [i for i, r in enumerate(runs) if claim.than.matches(r)]
        arrays = ("edits", "chars") if claim.metric == "cer" else ("tl_edits", "tl_chars")
        e = np.stack([getattr(runs[i], arrays[0]) for i in a + b])
        c = np.stack([getattr(runs[i], arrays[1]) for i in a + b])
        cer_b = stats.resampled_cer(e, c, resamples, seed)
        point = e.sum(axis=1) / c.sum(axis=1)
        na = len(a)
        seeds = [runs[i].spec.seed for i in a + b]
        ha = stats.hierarchical_means(cer_b, list(range(na)), seeds[:na], seed)
        hb = stats.hierarchical_means(cer_b, list(range(na, len(seeds))), seeds[na:], seed)
        d = stats.delta_from_samples(point[:na].mean() - point[na:].mean(), ha - hb)
        v.numbers.update({**d.as_dict(), "rows": len(runs[0].ids),
                          "paired_seeds": sorted(seeds[:na]) == sorted(seeds[na:])})
    if claim.published is not None:
        v.numbers["published"] = _published(claim, d)
    both = [r for r in runs if claim.better.matches(r) or claim.than.matches(r)]
    unconverged = [r.run_id for r in both if r.still_improving]
    v.numbers["still_improving"] = unconverged
    if unconverged:
        v.reasons.append(f"{len(unconverged)} of {len(both)} runs stopped at their epoch limit still improving: "
                         f"a comparison within the training budget, not of converged models")
    if insufficient:
        v.reasons = insufficient + v.reasons
        return v
    better, than = sides["better"], sides["than"]
    if d.hi < 0 and max(better["values"]) < min(than["values"]):
        v.verdict = SUPPORTED
        return v
    if d.lo > 0 and min(better["values"]) > max(than["values"]):
        v.verdict = REFUTED
        v.reasons.insert(0, f"the difference goes the other way: {than['label']} has the lower CER on every seed "
                            f"and the 95% CI of ΔCER lies above 0")
        return v
    v.verdict = INCONCLUSIVE
    if d.lo <= 0 <= d.hi:
        why = "the 95% CI of ΔCER includes 0"
    elif d.hi < 0:
        why = (f"seeds overlap: the best {than['label']} seed ({100 * min(than['values']):.2f}%) is not above "
               f"the worst {better['label']} seed ({100 * max(better['values']):.2f}%)")
    else:
        why = (f"seeds overlap: the CI lies above 0 but the best {better['label']} seed "
               f"({100 * min(better['values']):.2f}%) is not above the worst {than['label']} seed "
               f"({100 * max(than['values']):.2f}%)")
    v.reasons.insert(0, why)
    return v


def _published(claim: Claim, d: stats.Delta | None) -> dict:
    """Does the measured ΔCER have the sign of the program's published difference?"""
    p = claim.published
    pub = p.better - p.than
    out = {"better": p.better, "than": p.than, "delta_pp": pub, "source": p.source}
    head = (f"program's published figures: {claim.better.label()} {p.better:.2f} vs {claim.than.label()} "
            f"{p.than:.2f} (Δ {pub:+.2f} pp)")
    if d is None:
        out.update(agrees=None, line=f"{head}; no measured difference to compare")
    elif pub == 0 or d.delta == 0:
        out.update(agrees=None, line=f"{head}; no direction to compare (a difference is exactly 0)")
    else:
        agrees = (pub < 0) == (d.delta < 0)
        decided = d.hi < 0 or d.lo > 0
        out.update(agrees=agrees, line=f"{head}; the demo {'agrees' if agrees else 'disagrees'} in direction "
                                       f"(Δ {100 * d.delta:+.2f} pp"
                                       + (", its CI excludes 0)" if decided else ", but its CI includes 0)"))
    return out


def check_claims(claims_path: str | Path = "configs/claims.toml", matrix_path: str | Path = "configs/matrix/paper4.json",
                 db_path: str | Path | None = "state.db") -> list[Verdict]:
    """One Verdict per claim of ``claims_path`` on the runs of ``matrix_path``."""
    claims = load_claims(claims_path)
    m = load_matrix(matrix_path)
    runs, missing = load_runs(m, db_path)
    specs = {s.run_id: s for s in m.runs}
    return [judge(c, runs, missing, specs) for c in claims]


DISCLAIMER = ("What this can and cannot show: the demo runs on synthetic speech (espeak-ng, a Swahili voice reading "
              "Bambara text) from a 1,500-clip sample, 150 test utterances, a small CTC head on frozen Whisper "
              "features. Agreement or disagreement with the program's published direction is a check that the "
              "pipeline behaves sensibly; it proves nothing about the paper's numbers, which come from real speech, "
              "290,596 pairs, Whisper-large-v3 and the 46.9M-parameter V3 head.")


def report(verdicts: list[Verdict], caveat: str | None = None) -> str:
    """The text of ``claims.txt``: how verdicts are reached, one block per claim, a tally of
    agreement with the program's published directions and ``caveat`` (for the demo's
    matrices: DISCLAIMER, what a synthetic sample can and cannot show)."""
    head = [f"Claims: {len(verdicts)} checked. ΔCER = mean CER(better) − mean CER(than) over seeds; 95% CI from a "
            f"{stats.HIERARCHICAL} ({stats.RESAMPLES:,} resamples, seed {stats.SEED}).",
            "SUPPORTED: CI below 0 and every seed of the better side below every seed of the other; REFUTED: the "
            "mirror image; INCONCLUSIVE: neither; INSUFFICIENT EVIDENCE: a side lacks runs or seeds.", ""]
    body = [str(v) + "\n" for v in verdicts]
    pubs = [v for v in verdicts if "published" in v.numbers]
    tail = []
    if pubs:
        agree = [v.id for v in pubs if v.numbers["published"]["agrees"] is True]
        disagree = [v.id for v in pubs if v.numbers["published"]["agrees"] is False]
        tail.append(f"Published direction: the demo agrees on {len(agree)} of {len(pubs)} claims with published "
                    f"figures" + (f" ({', '.join(agree)})" if agree else "")
                    + (f"; disagrees on {', '.join(disagree)}" if disagree else "") + ".")
    if caveat:
        tail.append(caveat)
    return "\n".join(head + body + tail) + "\n"
