"""The AGP lane on every N'Ko run and seed of the demo, against issue 15's targets.

    .venv/bin/nko-ops demo                                  # first: the demo's runs
    nice .venv/bin/python benchmarks/agp_all_runs.py [--matrix configs/matrix/demo.json] [--out work/agp-all]

The demo's own lane covers the runs its matrix lists in ``agp_dumps`` (to keep the demo
within its time budget). This script runs the same lane (``backend.agp_lane.run_matrix_lane``:
partitions and acoustic margins calibrated on each run's validation rows, lexicon and N-best
proposers, gate, eval on test rows) on every completed N'Ko run of the matrix, into ``--out``
with a state store of its own (the demo's state.db is not touched), then checks per run
and proposer:

* gated CER <= CER before overall and on every partition with at least 20 rows;
* the upper bound of the 95% paired-bootstrap CI of gated - before <= +0.1 pp;
* and, per proposer, whether gated < before with a CI excluding 0 on every run.

Then, per proposer, the demo as a whole: every N'Ko run's test rows pooled, gated - before
with a 95% CI from a paired bootstrap over *utterances* (each resample draws test utterances
with replacement and takes every run's row of each drawn utterance, since all runs score the
same utterances). It prints one line per run and proposer, the pooled lines, and writes
``--out/targets.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agp.evaluate import paired_bootstrap_ci  # noqa: E402
from backend.agp_lane import run_matrix_lane  # noqa: E402
from models.bundle import read_predictions  # noqa: E402
from backend.matrix import load_matrix  # noqa: E402
from models.text import row_edits  # noqa: E402

MIN_ROWS = 20
CI_BOUND = 0.001  # +0.1 pp


def check(summary: dict) -> dict:
    overall = summary["overall"]
    worse_parts = [p for p, g in summary["partitions"].items()
                   if g.get("rows", 0) >= MIN_ROWS and g["cer_after"] > g["cer_before"]]
    ci = overall.get("delta_ci95") or [0.0, 0.0]
    return {"cer_before": overall["cer_before"], "cer_ungated": overall["cer_ungated"],
            "cer_gated": overall["cer_after"], "delta_ci95": ci,
            "gated_not_worse": overall["cer_after"] <= overall["cer_before"] and not worse_parts,
            "partitions_worse": worse_parts, "ci_upper_ok": ci[1] <= CI_BOUND,
            "better_ci_excludes_0": ci[1] < 0}


def pooled(m, runs: list[str], out: Path, proposer: str) -> dict:
    """Every run's test rows under ``proposer``, summed per utterance; CER before / gated and
    the utterance-level paired bootstrap CI of gated - before."""
    per_utt: dict[str, list[int]] = {}
    for run_id in runs:
        path = out / run_id / proposer / "decisions.jsonl"
        if not path.exists():
            continue
        decided = {d["feat_id"]: d for d in map(json.loads, path.read_text(encoding="utf-8").splitlines())}
        for row in read_predictions(m.out_dir(m.run(run_id)) / "test_predictions.jsonl"):
            d = decided.get(row.feat_id)
            after = d["proposal"] if d is not None and d["accepted"] else row.asr_text
            before, chars = row_edits(row.reference_text, row.asr_text)
            t = per_utt.setdefault(row.feat_id, [0, 0, 0])
            t[0] += chars
            t[1] += before
            t[2] += row_edits(row.reference_text, after)[0]
    chars, before, after = (sum(t[i] for t in per_utt.values()) for i in range(3))
    ci = paired_bootstrap_ci([tuple(t) for t in per_utt.values()])
    return {"utterances": len(per_utt), "reference_chars": chars, "cer_before": before / chars,
            "cer_gated": after / chars, "delta": (after - before) / chars, "delta_ci95": ci,
            "ci_upper_ok": ci[1] <= CI_BOUND, "better_ci_excludes_0": ci[1] < 0}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--matrix", type=Path, default=Path("configs/matrix/demo.json"))
    ap.add_argument("--out", type=Path, default=Path("work/agp-all"))
    args = ap.parse_args()
    os.chdir(ROOT)  # the demo matrix names its paths relative to the repository
    m = load_matrix(args.matrix)
    runs = [r.run_id for r in m.runs if r.script == "nko" and (m.out_dir(r) / "test_predictions.jsonl").exists()]
    if not runs:
        sys.exit(f"{args.matrix}: no completed N'Ko run under {m.out_root}: run `nko-ops demo` first")
    args.out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    lanes = run_matrix_lane(args.matrix, m.split, m.snapshot, args.out, args.out / "state.db", runs=runs,
                            log=lambda msg: print(f"  {msg}"))
    elapsed = time.perf_counter() - t0
    results = {run_id: {name: check(s) for name, s in lane["proposers"].items()} for run_id, lane in lanes.items()}
    print(f"{'run':32} {'proposer':8} {'before':>7} {'ungated':>8} {'gated':>7}  {'95% CI of gated-before (pp)':>28}  targets")
    for run_id, by_name in results.items():
        for name, c in by_name.items():
            ok = c["gated_not_worse"] and c["ci_upper_ok"]
            print(f"{run_id:32} {name:8} {c['cer_before'] * 100:7.2f} {c['cer_ungated'] * 100:8.2f} "
                  f"{c['cer_gated'] * 100:7.2f}  [{c['delta_ci95'][0] * 100:+6.2f}, {c['delta_ci95'][1] * 100:+6.2f}]"
                  f"{'':14}  {'met' if ok else 'MISSED ' + ', '.join(c['partitions_worse'])}")
    proposers = sorted({n for by in results.values() for n in by})
    demo = {n: pooled(m, runs, args.out, n) for n in proposers}
    for n, p in demo.items():
        label = f"all {len(runs)} N'Ko runs pooled"
        print(f"{label:32} {n:8} {p['cer_before'] * 100:7.2f} {'':8} "
              f"{p['cer_gated'] * 100:7.2f}  [{p['delta_ci95'][0] * 100:+6.2f}, {p['delta_ci95'][1] * 100:+6.2f}]"
              f"{'':14}  {'met' if p['ci_upper_ok'] else 'MISSED'} (utterance bootstrap)")
    summary = {
        "runs": len(results), "elapsed_s": round(elapsed, 1),
        "all_gated_not_worse": all(c["gated_not_worse"] for by in results.values() for c in by.values()),
        "all_ci_upper_ok": all(c["ci_upper_ok"] for by in results.values() for c in by.values()),
        "worst_ci_upper_pp": max(c["delta_ci95"][1] for by in results.values() for c in by.values()) * 100,
        "proposer_better_on_every_run": {n: all(by[n]["better_ci_excludes_0"] for by in results.values() if n in by)
                                         for n in proposers},
        "pooled": demo,
    }
    (args.out / "targets.json").write_text(json.dumps({"summary": summary, "runs": results}, indent=1) + "\n",
                                           encoding="utf-8")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
