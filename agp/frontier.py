"""The acoustic margin: what each value of it would accept, and which value to ship.

Rule ``acoustic`` (agp/gate.py) accepts a proposal on a checked partition only when its
score delta >= -margin. A decision records every rule that fired, so the gate's verdict at
any other margin follows from the decision alone: a proposal refused by a text rule stays
refused; one refused by ``acoustic`` alone (or accepted) is accepted exactly when it has a
delta >= -margin. That gives

* ``frontier``: accept rate and ΔCER as one margin sweeps over both checked partitions
  (the figure ``plot_frontier`` draws, with the gate's own point marked);
* ``calibrate_margins``: per partition, the margin that maximises the CER gain on
  **validation** rows subject to no partition getting worse (accepting nothing, gain 0, is
  always allowed). Each margin sits halfway between the last delta it accepts and the next
  one it refuses. Rows from any split but val are refused: margins are never fitted on test.

References are read here, as in agp/evaluate.py: only for scoring.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from agp.gate import from_json_float
from models.bundle import PredictionRow
from models.text import row_edits


@dataclass(frozen=True)
class Outcome:
    partition: str
    chars: int
    before: int  # edits of the ASR text
    after: int  # edits if the proposal were applied
    text_ok: bool  # no rule but `acoustic` fired
    checked: bool  # rule acoustic applies to the row's partition
    delta: float | None
    accepted: bool  # the gate's verdict


def outcomes(rows: Sequence[PredictionRow], decisions: Sequence[dict]) -> list[Outcome]:
    by_id = {d["feat_id"]: d for d in decisions}
    out = []
    for row in rows:
        before, chars = row_edits(row.reference_text, row.asr_text)
        d = by_id.get(row.feat_id)
        if d is None:
            out.append(Outcome(row.partition, chars, before, before, False, False, None, False))
            continue
        after = row_edits(row.reference_text, d["proposal"])[0]
        text_ok = not [r for r in d["rules"] if r != "acoustic"]
        delta = from_json_float(d.get("acoustic_delta"))
        out.append(Outcome(row.partition, chars, before, after, text_ok, d.get("acoustic_margin") is not None,
                           delta, bool(d["accepted"])))
    return out


def accepted_at(o: Outcome, margin: float) -> bool:
    if not o.checked:
        return o.accepted
    return o.text_ok and o.delta is not None and o.delta >= -margin


def _margins_grid(deltas: list[float]) -> list[float]:
    """-inf, then midpoints between consecutive distinct deltas (descending), then inf."""
    ds = sorted({d for d in deltas if math.isfinite(d)}, reverse=True)
    mids = [-(a + b) / 2 for a, b in zip(ds, ds[1:])]
    edge = [-ds[0] + 1e-9] if ds else []  # accepts exactly the best-scored proposal(s)
    return [-math.inf] + edge + mids + ([-ds[-1] + 1e-9] if ds else []) + [math.inf]


def frontier(rows: Sequence[PredictionRow], decisions: Sequence[dict], max_points: int = 80) -> dict:
    """Points ``{margin, accepted, accept_rate, delta_cer}`` as one margin sweeps over every
    checked partition (accept_rate over all rows), and the gate's own point."""
    outs = outcomes(rows, decisions)
    chars = sum(o.chars for o in outs) or 1
    before = sum(o.before for o in outs)
    grid = _margins_grid([o.delta for o in outs if o.checked and o.text_ok and o.delta is not None])
    if len(grid) > max_points:  # keep both ends, thin the middle evenly
        step = (len(grid) - 2) / (max_points - 2)
        grid = [grid[0]] + [grid[1 + int(i * step)] for i in range(max_points - 2)] + [grid[-1]]

    def point(accept) -> dict:
        acc = [accept(o) for o in outs]
        after = sum(o.after if a else o.before for o, a in zip(outs, acc))
        return {"accepted": sum(acc), "accept_rate": sum(acc) / max(len(outs), 1), "delta_cer": (after - before) / chars}

    points = [{"margin": _jf(m), **point(lambda o, m=m: accepted_at(o, m))} for m in grid]
    margins = {d["partition"]: d["acoustic_margin"] for d in decisions if d.get("acoustic_margin") is not None}
    margins = dict(sorted(margins.items()))
    return {"points": points, "gate": {"margins": margins, **point(lambda o: o.accepted)}, "rows": len(outs)}


def _jf(x: float):
    return x if math.isfinite(x) else ("inf" if x > 0 else "-inf")


@dataclass
class MarginChoice:
    partition: str
    margin: float
    candidates: int  # proposals that pass every text rule and have a score
    accepted: int
    gain_edits: int  # edits removed on the validation rows (>= 0)
    reference_chars: int

    def as_dict(self) -> dict:
        return {"partition": self.partition, "margin": _jf(self.margin), "candidates": self.candidates,
                "accepted": self.accepted, "gain_edits": self.gain_edits, "reference_chars": self.reference_chars,
                "delta_cer": -self.gain_edits / self.reference_chars if self.reference_chars else 0.0}


def calibrate_margins(rows: Sequence[PredictionRow], decisions: Sequence[dict],
                      partitions: Sequence[str] = ("boundary", "uncertain")) -> dict[str, MarginChoice]:
    """Per partition, the margin with the largest validation CER gain that leaves the
    partition no worse (ties: the stricter margin). ``rows`` must be validation rows."""
    bad = sorted({r.split for r in rows} - {"val"})
    if bad:
        raise ValueError(f"margins are calibrated on validation rows only; these rows say split {bad}")
    outs = outcomes(rows, decisions)
    choices = {}
    for part in partitions:
        mine = [o for o in outs if o.partition == part]
        cands = sorted((o for o in mine if o.text_ok and o.delta is not None and math.isfinite(o.delta)),
                       key=lambda o: -o.delta)
        best_gain, best_k = 0, 0  # accept the k best-scored candidates
        gain = 0
        for k, o in enumerate(cands, 1):
            gain += o.before - o.after
            nxt = cands[k].delta if k < len(cands) else None
            if nxt is not None and nxt == o.delta:
                continue  # a margin cannot split equal deltas
            if gain > best_gain:
                best_gain, best_k = gain, k
        if best_k == 0:
            margin = -math.inf
        elif best_k == len(cands):
            margin = -cands[-1].delta + _slack(cands[-1].delta)
        else:
            margin = -(cands[best_k - 1].delta + cands[best_k].delta) / 2
        choices[part] = MarginChoice(part, margin, len(cands), best_k, best_gain, sum(o.chars for o in mine))
    return choices


def _slack(delta: float) -> float:
    """Past the last accepted delta, by as much as half the typical spacing would be: small."""
    return max(1e-6, abs(delta) * 1e-3)


def _fmt(m) -> str:
    return m if isinstance(m, str) else f"{m:.4f}"


def plot_frontier(summary: dict, path: Path | str, title: str = "") -> Path:
    """Accept rate (x) against ΔCER (y) as the margin sweeps; the gate's point marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    f = summary["frontier"]
    xs = [p["accept_rate"] * 100 for p in f["points"]]
    ys = [p["delta_cer"] * 100 for p in f["points"]]
    fig, ax = plt.subplots(figsize=(5.5, 3.8), dpi=120)
    ax.plot(xs, ys, "-o", ms=3, lw=1, color="#4c72b0", label="margin sweep (both checked partitions)")
    g = f["gate"]
    ax.plot([g["accept_rate"] * 100], [g["delta_cer"] * 100], "*", ms=14, color="#c44e52",
            label="gate, margins " + ", ".join(f"{p} {_fmt(m)}" for p, m in g["margins"].items()))
    ungated = summary["overall"]["cer_ungated"] - summary["overall"]["cer_before"]
    ax.axhline(0, color="grey", lw=0.8)
    ax.axhline(ungated * 100, color="#dd8452", lw=0.8, ls="--", label=f"ungated ΔCER {ungated * 100:+.2f} pp")
    ax.set_xlabel("accepted proposals (% of rows)")
    ax.set_ylabel("ΔCER, gated − before (pp)")
    ax.set_title(title or "acoustic margin frontier (test rows)", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    tmp.replace(path)
    return path
