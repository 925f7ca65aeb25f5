"""Tables and figures of a matrix, from its run artifacts only (`nko-ops tables`).

Every number comes from a verified bundle (backend/runs.py): per-utterance edits and
reference characters from ``test_predictions.jsonl`` (re-scored here and checked against the
row's own ``cer_edits`` and against ``results.json``), best validation loss and epoch from
``results.json``, learning curves from ``metrics.jsonl``. Outputs (``<out>/<matrix_id>-*``):
Markdown, LaTeX (booktabs) and CSV tables and two PNG figures, byte-identical on rerun.

A group (script × mode) shows the mean ± sd of test CER over its seeds and a 95% CI from a
hierarchical bootstrap that resamples seeds and test utterances together (backend/stats.py,
10,000 resamples, fixed seed), so the CI carries seed variance as well as utterance
sampling. A group's ΔCER is against the group holding the matrix's ``reference_run`` (means
over seeds, same hierarchical bootstrap); a run's ΔCER is against the reference run itself
(paired bootstrap over test utterances). P(improvement) = share of resamples in which the
CER is lower than the reference's. A run that stopped at its epoch limit while its
validation loss was still improving (its last epoch set a new best) is flagged; so is a TTT
run whose adaptation changed no test hypothesis or did not help on the validation split.
"""

from __future__ import annotations

import csv
import io
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from backend import stats
from backend.matrix import Matrix, RunSpec, load_matrix
from backend.runs import recorded_hashes, verify_bundle
from models.bundle import MODES, PARTITIONS, SCRIPTS, learning_curve
from models.files import atomic_write_text
from models.errors import NkoOpsError

SCRIPT_NAMES = {"nko": "N'Ko", "latin": "Latin"}


class TablesError(NkoOpsError, ValueError):
    pass


@dataclass
class RunData:
    spec: RunSpec
    dir: Path
    results: dict
    ids: list[str]  # sorted test feat_ids
    edits: np.ndarray
    chars: np.ndarray
    tl_edits: np.ndarray
    tl_chars: np.ndarray
    partitions: np.ndarray
    curve: list[dict] = field(default_factory=list)

    @property
    def run_id(self) -> str:
        return self.spec.run_id

    @property
    def cer(self) -> float:
        return float(self.edits.sum() / self.chars.sum())

    @property
    def toneless_cer(self) -> float:
        return float(self.tl_edits.sum() / self.tl_chars.sum())

    @property
    def still_improving(self) -> bool:
        """Stopped at the epoch limit with the last epoch a new best validation loss."""
        if "still_improving" in self.results:
            return bool(self.results["still_improving"])
        if self.results.get("stop_reason") == "early_stop" or self.results.get("early_stopped"):
            return False
        vals = [c["val_loss"] for c in self.curve if "val_loss" in c]
        return len(vals) >= 2 and vals[-1] < min(vals[:-1])

    def stop_text(self) -> str:
        ep = self.results.get("epochs_run") or (self.curve[-1]["epoch"] if self.curve else None)
        if self.results.get("stop_reason") == "early_stop" or self.results.get("early_stopped"):
            return f"early stop @{ep}"
        return f"epoch limit {ep}" + (", STILL IMPROVING" if self.still_improving else "")

    @property
    def identity(self) -> tuple:
        return (self.results.get("snapshot_sha256"), self.results.get("split_sha256"),
                self.results.get("feature_recipe_hash"))


def _run_dir(m: Matrix, spec: RunSpec, db) -> tuple[Path, dict | None]:
    """The run's directory (imported runs live elsewhere) and, for a run imported without a
    manifest, the hashes recorded at import."""
    if db is not None:
        row = next(iter(db.query("SELECT out_dir, status FROM runs WHERE id = ?", [spec.run_id])), None)
        if row and row["status"] == "completed" and row["out_dir"]:
            return Path(row["out_dir"]), recorded_hashes(db, spec.run_id)
    return m.out_dir(spec), None


def _load_run(spec: RunSpec, d: Path, m: Matrix, recorded: dict | None = None) -> RunData:
    from models.text import row_edits, toneless

    b = verify_bundle(d, m.snapshot_sha256, m.split_sha256, m.recipe_hash, recorded=recorded)
    if not b.ok:
        raise TablesError(b.problems[0] + (f" (and {len(b.problems) - 1} more)" if len(b.problems) > 1 else ""))
    for key, want in (("script", spec.script), ("mode", spec.mode), ("seed", spec.seed)):
        if b.results.get(key) != want:
            raise TablesError(f"results.json {key} is {b.results.get(key)!r}, the matrix says {want!r}")
    rows = {r.feat_id: r for r in b.rows}  # §4 records, their counts checked against their texts
    ids = sorted(rows)
    n = len(ids)
    e, c, te, tc = (np.zeros(n, dtype=np.int64) for _ in range(4))
    parts = np.empty(n, dtype=object)
    for i, fid in enumerate(ids):
        r = rows[fid]
        e[i], c[i] = r.cer_edits, r.reference_chars
        te[i], tc[i] = row_edits(toneless(r.reference_text), toneless(r.asr_text))
        parts[i] = r.partition
    if not c.sum():
        raise TablesError("test references are empty")
    measured = e.sum() / c.sum()
    if abs(measured - float(b.results["test_cer"])) > 1e-9:
        raise TablesError(f"results.json test_cer {b.results['test_cer']} disagrees with its rows ({measured})")
    curve = learning_curve(d)
    return RunData(spec, d, b.results, ids, e, c, te, tc, parts, curve)


def load_runs(m: Matrix, db_path: str | Path | None = None) -> tuple[list[RunData], list[tuple[str, str]]]:
    """Runs of ``m`` with verified bundles (matrix order), and (run_id, reason) for the rest.
    Runs on another snapshot/split/recipe or test set than the first loaded one are left out."""
    db = None
    if db_path is not None and Path(db_path).exists():
        from state.store import open_db

        db = open_db(db_path, read_only=True)
    loaded, missing = [], []
    for spec in m.runs:
        d, recorded = _run_dir(m, spec, db)
        if not (d / "manifest.json").exists() and not (d / "results.json").exists():
            missing.append((spec.run_id, "not run yet" + (" (optional)" if spec.optional else "")))
            continue
        try:
            rd = _load_run(spec, d, m, recorded)
        except (TablesError, ValueError, OSError, KeyError) as e:
            missing.append((spec.run_id, str(e)))
            continue
        if loaded and (rd.identity != loaded[0].identity or rd.ids != loaded[0].ids):
            missing.append((spec.run_id, f"different snapshot/split/recipe or test set than {loaded[0].run_id}"))
            continue
        loaded.append(rd)
    if db is not None:
        db.close()
    return loaded, missing


# --------------------------------------------------------------------------- computation

@dataclass
class Summary:
    matrix: Matrix
    runs: list[RunData]
    missing: list[tuple[str, str]]
    reference: str | None
    groups: list[dict]
    per_run: list[dict]
    partitions: list[dict]
    pairs: list[dict]
    ttt: list[dict] = field(default_factory=list)


def _group_key(r: RunData) -> tuple[int, int]:
    return SCRIPTS.index(r.spec.script), MODES.index(r.spec.mode)


def summarise(m: Matrix, runs: list[RunData], missing: list[tuple[str, str]], reference: str | None = None,
              resamples: int = stats.RESAMPLES, seed: int = stats.SEED) -> Summary:
    reference = reference if reference is not None else m.reference_run
    by_id = {r.run_id: i for i, r in enumerate(runs)}
    ref = by_id.get(reference) if reference else None
    cer_b = None
    if runs:
        cer_b = stats.resampled_cer(np.stack([r.edits for r in runs]), np.stack([r.chars for r in runs]),
                                    resamples, seed)
    point = np.array([r.cer for r in runs])

    def delta(cols: list[int]) -> dict:
        if ref is None:
            return {}
        d = stats.delta_from_samples(point[cols].mean() - point[ref], cer_b[:, cols].mean(axis=1) - cer_b[:, ref])
        return d.as_dict()

    def hier(cols: list[int]) -> np.ndarray:
        return stats.hierarchical_means(cer_b, cols, [runs[i].spec.seed for i in cols], seed)

    ref_cols = [i for i, r in enumerate(runs) if ref is not None and _group_key(r) == _group_key(runs[ref])]

    def group_delta(cols: list[int]) -> dict:
        if ref is None or cols == ref_cols:
            return {}
        return stats.delta_from_samples(point[cols].mean() - point[ref_cols].mean(),
                                        hier(cols) - hier(ref_cols)).as_dict()

    groups = []
    keys = sorted({_group_key(r) for r in runs})
    for key in keys:
        cols = sorted((i for i, r in enumerate(runs) if _group_key(r) == key), key=lambda i: runs[i].spec.seed)
        members = [runs[i] for i in cols]
        cers = [r.cer for r in members]
        lo, hi = stats.ci_from_samples(hier(cols))
        groups.append({
            "script": SCRIPTS[key[0]], "mode": MODES[key[1]], "runs": [r.run_id for r in members],
            "seeds": [r.spec.seed for r in members], "cer_mean": statistics.fmean(cers),
            "cer_sd": statistics.stdev(cers) if len(cers) > 1 else None, "cer_ci": (lo, hi),
            "toneless_cer_mean": statistics.fmean(r.toneless_cer for r in members),
            "best_val_loss_mean": statistics.fmean(float(r.results["best_val_loss"]) for r in members),
            "best_epochs": [int(r.results["best_epoch"]) for r in members],
            "reference_chars": sorted({int(r.chars.sum()) for r in members}),
            "is_reference": reference in [r.run_id for r in members],
            "still_improving": [r.run_id for r in members if r.still_improving],
            **{f"d_{k}": v for k, v in group_delta(cols).items()},
        })
    per_run = []
    for i, r in enumerate(runs):
        per_run.append({
            "run_id": r.run_id, "script": r.spec.script, "mode": r.spec.mode, "seed": r.spec.seed,
            "cer": r.cer, "toneless_cer": r.toneless_cer, "best_val_loss": float(r.results["best_val_loss"]),
            "best_epoch": int(r.results["best_epoch"]), "reference_chars": int(r.chars.sum()),
            "rows": len(r.ids), "source": "imported" if r.dir.resolve() != m.out_dir(r.spec).resolve() else "trained",
            "stop": r.stop_text(), "still_improving": r.still_improving,
            **{f"d_{k}": v for k, v in (delta([i]) if i != ref else {}).items()},
        })
    partitions = []
    for r in runs:
        row = {"run_id": r.run_id}
        for p in (*PARTITIONS, "overall"):
            sel = np.ones(len(r.ids), bool) if p == "overall" else (r.partitions == p)
            chars = int(r.chars[sel].sum())
            row[p] = {"rows": int(sel.sum()), "cer": (float(r.edits[sel].sum() / chars) if chars else None),
                      "toneless_cer": (float(r.tl_edits[sel].sum() / r.tl_chars[sel].sum())
                                       if r.tl_chars[sel].sum() else None)}
        partitions.append(row)
    pairs = []
    for i in range(len(runs)):
        for j in range(i + 1, len(runs)):
            d = stats.delta_from_samples(point[j] - point[i], cer_b[:, j] - cer_b[:, i])
            pairs.append({"a": runs[i].run_id, "b": runs[j].run_id, **d.as_dict()})
    ttt = [t for t in (_ttt_summary(r) for r in runs) if t is not None]
    return Summary(m, runs, missing, reference if ref is not None else None, groups, per_run, partitions, pairs, ttt)


def _ttt_summary(r: RunData) -> dict | None:
    """What test-time training did in a TTT run, from its results.json (None for other modes)."""
    t = r.results.get("ttt")
    if r.spec.mode != "ttt" or not isinstance(t, dict):
        return None
    out = {"run_id": r.run_id, "lr": t.get("lr"), "steps": t.get("steps"), "selection": t.get("selection"),
           "changed": t.get("test_changed"), "rows": len(r.ids), "cer_before": t.get("test_changed_cer_before"),
           "cer_after": t.get("test_changed_cer_after"), "guard_reverts": t.get("ttt_guard_reverts")}
    sel = t.get("selection") or {}
    problems = []
    if out["changed"] is None:
        problems.append("this bundle does not record which test hypotheses TTT changed")
    elif out["changed"] == 0:
        problems.append("it changed no test hypothesis (a no-op here)")
    if sel and sel.get("best_val_cer") is not None and sel.get("no_ttt_val_cer") is not None \
            and sel["best_val_cer"] >= sel["no_ttt_val_cer"]:
        problems.append(f"no setting of the grid lowered the validation CER ({100 * sel['best_val_cer']:.2f}% at "
                        f"best vs {100 * sel['no_ttt_val_cer']:.2f}% without TTT)")
    elif out["changed"] and out["cer_after"] is not None and out["cer_after"] >= out["cer_before"]:
        problems.append("on the test utterances it changed, TTT did not lower the CER")
    if problems:
        out["verdict"] = "TTT cannot help on this data: " + "; ".join(problems)
    else:
        out["verdict"] = (f"TTT acts: it changed {out['changed']} of {out['rows']} test hypotheses, CER on those "
                          f"{100 * out['cer_before']:.2f}% → {100 * out['cer_after']:.2f}%"
                          + (f"; val CER {100 * sel['no_ttt_val_cer']:.2f}% → {100 * sel['best_val_cer']:.2f}% "
                             f"at the chosen setting" if sel else ""))
    return out


# --------------------------------------------------------------------------- formatting

def _pct(x: float | None, signed: bool = False) -> str:
    if x is None:
        return "—"
    return f"{100 * x:+.2f}" if signed else f"{100 * x:.2f}"


def _ci(d: dict, prefix: str = "d_") -> str:
    if f"{prefix}ci_lo" not in d:
        return "—"
    return f"[{100 * d[prefix + 'ci_lo']:+.2f}, {100 * d[prefix + 'ci_hi']:+.2f}]"


def _num(x: float | None, fmt: str = ".6f") -> str:
    return "" if x is None else format(x, fmt)


def _group_rows(s: Summary) -> list[list[str]]:
    out = []
    for g in s.groups:
        cer = _pct(g["cer_mean"]) + (f" ± {100 * g['cer_sd']:.2f}" if g["cer_sd"] is not None else "")
        ref_mark = ""
        if g["is_reference"]:
            g = {**g, "d_delta": 0.0}
            ref_mark = " (ref)"
        out.append([SCRIPT_NAMES[g["script"]], g["mode"], ", ".join(map(str, g["seeds"])), cer,
                    f"[{_pct(g['cer_ci'][0])}, {_pct(g['cer_ci'][1])}]", _pct(g["toneless_cer_mean"]), f"{g['best_val_loss_mean']:.4f}",
                    ", ".join(map(str, g["best_epochs"])), ", ".join(map(str, g["reference_chars"])),
                    (_pct(g.get("d_delta"), True) + ref_mark) if "d_delta" in g else "—", _ci(g),
                    f"{g['d_p_improvement']:.3f}" if "d_p_improvement" in g else "—",
                    _still(g)])
    return out


def _still(g: dict) -> str:
    n = len(g["still_improving"])
    return f"{n}/{len(g['runs'])}" + (" STILL IMPROVING" if n else "")


GROUP_HEAD = ["script", "mode", "seeds", "CER % (mean ± sd)", "CER 95% CI", "toneless CER %", "best val loss",
              "best epoch", "ref chars", "ΔCER pp", "95% CI", "P(improvement)",
              "at epoch limit, still improving"]
RUN_HEAD = ["run", "script", "mode", "seed", "CER %", "toneless CER %", "best val loss", "best epoch",
            "ref chars", "ΔCER pp", "95% CI", "P(improvement)", "source", "stopped"]


def _run_rows(s: Summary) -> list[list[str]]:
    return [[r["run_id"], SCRIPT_NAMES[r["script"]], r["mode"], str(r["seed"]), _pct(r["cer"]),
             _pct(r["toneless_cer"]), f"{r['best_val_loss']:.4f}", str(r["best_epoch"]), str(r["reference_chars"]),
             ("reference" if r["run_id"] == s.reference else _pct(r.get("d_delta"), True) if "d_delta" in r else "—"),
             _ci(r), f"{r['d_p_improvement']:.3f}" if "d_p_improvement" in r else "—", r["source"], r["stop"]]
            for r in s.per_run]


def _partition_rows(s: Summary) -> list[list[str]]:
    return [[p["run_id"]] + [f"{_pct(p[k]['cer'])} ({p[k]['rows']})" for k in (*PARTITIONS, "overall")]
            for p in s.partitions]


def _pair_rows(s: Summary) -> list[list[str]]:
    return [[p["b"], p["a"], _pct(p["delta"], True), _ci(p, ""), f"{p['p_improvement']:.3f}"] for p in s.pairs]


TTT_HEAD = ["run", "lr", "steps", "chosen on", "val CER % no TTT → chosen", "grid (lr×steps: val CER %)",
            "test rows changed", "CER % on changed rows before → after", "guard reverts"]


def _ttt_rows(s: Summary) -> list[list[str]]:
    out = []
    for t in s.ttt:
        sel = t["selection"] or {}
        grid = ", ".join(f"{g['lr']:g}×{g['steps']}: {_pct(g['val_cer'])}" for g in sel.get("grid", [])) or "—"
        out.append([t["run_id"], f"{t['lr']:g}" if t["lr"] is not None else "—", str(t["steps"]),
                    "val grid" if sel else "config",
                    (f"{_pct(sel.get('no_ttt_val_cer'))} → {_pct(sel.get('best_val_cer'))}" if sel else "—"), grid,
                    "—" if t["changed"] is None else f"{t['changed']} / {t['rows']}",
                    (f"{_pct(t['cer_before'])} → {_pct(t['cer_after'])}" if t["changed"] else "—"),
                    "—" if t["guard_reverts"] is None else str(t["guard_reverts"])])
    return out


def _md_table(head: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _header(s: Summary) -> list[str]:
    r0 = s.runs[0] if s.runs else None
    ident = ("snapshot `{}`, split `{}`, feature recipe `{}`, {} test utterances".format(
        r0.results["snapshot_sha256"][:12], r0.results["split_sha256"][:12], r0.results["feature_recipe_hash"][:12],
        len(r0.ids)) if r0 else "no completed runs")
    w = r0.results.get("feature_weights") if r0 else None
    if w:
        ident += f", features from {w.get('name')} (weights sha256 `{w.get('sha256')}`)"
    lines = [ident]
    spelling = _nko_spelling(s)
    if spelling:
        lines.append(spelling)
    return lines + [f"reference run `{s.reference}`" if s.reference else "no reference run with a bundle: no ΔCER"]


def _nko_spelling(s: Summary) -> str | None:
    """How the snapshot spells its N'Ko references (``snapshot_meta.json`` beside its pairs,
    written by ``nko-ops sample build``): the spelling sets the denominator of every N'Ko CER."""
    nko = next((r for r in s.runs if r.results.get("script") == "nko"), None)
    snapshot = ((nko.results.get("resolved_paths") or {}).get("snapshot") if nko else None)
    meta_path = Path(snapshot).parent / "snapshot_meta.json" if snapshot else None
    if meta_path is None or not meta_path.is_file():
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    spell, chars = meta.get("nko_spelling") or {}, meta.get("chars") or {}
    if not spell or not chars.get("nko_per_latin"):
        return None
    how = "with gbarali compression" if spell.get("gbarali") else "without gbarali compression"
    return (f"N'Ko references: `{spell.get('function')}` {how} ({spell.get('normalization_version')}), "
            f"{chars['nko_per_latin']:.3f} N'Ko characters per Latin character over the snapshot: the spelling "
            f"sets the denominator of every N'Ko CER (snapshot_meta.json)")


def markdown(s: Summary) -> str:
    m = s.matrix
    out = [f"# Matrix `{m.matrix_id}`", ""]
    out += [f"{line}." for line in _header(s)]
    out += ["", f"ΔCER = CER − reference CER in percentage points (negative is better). By script × mode: "
            f"CER is the mean ± sd over the group's seeds; its 95% CI, and the ΔCER CI against the reference run's "
            f"group, come from a {stats.HIERARCHICAL} ({stats.RESAMPLES:,} resamples, seed {stats.SEED}), so they "
            f"include seed variance as well as utterance sampling. By run: ΔCER against the reference run with a "
            f"paired bootstrap over test utterances (same resamples). P(improvement) = share of resamples with a "
            f"lower CER than the reference. \"STILL IMPROVING\": the run stopped at its epoch limit with its last "
            f"epoch a new best validation loss (not converged; a longer budget may change its CER).", ""]
    out += ["## By script × mode", "", _md_table(GROUP_HEAD, _group_rows(s)), ""]
    out += ["## By run", "", _md_table(RUN_HEAD, _run_rows(s)), ""]
    if s.ttt:
        out += ["## Test-time training", "", _md_table(TTT_HEAD, _ttt_rows(s)), ""]
        out += [f"- `{t['run_id']}`: {t['verdict']}." for t in s.ttt] + [""]
    out += ["## CER % by partition (rows)", "",
            _md_table(["run", *PARTITIONS, "overall"], _partition_rows(s)), ""]
    if s.pairs:
        out += ["## Pairwise ΔCER (run − other run)", "",
                _md_table(["run", "vs", "ΔCER pp", "95% CI", "P(improvement)"], _pair_rows(s)), ""]
    if s.missing:
        out += ["## Not included", ""] + [f"- `{rid}`: {why}" for rid, why in s.missing] + [""]
    out += [f"Figures: `{m.matrix_id}-cer.png` (CER by mode × script, 95% CIs), "
            f"`{m.matrix_id}-curves.png` (learning curves).", ""]
    return "\n".join(out)


def _tex_escape(text: str) -> str:
    out = []
    for ch in text:
        out.append({"\\": "\\textbackslash{}", "&": "\\&", "%": "\\%", "_": "\\_", "#": "\\#", "$": "\\$",
                    "{": "\\{", "}": "\\}", "~": "\\textasciitilde{}", "^": "\\textasciicircum{}",
                    "±": "$\\pm$", "—": "--", "Δ": "$\\Delta$", "×": "$\\times$"}.get(ch, ch))
    return "".join(out)


def _tex_table(caption: str, label: str, head: list[str], rows: list[list[str]], align: str) -> str:
    lines = ["\\begin{table}[t]", "\\centering", "\\small", f"\\caption{{{_tex_escape(caption)}}}",
             f"\\label{{{label}}}", f"\\begin{{tabular}}{{{align}}}", "\\toprule",
             " & ".join(_tex_escape(h) for h in head) + " \\\\", "\\midrule"]
    lines += [" & ".join(_tex_escape(c) for c in r) + " \\\\" for r in rows]
    lines += ["\\bottomrule", "\\end{tabular}", "\\end{table}"]
    return "\n".join(lines)


def latex(s: Summary) -> str:
    m = s.matrix
    note = (f"ΔCER vs {s.reference} (by script and mode: vs its group) in pp; 95% CIs by script and mode from a "
            f"hierarchical bootstrap resampling seeds and test utterances together, by run from a paired bootstrap "
            f"over test utterances ({stats.RESAMPLES} resamples)." if s.reference else "No reference run.")
    parts = [f"% generated by `nko-ops tables` from the run artifacts of matrix {m.matrix_id}; do not edit",
             "% needs \\usepackage{booktabs}",
             _tex_table(f"Test CER by script and mode. {note}", f"tab:{m.matrix_id}-groups", GROUP_HEAD,
                        _group_rows(s), "lllllrrlrlrrl"),
             _tex_table(f"Test CER by run. {note}", f"tab:{m.matrix_id}-runs", RUN_HEAD, _run_rows(s),
                        "llllrrrrrlrrll"),
             _tex_table("Test CER (%) by partition, with rows.", f"tab:{m.matrix_id}-partitions",
                        ["run", *PARTITIONS, "overall"], _partition_rows(s), "lrrrrr")]
    return "\n\n".join(parts) + "\n"


def _csv(head: list[str], rows: list[list]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(head)
    w.writerows(rows)
    return buf.getvalue()


def csvs(s: Summary) -> dict[str, str]:
    d_cols = ["delta_vs_reference", "ci_lo", "ci_hi", "p_improvement"]

    def dvals(d: dict) -> list[str]:
        return [_num(d.get("d_delta")), _num(d.get("d_ci_lo")), _num(d.get("d_ci_hi")),
                _num(d.get("d_p_improvement"), ".4f")]

    groups = _csv(["script", "mode", "runs", "seeds", "cer_mean", "cer_sd", "cer_ci_lo", "cer_ci_hi",
                   "toneless_cer_mean", "best_val_loss_mean", "best_epochs", "reference_chars", "reference_run",
                   *d_cols, "still_improving"],
                  [[g["script"], g["mode"], " ".join(g["runs"]), " ".join(map(str, g["seeds"])), _num(g["cer_mean"]),
                    _num(g["cer_sd"]), _num(g["cer_ci"][0]), _num(g["cer_ci"][1]), _num(g["toneless_cer_mean"]),
                    _num(g["best_val_loss_mean"]), " ".join(map(str, g["best_epochs"])),
                    " ".join(map(str, g["reference_chars"])), s.reference or "", *dvals(g),
                    " ".join(g["still_improving"])] for g in s.groups])
    runs = _csv(["run_id", "script", "mode", "seed", "cer", "toneless_cer", "best_val_loss", "best_epoch",
                 "reference_chars", "rows", "source", "reference_run", *d_cols, "stopped", "still_improving"],
                [[r["run_id"], r["script"], r["mode"], r["seed"], _num(r["cer"]), _num(r["toneless_cer"]),
                  _num(r["best_val_loss"]), r["best_epoch"], r["reference_chars"], r["rows"], r["source"],
                  s.reference or "", *dvals(r), r["stop"], int(r["still_improving"])] for r in s.per_run])
    parts = _csv(["run_id", "partition", "rows", "cer", "toneless_cer"],
                 [[p["run_id"], k, p[k]["rows"], _num(p[k]["cer"]), _num(p[k]["toneless_cer"])]
                  for p in s.partitions for k in (*PARTITIONS, "overall")])
    pairs = _csv(["run", "vs", "delta", "ci_lo", "ci_hi", "p_improvement"],
                 [[p["b"], p["a"], _num(p["delta"]), _num(p["ci_lo"]), _num(p["ci_hi"]), _num(p["p_improvement"], ".4f")]
                  for p in s.pairs])
    missing = _csv(["run_id", "reason"], [[rid, why] for rid, why in s.missing])
    return {"groups.csv": groups, "runs.csv": runs, "partitions.csv": parts, "pairwise.csv": pairs,
            "missing.csv": missing}


# --------------------------------------------------------------------------- figures

def _figures(s: Summary, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    m = s.matrix
    meta = {"Software": None}  # keep the PNG bytes independent of the matplotlib version
    paths = []
    with plt.rc_context({"font.size": 9, "axes.spines.top": False, "axes.spines.right": False}):
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=120)
        width = 0.38
        for k, script in enumerate(SCRIPTS):
            gs = {g["mode"]: g for g in s.groups if g["script"] == script}
            xs = [MODES.index(mo) + (k - 0.5) * width for mo in MODES if mo in gs]
            ys = [100 * gs[mo]["cer_mean"] for mo in MODES if mo in gs]
            lo = [100 * (gs[mo]["cer_mean"] - gs[mo]["cer_ci"][0]) for mo in MODES if mo in gs]
            hi = [100 * (gs[mo]["cer_ci"][1] - gs[mo]["cer_mean"]) for mo in MODES if mo in gs]
            if xs:
                ax.bar(xs, ys, width, yerr=[lo, hi], capsize=3, label=SCRIPT_NAMES[script],
                       color=("#1f77b4" if script == "nko" else "#ff7f0e"))
                for x, mo in zip(xs, [mo for mo in MODES if mo in gs]):
                    ax.annotate(f"n={len(gs[mo]['runs'])}", (x, 0), xytext=(0, 2), textcoords="offset points",
                                ha="center", va="bottom", fontsize=7, color="white")
        ax.set_xticks(range(len(MODES)), MODES)
        ax.set_ylabel("test CER (%)")
        ax.set_title(f"{m.matrix_id}: CER by mode × script (95% bootstrap CI)")
        if s.groups:
            ax.legend(frameon=False)
        fig.tight_layout()
        p = out / f"{m.matrix_id}-cer.png"
        fig.savefig(p, metadata=meta)
        plt.close(fig)
        paths.append(p)

        fig, axes = plt.subplots(1, 2, figsize=(8.0, 3.4), dpi=120, sharey=True)
        for ax, script in zip(axes, SCRIPTS):
            for r in [r for r in s.runs if r.spec.script == script]:
                ep = [c["epoch"] for c in r.curve if "val_loss" in c]
                if ep:
                    line, = ax.plot(ep, [c["val_loss"] for c in r.curve if "val_loss" in c], label=f"{r.run_id} val")
                    ax.plot([c["epoch"] for c in r.curve if "train_loss" in c],
                            [c["train_loss"] for c in r.curve if "train_loss" in c], ls="--", lw=0.8,
                            color=line.get_color())
            ax.set_title(f"{SCRIPT_NAMES[script]} (dashed: train)")
            ax.set_xlabel("epoch")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            if ax.get_legend_handles_labels()[0]:
                ax.legend(frameon=False, fontsize=6)
        axes[0].set_ylabel("CTC loss")
        fig.tight_layout()
        p = out / f"{m.matrix_id}-curves.png"
        fig.savefig(p, metadata=meta)
        plt.close(fig)
        paths.append(p)
    return paths


# --------------------------------------------------------------------------- entry points

def write_tables(matrix_path: str | Path, out_dir: str | Path = "reports", db_path: str | Path | None = "state.db",
                 reference: str | None = None) -> list[Path]:
    """Write the matrix's tables and figures under ``out_dir``; returns the paths written."""
    m = load_matrix(matrix_path)
    if reference is not None and reference not in {r.run_id for r in m.runs}:
        raise TablesError(f"--reference {reference!r} is not a run of matrix {m.matrix_id}")
    runs, missing = load_runs(m, db_path)
    s = summarise(m, runs, missing, reference)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    agp_md, agp_csv = agp_tables(m, out / "agp")
    for name, text in [("tables.md", markdown(s) + agp_md + agp_state_section(m, db_path)), ("tables.tex", latex(s)), *csvs(s).items(),
                       *([("agp.csv", agp_csv)] if agp_csv else [])]:
        p = out / f"{m.matrix_id}-{name}"
        atomic_write_text(p, text)
        written.append(p)
    written += _figures(s, out)
    return written


# --------------------------------------------------------------------------- AGP lane

AGP_HEAD = ["run", "proposer", "partition", "rows", "CER before", "ungated", "gated", "Δ gated pp", "95% CI",
            "accepted", "improved", "neutral", "worse", "margin"]


def agp_tables(m: Matrix, agp_dir: Path) -> tuple[str, str]:
    """The AGP lane's results (``agp_dir/<run_id>/agp_eval.json``, written by the demo's lane
    before the tables) as a markdown section and a CSV; empty strings when there are none."""
    rows = []
    for spec in m.runs:
        path = agp_dir / spec.run_id / "agp_eval.json"
        if not path.exists():
            continue
        lane = json.loads(path.read_text(encoding="utf-8"))
        for name, summ in lane.get("proposers", {}).items():
            margins = (summ.get("gate_policy") or {}).get("acoustic", {}).get("margin", {})
            parts = summ["partitions"]
            groups = [(p, parts[p]) for p in PARTITIONS if parts.get(p, {}).get("rows")] + [("overall", summ["overall"])]
            for part, g in groups:
                ci = g.get("delta_ci95")
                margin = margins.get(part)
                rows.append([spec.run_id, name, part, str(g["rows"]), _pct(g["cer_before"]), _pct(g["cer_ungated"]),
                             _pct(g["cer_after"]), _pct(g["delta_cer"], True),
                             f"[{ci[0] * 100:+.2f}, {ci[1] * 100:+.2f}]" if ci else "—", str(g["accepted"]),
                             str(g["improved"]), str(g["neutral"]), str(g["worse"]),
                             "—" if margin is None else (margin if isinstance(margin, str) else f"{margin:.4f}")])
    if not rows:
        return "", ""
    md = ["## AGP lane: CER before, ungated and gated (test rows)", "",
          "Each proposer's proposals on the N'Ko test rows: CER % with every proposal applied (ungated) and with "
          "only the gate's accepted ones (gated); Δ gated = gated − before with a paired bootstrap 95% CI over "
          "rows; margin = the acoustic margin of rule `acoustic` for the partition, calibrated on validation "
          "rows (`reports/agp/<run>/<proposer>/gate.val.toml`; figure `frontier.png` beside it).", "",
          _md_table(AGP_HEAD, rows), ""]
    return "\n".join(md), _csv(AGP_HEAD, rows)


AGP_STATE_HEAD = ["run", "proposer", "rows", "accepted", "CER before", "gated", "Δ gated pp", "95% CI", "improved",
                  "neutral", "worse", "gate policy"]


def agp_state_section(m: Matrix, db_path: str | Path | None) -> str:
    """The AGP lane's result per run and proposer as recorded in state.db (state/agp_results.py),
    as the tables' last markdown section; "" when state.db holds none for this matrix's runs."""
    if db_path is None or not Path(db_path).exists():
        return ""
    from state.agp_results import agp_results
    from state.store import open_db

    db = open_db(db_path, read_only=True)
    try:
        recorded = agp_results(db, [r.run_id for r in m.runs])
    finally:
        db.close()
    order = {r.run_id: i for i, r in enumerate(m.runs)}
    rows = [[r.run_id, r.proposer, str(r.rows), str(r.accepted), _pct(r.cer_before), _pct(r.cer_gated),
             _pct(r.delta_cer, True),
             "—" if r.delta_ci_low is None else f"[{r.delta_ci_low * 100:+.2f}, {r.delta_ci_high * 100:+.2f}]",
             str(r.improved), str(r.neutral), str(r.worse), f"`{(r.policy_hash or '—')[:12]}`"]
            for r in sorted(recorded, key=lambda r: (order[r.run_id], r.proposer))]
    if not rows:
        return ""
    return "\n".join(["", "## AGP gate per run (state.db)", "",
                      "What the AGP lane recorded in state.db for each run and proposer (all test rows): how many "
                      "proposals the gate accepted, CER % before → gated, Δ gated = gated − before with a paired "
                      "bootstrap 95% CI over rows, and the accepted proposals that improved, left unchanged or "
                      "worsened the row against its reference; gate policy = the hash in each decision's witness.",
                      "", _md_table(AGP_STATE_HEAD, rows), ""])
