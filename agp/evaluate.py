"""AGP evaluation: CER before -> after with only *accepted* edits applied, and how the
accepted edits moved each row (improved / neutral / worse), per partition and overall.

References are used here and only here, for scoring. Each row's text after the lane is its
accepted proposal if there is one, else its ASR text. A row with no decision counts as
``not_proposed``; a proposal identical to the ASR text as ``no_op`` (the proposer abstained);
any other refused proposal as ``rejected``, with the rules that refused it.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from agp.gate import verify_witness
from models.bundle import PARTITIONS, PredictionRow
from models.text import normalize
from models.errors import NkoOpsError
from models.text import row_edits, toneless


class EvalError(NkoOpsError, ValueError):
    pass


BOOTSTRAP_SAMPLES = 2000


def _empty() -> dict:
    return {"rows": 0, "reference_chars": 0, "edits_before": 0, "edits_after": 0, "edits_ungated": 0,
            "toneless_edits_before": 0, "toneless_edits_after": 0, "proposed": 0, "accepted": 0,
            "improved": 0, "neutral": 0, "worse": 0, "rejected": 0, "no_op": 0, "not_proposed": 0,
            "rejected_by_rule": Counter()}


def _finish(g: dict) -> dict:
    n = g["reference_chars"]
    g["cer_before"] = g["edits_before"] / n if n else 0.0
    g["cer_after"] = g["edits_after"] / n if n else 0.0
    g["delta_cer"] = g["cer_after"] - g["cer_before"]
    g["cer_ungated"] = g["edits_ungated"] / n if n else 0.0
    g["toneless_cer_before"] = g["toneless_edits_before"] / n if n else 0.0
    g["toneless_cer_after"] = g["toneless_edits_after"] / n if n else 0.0
    g["rejected_by_rule"] = dict(sorted(g["rejected_by_rule"].items()))
    return g


def check_decisions(rows: Sequence[PredictionRow], decisions: Sequence[dict], key: bytes | None = None,
                    source: str = "decisions") -> None:
    """Refuse decisions that do not belong to these rows: unknown or duplicate feat_ids, a
    different ASR text or partition, a verdict that contradicts its rules, mixed policy
    hashes, or (with ``key``) a witness that does not verify. ``source`` names the file."""
    by_id = {r.feat_id: r for r in rows}
    problems, seen, hashes = [], {}, set()
    for i, d in enumerate(decisions, 1):
        where = f"{source}:line {d.get('_line', i)}"
        fid = d["feat_id"]
        row = by_id.get(fid)
        if row is None:
            problems.append(f"{where}: field 'feat_id': {fid!r} is not in the rows")
            continue
        if fid in seen:
            problems.append(f"{where}: field 'feat_id': duplicate {fid!r} (first on line {seen[fid]})")
            continue
        seen[fid] = d.get("_line", i)
        if normalize(d["asr_text"]) != row.asr_text:
            problems.append(f"{where}: field 'asr_text': differs from the row's ASR text for {fid!r}")
        if d["partition"] != row.partition:
            problems.append(f"{where}: field 'partition': {d['partition']!r} but the row is {row.partition!r} "
                            "(evaluate with the partition policy the gate used)")
        if bool(d["accepted"]) == bool(d.get("rules")):
            problems.append(f"{where}: field 'accepted': {d['accepted']} with rules {d.get('rules')!r} "
                            "(a decision is accepted exactly when no rule fired)")
        if key is not None and not verify_witness(key, d):
            problems.append(f"{where}: field 'witness': does not verify for {fid!r} with this install's key "
                            "(the decision was changed after the gate made it, or made elsewhere)")
        hashes.add(d["policy_hash"])
    if len(hashes) > 1:
        problems.append(f"decisions come from {len(hashes)} different gate policies: {sorted(hashes)}")
    if problems:
        shown = "\n".join(f"  {p}" for p in problems[:20])
        more = f"\n  ... and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise EvalError(f"{len(problems)} problem(s) with the decisions\n{shown}{more}")


def evaluate(rows: Sequence[PredictionRow], decisions: Sequence[dict], key: bytes | None = None,
             source: str = "decisions", seed: int = 0) -> dict:
    """Summary with ``overall`` and ``partitions`` (each: rows, reference_chars, cer_before,
    cer_after, delta_cer, toneless CERs, proposed, accepted, improved, neutral, worse,
    rejected, no_op, not_proposed, rejected_by_rule; cer_ungated with every proposal applied,
    and ``delta_ci95``: a paired bootstrap 95% interval of gated − before CER over rows).
    With acoustic scores in the decisions, ``frontier`` holds the accept-rate / ΔCER curve as
    the acoustic margin sweeps (agp/frontier.py)."""
    check_decisions(rows, decisions, key, source)
    by_id = {d["feat_id"]: d for d in decisions}
    groups = {p: _empty() for p in PARTITIONS}
    overall = _empty()
    per_row: dict[str, list[tuple[int, int, int]]] = {p: [] for p in PARTITIONS}  # (chars, before, after)
    for row in rows:
        d = by_id.get(row.feat_id)
        after = d["proposal"] if d is not None and d["accepted"] else row.asr_text
        before_edits, chars = row_edits(row.reference_text, row.asr_text)
        after_edits, _ = row_edits(row.reference_text, after)
        ungated_edits = row_edits(row.reference_text, d["proposal"])[0] if d is not None else before_edits
        per_row[row.partition].append((chars, before_edits, after_edits))
        tl_ref = toneless(row.reference_text)
        tl_before, _ = row_edits(tl_ref, toneless(row.asr_text))
        tl_after, _ = row_edits(tl_ref, toneless(after))
        for g in (groups[row.partition], overall):
            g["rows"] += 1
            g["reference_chars"] += chars
            g["edits_before"] += before_edits
            g["edits_after"] += after_edits
            g["edits_ungated"] += ungated_edits
            g["toneless_edits_before"] += tl_before
            g["toneless_edits_after"] += tl_after
            if d is None:
                g["not_proposed"] += 1
                continue
            g["proposed"] += 1
            if not d["accepted"] and list(d.get("rules") or []) == ["no_op"]:
                g["no_op"] += 1
                continue
            if not d["accepted"]:
                g["rejected"] += 1
                g["rejected_by_rule"].update(d.get("rules") or ["unspecified"])
                continue
            g["accepted"] += 1
            outcome = "improved" if after_edits < before_edits else "worse" if after_edits > before_edits else "neutral"
            g[outcome] += 1
    for p, g in groups.items():
        g["delta_ci95"] = paired_bootstrap_ci(per_row[p], seed=seed)
    overall["delta_ci95"] = paired_bootstrap_ci([t for p in PARTITIONS for t in per_row[p]], seed=seed)
    policy = sorted({d["policy_hash"] for d in decisions})
    summary = {"overall": _finish(overall), "partitions": {p: _finish(g) for p, g in groups.items()},
               "policy_hash": policy[0] if policy else None,
               "bootstrap": {"samples": BOOTSTRAP_SAMPLES, "seed": seed, "unit": "row (paired)"}}
    if any(d.get("acoustic_margin") is not None for d in decisions):
        from agp.frontier import frontier

        summary["frontier"] = frontier(rows, decisions)
    return summary


def paired_bootstrap_ci(rows: Sequence[tuple[int, int, int]], samples: int = BOOTSTRAP_SAMPLES,
                        seed: int = 0) -> list[float] | None:
    """95% percentile interval of (edits after − edits before) / reference chars, resampling
    rows with replacement (before and after of a row stay paired). None for no rows."""
    import numpy as np

    if not rows:
        return None
    a = np.asarray(rows, dtype=np.int64)
    chars, diff = a[:, 0], a[:, 2] - a[:, 1]
    rng = np.random.default_rng(seed)
    stats = np.empty(samples)
    for start in range(0, samples, 256):  # bounded memory on 29k-row test sets
        k = min(256, samples - start)
        idx = rng.integers(0, len(a), size=(k, len(a)))
        stats[start:start + k] = diff[idx].sum(1) / np.maximum(chars[idx].sum(1), 1)
    lo, hi = np.percentile(stats, [2.5, 97.5])
    return [float(lo), float(hi)]


def format_table(summary: dict) -> str:
    """A plain-text table of the summary (one line per partition with rows, then overall)."""
    cols = ["partition", "rows", "ref chars", "CER before", "ungated", "gated", "ΔCER gated", "95% CI",
            "accepted", "improved", "neutral", "worse", "rejected", "no-op", "not proposed"]
    lines = []
    groups = [(p, g) for p, g in summary["partitions"].items() if g["rows"]] + [("overall", summary["overall"])]
    for name, g in groups:
        ci = g.get("delta_ci95")
        lines.append([name, str(g["rows"]), str(g["reference_chars"]), f"{g['cer_before']:.4f}",
                      f"{g['cer_ungated']:.4f}", f"{g['cer_after']:.4f}", f"{g['delta_cer']:+.4f}",
                      f"[{ci[0]:+.4f}, {ci[1]:+.4f}]" if ci else "-", str(g["accepted"]), str(g["improved"]),
                      str(g["neutral"]), str(g["worse"]), str(g["rejected"]), str(g["no_op"]),
                      str(g["not_proposed"])])
    widths = [max(len(c), *(len(l[i]) for l in lines)) for i, c in enumerate(cols)]
    fmt = lambda cells: "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [fmt(cols), fmt(["-" * w for w in widths])] + [fmt(l) for l in lines]
    rules = summary["overall"]["rejected_by_rule"]
    if rules:
        out.append("rejections by rule: " + ", ".join(f"{k} {v}" for k, v in rules.items()))
    return "\n".join(out)
